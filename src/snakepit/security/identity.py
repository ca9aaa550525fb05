"""Principals: who a call is on behalf of, and the store keys their sessions live under.

A session belongs to the principal that created it by *namespacing*: the store key of session
``sid`` opened by principal ``alice`` is ``alice/sid``. Another principal asking for ``sid``
looks up its own key, misses, and gets NOT_FOUND with no check that could disclose that the
session exists. Principal names may not hold ``/``, so no caller-chosen id can reach into another
principal's keys. With auth off every caller is ``anonymous``, whose keys are the bare ids: the
pool behaves exactly as it did before identity existed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import InvalidArgument

# Kubernetes usernames (system:serviceaccount:NS:NAME) fit; '/' separates the namespace.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,319}")
SEPARATOR = "/"


@dataclass(frozen=True, slots=True)
class Principal:
    """A verified caller. ``source`` says how it was proven: ``token`` (static bearer token),
    ``serviceaccount`` (Kubernetes TokenReview), ``ticket`` (a pool-signed ticket), or
    ``anonymous`` (auth off)."""

    name: str
    admin: bool = False
    source: str = "anonymous"
    direct: bool = False  # may read the routing table and call workers directly
    pool_tools: bool = False  # may host tools for every session of the pool (--allow-pool-tools)

    @property
    def anonymous(self) -> bool:
        return self.source == "anonymous"


# Auth off: everyone is this one principal, who may do everything (today's behaviour).
ANONYMOUS = Principal("anonymous", admin=True, source="anonymous", direct=True, pool_tools=True)


def check_principal_name(name: str) -> str:
    """A principal name fit for keys and logs: 1-320 of letters, digits and ``._:@-``."""
    if not _NAME.fullmatch(name):
        raise InvalidArgument(
            f"principal name {name[:64]!r} must be 1-320 characters of letters, digits and ._:@- "
            "(starting with a letter or digit)"
        )
    return name


def session_key(principal: Principal, session_id: str) -> str:
    """The store key of ``principal``'s session ``session_id``."""
    if principal.anonymous:
        return session_id
    return f"{principal.name}{SEPARATOR}{session_id}"


def session_id_of(principal: Principal, key: str) -> str | None:
    """The id ``principal`` knows store key ``key`` by; None when the key is not its own."""
    if principal.anonymous:
        return key
    prefix = principal.name + SEPARATOR
    return key[len(prefix) :] if key.startswith(prefix) else None


def owner_of_key(key: str) -> str | None:
    """The principal whose session store key ``key`` is; None for anonymous (bare) keys."""
    name, sep, _ = key.partition(SEPARATOR)
    return name if sep else None
