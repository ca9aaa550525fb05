"""What the router does after a worker refuses or fails one attempt of a call.

Only a call that certainly never ran may be sent again (``never_started``); how it is sent again
depends on why it did not run:

- the worker is **full** (RESOURCE_EXHAUSTED, ``not_started``): its backlog was full or the wait
  in it ran out, usually because other router replicas fill it too. That is load, not a fault,
  so the call waits and tries again (exponential backoff, the same worker allowed) for as long as
  the router's own queue timeout and the call's deadline allow: load above capacity waits, it is
  not refused, whichever replica a call comes through;
- the worker is **draining** (UNAVAILABLE, ``not_started``): it is leaving, so the call goes to
  another worker at once, and the worker leaves this router's ring without waiting for its
  health stream to say so;
- the connection **could not be made**: the worker leaves the ring until its health stream comes
  back, and the call goes elsewhere, a few times at most (``MAX_FAULTS``).

Anything else, and any failure of a call that may have started, goes back to the caller as it
came: running a tool twice is worse than one clear error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import Enum

import grpc

from ..errors import SnakepitError
from ..protocol.status import never_started

# Attempts lost to faults (no connection) before the call fails; refusals do not count.
MAX_FAULTS = 3
# A bound on attempts of any kind, so no bug can turn one call into a busy loop.
MAX_ATTEMPTS = 64
FIRST_BACKOFF = 0.005
MAX_BACKOFF = 0.2


class Next(Enum):
    GIVE_UP = "give up"
    ELSEWHERE = "another worker, now"
    LATER = "any worker, after a backoff"


@dataclass
class Attempts:
    """One call's tries: the workers it must avoid right now (those it could not reach; only
    when a worker is free at once, never while it waits in the queue) and how long it may keep
    waiting."""

    wait_budget: float  # the router's queue timeout: how long load may delay this call
    started: float = field(default_factory=time.monotonic)
    avoid: list[str] = field(default_factory=list)
    faults: int = 0
    count: int = 0
    backoff: float = FIRST_BACKOFF

    def after(self, error: SnakepitError, worker_id: str, time_remaining: float | None) -> Next:
        """Decide the next step after ``worker_id`` failed with ``error``; record it."""
        self.count += 1
        if not never_started(error) or self.count >= MAX_ATTEMPTS:
            return Next.GIVE_UP
        if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return self._later(time_remaining)
        if error.code != grpc.StatusCode.UNAVAILABLE or not error.not_started:
            self.faults += 1
            if self.faults >= MAX_FAULTS:
                return Next.GIVE_UP
            self.avoid.append(worker_id)
        # A draining worker is not avoided by id: it leaves the ring (the router marks it), and a
        # replacement that comes back under the same id (`snakepit serve`, a restarted process)
        # must be usable at once.
        return Next.ELSEWHERE

    def _later(self, time_remaining: float | None) -> Next:
        self.backoff = min(self.backoff * 2, MAX_BACKOFF)
        waited = time.monotonic() - self.started
        if waited + self.backoff > self.wait_budget:
            return Next.GIVE_UP
        if time_remaining is not None and time_remaining <= self.backoff:
            return Next.GIVE_UP
        return Next.LATER
