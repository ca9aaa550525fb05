"""Session stores: sessions with a sliding TTL that own typed, versioned variables.

``open_store`` picks the backend from a URL, so a component configured with ``--store`` never
names a class: "memory" (this process), "redis://…", "rediss://…", "unix://…" (a Redis server),
"router" or "grpc://host:port" (a server that hosts a store, through BridgeService).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import InvalidArgument
from .base import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_SESSION_TTL,
    ChangeFeed,
    SessionInfo,
    SessionStore,
    StoreStats,
    Variable,
    VariableChange,
)
from .limits import DEFAULT_LIMITS, StoreLimits
from .memory import MemoryStore

if TYPE_CHECKING:
    import grpc


def open_store(
    url: str,
    *,
    default_ttl: float = DEFAULT_SESSION_TTL,
    max_sessions: int = DEFAULT_MAX_SESSIONS,
    password: str | None = None,
    channel: grpc.aio.Channel | None = None,
    limits: StoreLimits = DEFAULT_LIMITS,
) -> SessionStore:
    """The store ``url`` names; ``channel`` is the router channel "router" goes through."""
    if url == "memory":
        return MemoryStore(default_ttl=default_ttl, max_sessions=max_sessions, limits=limits)
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme in ("redis", "rediss", "unix"):
        from .redis import RedisStore

        return RedisStore(
            url,
            default_ttl=default_ttl,
            max_sessions=max_sessions,
            password=password,
            limits=limits,
        )
    if url == "router" or scheme == "grpc":
        from .remote import RemoteStore

        if url == "router" and channel is None:
            raise InvalidArgument('the "router" session store needs the channel to the router')
        target = url.split("://", 1)[1] if scheme == "grpc" else None
        return RemoteStore(
            target, channel=channel, default_ttl=default_ttl, max_sessions=max_sessions
        )
    raise InvalidArgument(
        f"unknown session store {url!r}: use memory, redis://host:port/db, rediss://…, "
        "unix:///path/redis.sock, router or grpc://host:port"
    )


__all__ = [
    "DEFAULT_MAX_SESSIONS",
    "DEFAULT_SESSION_TTL",
    "ChangeFeed",
    "MemoryStore",
    "SessionInfo",
    "SessionStore",
    "StoreLimits",
    "StoreStats",
    "Variable",
    "VariableChange",
    "open_store",
]
