"""What one caller may hold in the session store, so nobody can exhaust it for everyone else.

Every backend enforces the same ``StoreLimits`` (the router's ``--max-*`` flags and a pool's
``spec.limits`` set them; docs/security.md lists the defaults and why). A write that would break
a limit raises ResourceExhausted and changes nothing; a malformed request (a TTL outside the
range, metadata that is not strings) is InvalidArgument. ``max_sessions_per_principal`` bounds
what one authenticated caller holds (its sessions' keys start ``PRINCIPAL/``), so one tenant
cannot take the whole of ``max_sessions`` from the others; with auth off every caller is the one
anonymous principal, whose bare keys only the total bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import InvalidArgument, ResourceExhausted

MiB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class StoreLimits:
    max_value_bytes: int = 16 * MiB
    # Values parsed element by element (JSON: strings, lists, maps, numbers) cost the router's
    # event loop time in proportion to their size; bytes and tensors are only copied.
    max_parsed_value_bytes: int = 1 * MiB
    max_session_bytes: int = 64 * MiB
    max_variables: int = 1000
    max_metadata_bytes: int = 16 * 1024
    min_ttl: float = 0.001
    max_ttl: float = 7 * 24 * 3600.0
    max_watchers_per_session: int = 16
    max_watchers: int = 1024
    watch_backlog_bytes: int = 64 * MiB
    # A tenth of the default total: room for a busy application, not for the whole store.
    max_sessions_per_principal: int = 1000

    def principal_full(self, principal: str, held: int) -> ResourceExhausted:
        """The error for ``principal`` creating a session while holding ``held``."""
        return ResourceExhausted(
            f"principal {principal!r} holds {held} sessions, its maximum "
            f"(--max-sessions-per-principal {self.max_sessions_per_principal}); "
            "delete or let some expire first"
        )

    def check_ttl(self, ttl: float | None, default: float) -> float:
        """A session's TTL in seconds: ``None`` or 0 means the store's default."""
        if ttl is None or ttl == 0:
            return default
        if (
            isinstance(ttl, bool)
            or not isinstance(ttl, int | float)
            or not math.isfinite(ttl)
            or not self.min_ttl <= ttl <= self.max_ttl
        ):
            raise InvalidArgument(
                f"session TTL must be between {self.min_ttl:g} and {self.max_ttl:g} seconds, "
                f"got {ttl!r}"[:300]
            )
        return float(ttl)

    def check_metadata(self, metadata: Mapping[str, str] | None, what: str) -> dict[str, str]:
        """Metadata as a plain dict of strings, within ``max_metadata_bytes`` (keys + values)."""
        if not metadata:
            return {}
        size = 0
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InvalidArgument(f"{what} metadata must map strings to strings")
            size += len(key.encode("utf-8", "surrogatepass")) + len(
                value.encode("utf-8", "surrogatepass")
            )
            if size > self.max_metadata_bytes:
                raise InvalidArgument(
                    f"{what} metadata is larger than {self.max_metadata_bytes} bytes"
                )
        return dict(metadata)

    def check_value_size(self, name: str, size: int, *, parsed: bool = False) -> None:
        """Refuse a value above its limit: ``parsed`` for values decoded element by element."""
        if size > self.max_value_bytes:
            raise ResourceExhausted(
                f"value of {name!r} takes {size} bytes, above the limit of "
                f"{self.max_value_bytes} bytes per value"
            )
        if parsed and size > self.max_parsed_value_bytes:
            raise ResourceExhausted(
                f"value of {name!r} takes {size} bytes, above the limit of "
                f"{self.max_parsed_value_bytes} bytes per string, list or map value "
                "(--max-parsed-value-bytes; store large data as bytes or a tensor)"
            )

    def check_session_growth(self, session_id: str, variables: int, total_bytes: int) -> None:
        """Refuse a write that would leave the session above its variable or byte limit."""
        if variables > self.max_variables:
            raise ResourceExhausted(
                f"session {session_id!r} would hold {variables} variables, above the limit of "
                f"{self.max_variables}"
            )
        if total_bytes > self.max_session_bytes:
            raise ResourceExhausted(
                f"session {session_id!r} would hold {total_bytes} bytes of values, above the "
                f"limit of {self.max_session_bytes}"
            )


DEFAULT_LIMITS = StoreLimits()


class WatcherSlots:
    """Watchers of one store instance, per session and in total, held to the limits.

    A feed takes a slot when it subscribes and gives it back exactly once when it ends, so a
    caller cannot open thousands of streams that each hold memory or a Redis connection.
    """

    def __init__(self, limits: StoreLimits) -> None:
        self.limits = limits
        self.total = 0
        self._by_session: dict[str, int] = {}

    def take(self, session_id: str) -> None:
        held = self._by_session.get(session_id, 0)
        if held >= self.limits.max_watchers_per_session:
            raise ResourceExhausted(
                f"session {session_id!r} already has {held} watchers, its limit "
                "(--max-watchers-per-session)"
            )
        if self.total >= self.limits.max_watchers:
            raise ResourceExhausted(
                f"this store already serves {self.total} watchers, its limit (--max-watchers)"
            )
        self._by_session[session_id] = held + 1
        self.total += 1

    def give_back(self, session_id: str) -> None:
        held = self._by_session.get(session_id, 0)
        if held <= 1:
            self._by_session.pop(session_id, None)
        else:
            self._by_session[session_id] = held - 1
        self.total -= 1
