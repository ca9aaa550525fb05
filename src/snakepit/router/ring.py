"""Consistent hashing of session ids over workers: HAProxy's ring, computed in Python.

One ring for every path a call can take. HAProxy (the router's native data path: ``balance
hdr(snakepit-session-id)``, ``hash-type consistent crc32``) hashes the session id with CRC-32 and
serves it from the ring node *closest* to that hash, on either side; each server owns
``16 * weight`` nodes at ``full_hash(id * 4096 + n)`` (HAProxy's lb_chash.c, Bob Jenkins' 32-bit
avalanche). The Python data path and direct-mode clients build the very same ring here, so a
session lands on the same worker whichever way its call goes (tests check it against a real
HAProxy).

Node positions depend only on a server's numeric id, so the id is derived from the worker's
name (``server_id``): two router replicas, or a router and a client, that see the same worker
names build the same ring without talking to each other. Adding or removing one worker moves only
the sessions that worker owned or takes over (and, when its id clashed with another worker's,
that worker's: the clash is resolved in name order, see ``server_ids``).

Ids are ``1..SERVER_SLOTS``: HAProxy's data path declares that many servers in its config and
gives a worker the one with its id (``router/haproxy/servers.py``); HAProxy 2.6 cannot
multiplex calls on a connection to a server added at run time (docs/architecture.md).
"""

from __future__ import annotations

import bisect
import math
import zlib
from collections.abc import Iterable, Iterator, Mapping

DEFAULT_VNODES = 64
HASH_NAME = "haproxy-chash-crc32-1024"
WEIGHT_SCALE = 16  # HAProxy's BE_WEIGHT_SCALE: ring nodes per unit of server weight
# lb_chash.c: a server's nodes sit at full_hash(puid * SRV_EWGHT_RANGE + node).
_EWGHT_RANGE = 256 * WEIGHT_SCALE
# Ids 1..SERVER_SLOTS: the servers HAProxy declares up front, so the most workers one router
# can send calls to. Stays below 2**19 so that id * 4096 + node fits HAProxy's 32-bit int.
SERVER_SLOTS = 1024
MAX_SERVER_ID = SERVER_SLOTS
_MASK = 0xFFFFFFFF


def full_hash(a: int) -> int:
    """HAProxy's ``full_hash`` (32-bit unsigned arithmetic throughout)."""
    a = ((a + 0x7ED55D16) + (a << 12)) & _MASK
    a = ((a ^ 0xC761C23C) ^ (a >> 19)) & _MASK
    a = ((a + 0x165667B1) + (a << 5)) & _MASK
    a = ((a + 0xD3A2646C) ^ (a << 9)) & _MASK
    a = ((a + 0xFD7046C5) + (a << 3)) & _MASK
    a = ((a ^ 0xB55A4F09) ^ (a >> 16)) & _MASK
    return (a * 3221225473) & _MASK


def key_hash(key: str) -> int:
    """``hash-type consistent crc32`` without a modifier: plain CRC-32 of the header value."""
    return zlib.crc32(key.encode())


def server_id(worker_id: str, taken: Iterable[int] = ()) -> int:
    """A worker's HAProxy server id: from its name, probing past ids already in use."""
    used = set(taken)
    if len(used) >= MAX_SERVER_ID:
        raise ValueError(f"more than {MAX_SERVER_ID} workers: every server id is taken")
    candidate = 1 + zlib.crc32(worker_id.encode()) % MAX_SERVER_ID
    while candidate in used:
        candidate = candidate % MAX_SERVER_ID + 1
    return candidate


def server_ids(worker_ids: Iterable[str]) -> dict[str, int]:
    """Ids for a set of workers, sorted first so that every replica resolves a clash alike."""
    ids: dict[str, int] = {}
    for worker in sorted(set(worker_ids)):
        ids[worker] = server_id(worker, ids.values())
    return ids


def weight_for(vnodes: int) -> int:
    """The HAProxy server weight that gives ``vnodes`` ring nodes (a multiple of 16)."""
    if vnodes <= 0 or vnodes % WEIGHT_SCALE:
        raise ValueError(f"vnodes must be a positive multiple of {WEIGHT_SCALE}, got {vnodes}")
    return vnodes // WEIGHT_SCALE


class HashRing:
    """The ring HAProxy builds for these workers, all with the weight ``vnodes / 16``."""

    __slots__ = ("_owners", "_points", "vnodes", "workers")

    def __init__(
        self,
        worker_ids: Iterable[str],
        vnodes: int = DEFAULT_VNODES,
        ids: Mapping[str, int] | None = None,
    ) -> None:
        self.vnodes = WEIGHT_SCALE * weight_for(vnodes)
        self.workers = tuple(sorted(set(worker_ids)))
        ids = ids if ids is not None else server_ids(self.workers)
        nodes = sorted(
            (full_hash(ids[worker] * _EWGHT_RANGE + n), worker)
            for worker in self.workers
            for n in range(self.vnodes)
        )
        self._points = [p for p, _ in nodes]
        self._owners = [w for _, w in nodes]

    def __len__(self) -> int:
        return len(self.workers)

    def candidates(self, key: str) -> Iterator[str]:
        """Distinct workers in the order HAProxy tries them: the closest node's, then onwards."""
        total = len(self._points)
        if not total:
            return
        h = key_hash(key)
        start = bisect.bisect_left(self._points, h) % total
        before = (start - 1) % total
        # eb32_lookup_ge, then HAProxy takes the node before when it is at least as close.
        if (h - self._points[before]) & _MASK <= (self._points[start] - h) & _MASK:
            start = before
        seen: set[str] = set()
        for offset in range(total):
            owner = self._owners[(start + offset) % total]
            if owner not in seen:
                seen.add(owner)
                yield owner
                if len(seen) == len(self.workers):
                    return

    def preferred(self, key: str) -> str | None:
        return next(self.candidates(key), None)


def load_bound(total_in_flight: int, workers: int, factor: float = 1.25) -> int:
    """The bounded-load cap: no worker takes a new call while above ``factor`` times the mean.

    From "Consistent Hashing with Bounded Loads" (Mirrokni, Thorup, Zadimoghaddam): it keeps a
    busy session's calls from piling onto one worker while the others idle. HAProxy applies the
    same rule as ``hash-balance-factor 125``.
    """
    if workers <= 0:
        return 0
    return max(1, math.ceil(factor * (total_in_flight + 1) / workers))
