"""The router's door: who is calling, checked on every RPC, and the ticket it vouches with.

A call proves its caller with one of
- ``authorization: Bearer <token>``: a static token (``tokens``) or any further authenticator
  (e.g. a Kubernetes ServiceAccount token checked with TokenReview);
- ``snakepit-ticket: <ticket>``: a pool-signed ticket (``tickets``), which workers present when
  they call back on behalf of the call they serve, and direct-mode clients got from the router.
With auth off the gate lets everyone in as ``anonymous`` (today's behaviour). Credentials are
stripped from what is forwarded: workers get a ticket, never the caller's token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..errors import PermissionDenied, Unauthenticated
from .identity import ANONYMOUS, Principal
from .tickets import (
    DEFAULT_AUDIENCE,
    TICKET_KEY,
    TicketIssuer,
    TicketVerifier,
    load_private_key,
    new_private_key,
)
from .tokens import StaticTokens

AUTHORIZATION_KEY = "authorization"
CREDENTIAL_KEYS = frozenset((AUTHORIZATION_KEY, TICKET_KEY))
# Allows every principal in a set of names (e.g. --allow-direct '*').
EVERYONE = "*"

# A bearer token -> its principal (source set), or None when this authenticator does not know it.
Authenticator = Callable[[str], Awaitable[Principal | None]]

_EXPECTED = (
    "this pool requires a credential: send the metadata 'authorization: Bearer <token>' "
    "(Client(token=...), snakepit --token, $SNAKEPIT_TOKEN)"
)


def static_authenticator(tokens: StaticTokens) -> Authenticator:
    async def authenticate(token: str) -> Principal | None:
        name = tokens.principal_of(token)
        return None if name is None else Principal(name, source="token")

    return authenticate


@dataclass
class Gate:
    """Authentication and the pool-wide grants (admins, direct mode). ``enabled`` False: open."""

    enabled: bool = False
    authenticators: list[Authenticator] = field(default_factory=list)
    issuer: TicketIssuer | None = None
    verifier: TicketVerifier | None = None
    admins: frozenset[str] = frozenset()
    direct: frozenset[str] = frozenset()
    pool_tools: frozenset[str] = frozenset()  # who may host pool-wide tools ('*': all)
    # Told of every ``authorization`` header accepted, and as whom (the HAProxy data path keeps
    # its map of verified callers with it: router/haproxy/authmap.py).
    on_bearer: Callable[[str, Principal], None] | None = None

    def __post_init__(self) -> None:
        self._granted: dict[Principal, Principal] = {}

    def grant(self, principal: Principal) -> Principal:
        """``principal`` with the admin, direct-mode and pool-tool grants this pool gives its name
        (remembered: the call path makes no new object per call)."""
        granted = self._granted.get(principal)
        if granted is None:
            admin = principal.name in self.admins
            direct = admin or _allows(self.direct, principal.name)
            pool_tools = admin or _allows(self.pool_tools, principal.name)
            granted = replace(principal, admin=admin, direct=direct, pool_tools=pool_tools)
            if len(self._granted) > 10_000:
                self._granted.clear()
            self._granted[principal] = granted
        return granted

    async def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal:
        """The caller of a call with this metadata; Unauthenticated when it proves nobody."""
        if not self.enabled:
            return ANONYMOUS
        bearer = ticket = None
        for key, value in metadata or ():
            if key == AUTHORIZATION_KEY:
                bearer = value
            elif key == TICKET_KEY:
                ticket = value
        if ticket is not None and self.verifier is not None:
            return self.grant(self.verifier.verify(str(ticket)))
        if bearer is None:
            raise Unauthenticated(_EXPECTED)
        scheme, _, token = str(bearer).partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("the 'authorization' metadata must be 'Bearer <token>'")
        for authenticator in self.authenticators:
            principal = await authenticator(token)
            if principal is not None:
                granted = self.grant(principal)
                if self.on_bearer is not None:
                    self.on_bearer(str(bearer), granted)
                return granted
        raise Unauthenticated(
            "the bearer token is not one this pool accepts (unknown, revoked or expired)"
        )

    def ticket_metadata(self, principal: Principal) -> tuple[tuple[str, str], ...]:
        """What a call on behalf of ``principal`` carries to a worker (nothing with auth off)."""
        if self.issuer is None or principal.anonymous:
            return ()
        return ((TICKET_KEY, self.issuer.ticket_for(principal.name)[0]),)

    def require_direct(self, principal: Principal) -> None:
        if not principal.direct:
            raise PermissionDenied(
                f"principal {principal.name!r} may not use direct mode or read the routing "
                "table (the pool allows it with --allow-direct / spec.auth.directMode)"
            )


def require_pool_tools(principal: Principal, tool: str) -> None:
    """Hosting a tool for every session of the pool is a grant (--allow-pool-tools): such a
    tool sees the arguments of every principal's calls to it."""
    if not principal.pool_tools:
        raise PermissionDenied(
            f"principal {principal.name!r} may not host tool {tool!r} for the whole pool; "
            "register it for its own sessions (without pool_wide), or have the pool allow it "
            "(--allow-pool-tools)"
        )


def _allows(allowed: frozenset[str], name: str) -> bool:
    return EVERYONE in allowed or name in allowed


def names(values: Iterable[str]) -> frozenset[str]:
    return frozenset(v.strip() for v in values if v.strip())


@dataclass
class AuthConfig:
    """The router's identity settings (flags of ``snakepit router`` and ``serve``)."""

    tokens_file: str = ""  # PRINCIPAL:TOKEN lines; auth is on when set
    # NAMESPACE/NAME (or NAMESPACE/*) ServiceAccounts whose tokens (TokenReview) may call
    service_accounts: tuple[str, ...] = ()
    token_audience: str = DEFAULT_AUDIENCE  # the audience their tokens must be minted for
    admins: tuple[str, ...] = ()
    direct: tuple[str, ...] = ()  # principals allowed direct mode ('*': all)
    pool_tools: tuple[str, ...] = ()  # principals allowed pool-wide hosted tools ('*': all)
    signing_key: str = ""  # Ed25519 PEM shared by the pool's routers; empty: one made up now
    audience: str = DEFAULT_AUDIENCE

    @property
    def enabled(self) -> bool:
        return bool(self.tokens_file or self.service_accounts)


def build_gate(config: AuthConfig) -> Gate:
    """The gate ``config`` describes (open when auth is off)."""
    if not config.enabled:
        return Gate()
    key = load_private_key(config.signing_key) if config.signing_key else new_private_key()
    authenticators = []
    if config.tokens_file:
        authenticators.append(static_authenticator(StaticTokens(config.tokens_file)))
    if config.service_accounts:
        from ..router.discovery import _api_client
        from .tokenreview import TokenReviewAuthenticator, kube_review, parse_service_accounts

        authenticators.append(
            TokenReviewAuthenticator(
                config.token_audience,
                parse_service_accounts(config.service_accounts),
                kube_review(_api_client),
            )
        )
    return Gate(
        enabled=True,
        authenticators=authenticators,
        issuer=TicketIssuer(key, audience=config.audience),
        verifier=TicketVerifier(key.public_key(), audience=config.audience),
        admins=names(config.admins),
        direct=names(config.direct),
        pool_tools=names(config.pool_tools),
    )
