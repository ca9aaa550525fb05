"""Kubernetes ServiceAccount tokens, checked with the TokenReview API (callers in the cluster).

An in-cluster caller sends its own projected, audience-bound token (no shared secret to hand
out). The router asks the kube-apiserver who it is (``TokenReview`` with the pool's audience, so a
token minted for anything else is refused) and lets in only the ServiceAccounts the pool lists.
Answers are cached by a hash of the token for ``ttl`` seconds (refusals ``negative_ttl``), never
past the expiry the token itself states (its JWT ``exp``, read only to bound the cache), in at
most ``cache_size`` entries, so a steady caller costs one review per ``ttl``. What cannot be a
ServiceAccount token (not a JWT) or says it has expired is refused without asking the apiserver,
so random bearer tokens cost no review; the apiserver stays the only judge of what is accepted.
A ServiceAccount the pool does not list is UNAUTHENTICATED too (naming it, never its token): to
this pool it is nobody. The router's ServiceAccount needs ``create`` on
``tokenreviews`` (``authentication.k8s.io``); workers need nothing.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

from ..errors import Unauthenticated, Unavailable
from .identity import Principal

SA_PREFIX = "system:serviceaccount:"
DEFAULT_TTL = 60.0
NEGATIVE_TTL = 10.0
CACHE_SIZE = 10_000
ANY = "*"


def parse_service_accounts(entries: Iterable[str]) -> frozenset[tuple[str, str]]:
    """``NAMESPACE/NAME`` (``NAMESPACE/*``: every ServiceAccount of the namespace) pairs."""
    allowed = set()
    for entry in entries:
        namespace, sep, name = entry.strip().partition("/")
        if not sep or not namespace or not name:
            raise ValueError(f"service account {entry!r}: expected NAMESPACE/NAME or NAMESPACE/*")
        allowed.add((namespace, name))
    return frozenset(allowed)


def service_account_of(username: str) -> tuple[str, str] | None:
    """(namespace, name) of a ServiceAccount's username, None for any other kind of user."""
    if not username.startswith(SA_PREFIX):
        return None
    namespace, sep, name = username[len(SA_PREFIX) :].partition(":")
    return (namespace, name) if sep and namespace and name else None


Review = Callable[[str, str], Any]  # (token, audience) -> TokenReview status, blocking


def kube_review(api_client: Callable[[], Any]) -> Review:
    """A TokenReview through the official client (``api_client``: where the apiserver is)."""
    state: dict[str, Any] = {}

    def review(token: str, audience: str) -> Any:
        from kubernetes import client

        api = state.get("api")
        if api is None:
            api = state["api"] = client.AuthenticationV1Api(api_client())
        body = client.V1TokenReview(
            spec=client.V1TokenReviewSpec(token=token, audiences=[audience])
        )
        return api.create_token_review(body).status

    return review


class TokenReviewAuthenticator:
    """Bearer tokens the kube-apiserver vouches for, from the allowed ServiceAccounts."""

    def __init__(
        self,
        audience: str,
        allowed: frozenset[tuple[str, str]],
        review: Review,
        *,
        ttl: float = DEFAULT_TTL,
        negative_ttl: float = NEGATIVE_TTL,
        cache_size: int = CACHE_SIZE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.allowed = allowed
        self.review = review
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.cache_size = cache_size
        self.clock = clock  # wall clock: it is compared with the tokens' own ``exp``
        self._cache: OrderedDict[bytes, tuple[float, Principal | None]] = OrderedDict()
        self.reviews = 0  # calls to the apiserver (cache misses)

    def _allows(self, account: tuple[str, str]) -> bool:
        return account in self.allowed or (account[0], ANY) in self.allowed

    @property
    def cached(self) -> int:
        return len(self._cache)

    async def __call__(self, token: str) -> Principal | None:
        expires = _expires_at(token)
        if expires is None:
            return None  # not a JWT: a static token of no one, never sent to the apiserver
        now = self.clock()
        if expires <= now:
            raise Unauthenticated(
                "the ServiceAccount token has expired: request a new one (projected tokens are "
                "renewed by the kubelet; read the file again before each call)"
            )
        key = hashlib.sha256(token.encode()).digest()
        cached = self._cache.get(key)
        if cached is not None and now < cached[0]:
            principal = cached[1]
        else:
            principal, ttl = await self._review(token)
            self._cache[key] = (now + min(ttl, expires - now), principal)
            self._cache.move_to_end(key)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if principal is not None and not self._allows(_account(principal)):
            raise Unauthenticated(
                f"service account {principal.name[len(SA_PREFIX) :].replace(':', '/')} may not "
                "call this pool (it is not in spec.auth.serviceAccounts)"
            )
        return principal

    async def _review(self, token: str) -> tuple[Principal | None, float]:
        self.reviews += 1
        try:
            status = await asyncio.to_thread(self.review, token, self.audience)
        except Exception as exc:  # the apiserver is unreachable or refuses the router
            raise Unavailable(f"cannot check the token with the Kubernetes API: {exc}") from None
        user = getattr(status, "user", None)
        username = getattr(user, "username", "") or ""
        audiences = getattr(status, "audiences", None) or ()
        if (
            not getattr(status, "authenticated", False)
            or self.audience not in audiences
            or service_account_of(username) is None
        ):
            return None, self.negative_ttl
        return Principal(username, source="serviceaccount"), self.ttl


def _account(principal: Principal) -> tuple[str, str]:
    account = service_account_of(principal.name)
    assert account is not None  # only ServiceAccounts are ever returned
    return account


def _expires_at(token: str) -> float | None:
    """The ``exp`` a JWT states, None for what is not a JWT with one (unverified: only ever used
    to refuse sooner and to forget a cache entry sooner, never to accept)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        payload = parts[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return float(claims["exp"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
