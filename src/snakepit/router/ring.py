"""Consistent hashing of session ids over workers.

Pure and deterministic: two routers (or a router and a direct-mode client) that see the same
worker ids build the same ring and prefer the same worker for a session without talking to each
other. Each worker owns ``vnodes`` points at ``blake2b-64(f"{worker_id}#{i}")`` (big-endian); a
key is served by the first point clockwise from ``blake2b-64(key)``. Adding or removing one
worker moves only the sessions that worker owned or takes over.
"""

from __future__ import annotations

import bisect
import hashlib
import math
from collections.abc import Iterable, Iterator

DEFAULT_VNODES = 64
HASH_NAME = "blake2b-64"


def hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


class HashRing:
    __slots__ = ("_owners", "_points", "vnodes", "workers")

    def __init__(self, worker_ids: Iterable[str], vnodes: int = DEFAULT_VNODES) -> None:
        self.vnodes = vnodes
        self.workers = tuple(sorted(set(worker_ids)))
        points = sorted(
            (hash64(f"{worker}#{i}"), worker) for worker in self.workers for i in range(vnodes)
        )
        self._points = [p for p, _ in points]
        self._owners = [w for _, w in points]

    def __len__(self) -> int:
        return len(self.workers)

    def candidates(self, key: str) -> Iterator[str]:
        """Distinct workers in ring order from ``key``'s position: the preferred one first."""
        if not self._points:
            return
        start = bisect.bisect_left(self._points, hash64(key))
        seen: set[str] = set()
        total = len(self._points)
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
    busy session's calls from piling onto one worker while the others idle.
    """
    if workers <= 0:
        return 0
    return max(1, math.ceil(factor * (total_in_flight + 1) / workers))
