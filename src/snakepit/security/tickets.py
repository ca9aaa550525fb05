"""Pool-signed tickets: how a worker knows on whose behalf a call comes, without a credential.

The router authenticates the caller, then calls the worker with a short-lived ticket naming the
principal, signed with the pool's Ed25519 key. Workers hold only the public key and verify
locally (no Kubernetes API access, no call to the router); a verified ticket is cached until it
expires, so a worker pays the signature check (tens of microseconds) once per ticket, not per
call. Direct-mode clients get a ticket from the router with the routing table and present it to
workers; a worker's own calls back to the router carry the ticket of the call they serve.

Format: ``v1.<payload>.<signature>``, both unpadded base64url; the payload is compact JSON
``{"sub": principal, "aud": audience, "iat": issued, "exp": expires}`` (seconds since the epoch).
The audience names the pool, so a ticket of one pool is refused by another that shares a key.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ..errors import InvalidArgument, Unauthenticated
from .identity import Principal

TICKET_KEY = "snakepit-ticket"
DEFAULT_AUDIENCE = "snakepit"
DEFAULT_TICKET_SECONDS = 600.0
# Clocks of routers and workers may disagree by this much.
CLOCK_SKEW = 30.0
_PREFIX = "v1."
_INLINE_KEY = "ed25519:"
_CACHE_SIZE = 10_000


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


# Keys ---------------------------------------------------------------------------------------
def new_private_key() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_key_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def public_key_text(key: Ed25519PublicKey) -> str:
    """The public key as one short string (``ed25519:<base64>``): fit for a flag or env var."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return _INLINE_KEY + base64.b64encode(raw).decode()


def public_key_pem(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def load_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"cannot read the ticket signing key {path}: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgument(f"the ticket signing key {path} is not an Ed25519 private key")
    return key


def load_public_key(spec: str) -> Ed25519PublicKey:
    """``ed25519:<base64 of the 32 raw bytes>``, or the path of a PEM public key file."""
    try:
        if spec.startswith(_INLINE_KEY):
            return Ed25519PublicKey.from_public_bytes(base64.b64decode(spec[len(_INLINE_KEY) :]))
        key = serialization.load_pem_public_key(Path(spec).read_bytes())
    except (OSError, ValueError, binascii.Error) as exc:
        raise InvalidArgument(f"cannot read the ticket public key {spec[:80]}: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidArgument(f"the ticket public key {spec[:80]} is not an Ed25519 key")
    return key


# Issuing ------------------------------------------------------------------------------------
class TicketIssuer:
    """Signs tickets (the router). One ticket per principal is reused until half its lifetime
    has passed, so signing costs nothing on the call path either."""

    def __init__(
        self,
        key: Ed25519PrivateKey,
        *,
        audience: str = DEFAULT_AUDIENCE,
        lifetime: float = DEFAULT_TICKET_SECONDS,
    ) -> None:
        self.key = key
        self.audience = audience
        self.lifetime = lifetime
        self._issued: dict[str, tuple[str, float]] = {}
        self._lock = threading.Lock()

    def issue(
        self, principal: str, *, now: float | None = None, lifetime: float | None = None
    ) -> str:
        """A fresh ticket for ``principal`` (``lifetime`` seconds, default the issuer's)."""
        issued = time.time() if now is None else now
        payload = {
            "sub": principal,
            "aud": self.audience,
            "iat": int(issued),
            "exp": int(issued + (self.lifetime if lifetime is None else lifetime)),
        }
        body = _b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        signature = self.key.sign((_PREFIX + body).encode())
        return f"{_PREFIX}{body}.{_b64(signature)}"

    def ticket_for(self, principal: str) -> tuple[str, float]:
        """A valid ticket for ``principal`` and when it expires (epoch seconds)."""
        now = time.time()
        cached = self._issued.get(principal)
        if cached is not None and cached[1] - now > self.lifetime / 2:
            return cached
        ticket = self.issue(principal, now=now)
        entry = (ticket, float(int(now + self.lifetime)))
        with self._lock:
            if len(self._issued) > _CACHE_SIZE:
                self._issued.clear()
            self._issued[principal] = entry
        return entry


# Verifying ----------------------------------------------------------------------------------
class TicketVerifier:
    """Checks tickets with the pool's public key (workers; the router for workers' callbacks)."""

    def __init__(self, key: Ed25519PublicKey, *, audience: str = DEFAULT_AUDIENCE) -> None:
        self.key = key
        self.audience = audience
        self._cache: OrderedDict[str, tuple[Principal, float]] = OrderedDict()
        self._lock = threading.Lock()
        self.misses = 0

    def verify(self, ticket: str, *, now: float | None = None) -> Principal:
        """The principal ``ticket`` names; Unauthenticated saying what is wrong otherwise."""
        now = time.time() if now is None else now
        cached = self._cache.get(ticket)
        if cached is not None:
            if now < cached[1] + CLOCK_SKEW:
                return cached[0]
            raise Unauthenticated("the pool ticket has expired: ask the router for a new one")
        principal, expires = self._check(ticket, now)
        with self._lock:
            self.misses += 1
            self._cache[ticket] = (principal, expires)
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return principal

    def _check(self, ticket: str, now: float) -> tuple[Principal, float]:
        parts = ticket.split(".")
        if len(parts) != 3 or parts[0] != _PREFIX[:-1]:
            raise Unauthenticated("malformed pool ticket: expected v1.<payload>.<signature>")
        try:
            signature = _unb64(parts[2])
            self.key.verify(signature, f"{parts[0]}.{parts[1]}".encode())
            claims = json.loads(_unb64(parts[1]))
            name, audience = str(claims["sub"]), str(claims["aud"])
            expires = float(claims["exp"])
        except InvalidSignature:
            raise Unauthenticated(
                "the pool ticket's signature does not verify with this pool's key"
            ) from None
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise Unauthenticated("malformed pool ticket") from None
        if audience != self.audience:
            raise Unauthenticated(
                f"the pool ticket is for audience {audience[:64]!r}, this pool is {self.audience!r}"
            )
        if now >= expires + CLOCK_SKEW:
            raise Unauthenticated("the pool ticket has expired: ask the router for a new one")
        return Principal(name, source="ticket"), expires
