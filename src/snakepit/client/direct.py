"""Direct mode: the client routes tool calls to workers itself, with the router's own ring.

The router publishes its worker set (``GetRoutingTable``); a client that can reach the workers
hashes each session id on the same ring and skips the proxy hop. Its load view is its own calls
only, so bounded load here means "not above the worker's concurrency from this client".
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable

from ..protocol import pb
from ..router.ring import HashRing
from ..security.tickets import TICKET_KEY

REFRESH_SECONDS = 10.0
MAX_ATTEMPTS = 3


class DirectRoutes:
    def __init__(self, table: pb.RoutingTable) -> None:
        self.addresses = {entry.worker_id: entry.address for entry in table.workers}
        self.ring = HashRing(self.addresses, table.vnodes or 64)
        self.version = table.version
        self.concurrency = max(1, table.worker_concurrency)
        self.in_flight: dict[str, int] = dict.fromkeys(self.addresses, 0)
        self.fetched_at = time.monotonic()
        # With auth on: what proves the caller to workers (never its own credential).
        self.credentials: tuple[tuple[str, str], ...] = (
            ((TICKET_KEY, table.ticket),) if table.ticket else ()
        )
        self._ticket_left = table.ticket_expires_at - time.time() if table.ticket else None
        self._turn = itertools.count()

    @property
    def stale(self) -> bool:
        """Time to fetch the table again: every few seconds, and well before the ticket ends."""
        age = time.monotonic() - self.fetched_at
        if self._ticket_left is not None and age > self._ticket_left / 2:
            return True
        return age > REFRESH_SECONDS

    def acquire(self, session_id: str, exclude: Iterable[str] = ()) -> str | None:
        """Choose a worker and count the call on it until ``release``."""
        worker = self.choose(session_id, exclude)
        if worker is not None:
            self.in_flight[worker] += 1
        return worker

    def release(self, worker: str) -> None:
        self.in_flight[worker] -= 1

    def choose(self, session_id: str, exclude: Iterable[str] = ()) -> str | None:
        """A worker id for the call: the session's ring order, or the least loaded without one."""
        excluded = set(exclude)
        if session_id:
            fallback = None
            for worker in self.ring.candidates(session_id):
                if worker in excluded:
                    continue
                if self.in_flight[worker] < self.concurrency:
                    return worker
                fallback = fallback or worker
            return fallback
        workers = [w for w in self.ring.workers if w not in excluded]
        if not workers:
            return None
        start = next(self._turn) % len(workers)
        rotated = workers[start:] + workers[:start]
        return min(rotated, key=self.in_flight.__getitem__)
