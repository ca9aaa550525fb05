"""A deduplicating work queue of pool keys, like client-go's rate-limited workqueue.

Many events (a pool edit, each status change of its Deployments, a deleted Service, the
periodic resync) all mean the same thing: "reconcile this pool". The queue collapses them so
one pool is reconciled by at most one worker at a time, a key added while it is being
processed is processed once more afterwards (never lost, never concurrent), and failures are
retried with per-key exponential backoff.

``add`` may be called from any thread. The operator's kopf handlers are coroutines, so they call
it on the loop; but kopf runs synchronous handlers in its executor's threads, and asyncio's
primitives are not thread-safe, so a call from off the queue's event loop hands the key over
with ``call_soon_threadsafe``. Done directly, the worker's wake-up would wait for the loop's
next unrelated wake-up, or be lost to a race with ``get``. (That was suspected of making
autoscaling decisions reach the Deployment 24-39 s late; the cause was elsewhere: the controller
replaced the operator's empty, hence falsy, queue with its own, see ``Controller``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

log = logging.getLogger("snakepit.operator")


class WorkQueue(Generic[K]):
    def __init__(self, base_delay: float = 0.5, max_delay: float = 60.0) -> None:
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._ready: deque[K] = deque()
        self._queued: set[K] = set()
        self._processing: set[K] = set()
        self._dirty: set[K] = set()
        self._failures: dict[K, int] = {}
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._wakeup = asyncio.Event()
        # The loop the workers run on, known once one asks for work (see ``add``).
        self._loop: asyncio.AbstractEventLoop | None = None

    def __len__(self) -> int:
        return len(self._ready)

    @property
    def processing(self) -> int:
        return len(self._processing)

    def add(self, key: K) -> None:
        """Schedule ``key`` now; a no-op when it is already waiting. Safe from any thread."""
        loop = self._loop
        if loop is not None and not _running_in(loop):
            # A closed loop (the operator is stopping) has nobody left to process the key.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(self._add, key)
            return
        self._add(key)

    def _add(self, key: K) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        if key in self._processing:
            self._dirty.add(key)
        elif key not in self._queued:
            self._queued.add(key)
            self._ready.append(key)
            self._wakeup.set()

    def add_after(self, key: K, delay: float) -> None:
        """Schedule ``key`` in ``delay`` seconds unless something schedules it sooner."""
        if key in self._queued or key in self._timers:
            return
        loop = asyncio.get_running_loop()
        self._timers[key] = loop.call_later(delay, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        self.add(key)

    async def get(self) -> K:
        """The next key to process; it is not handed out again until ``done``."""
        self._loop = asyncio.get_running_loop()
        while not self._ready:
            self._wakeup.clear()
            await self._wakeup.wait()
        key = self._ready.popleft()
        self._queued.discard(key)
        self._processing.add(key)
        return key

    def done(self, key: K) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._dirty.discard(key)
            self.add(key)

    def retry(self, key: K) -> float:
        """Schedule a failed key again after its backoff; returns the delay."""
        failures = self._failures.get(key, 0)
        self._failures[key] = failures + 1
        delay: float = min(self.base_delay * (2**failures), self.max_delay)
        self.add_after(key, delay)
        return delay

    def forget(self, key: K) -> None:
        """Reset the backoff of a key that succeeded."""
        self._failures.pop(key, None)

    def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()


def _running_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # no loop in this thread: one of kopf's handler threads
        return False


async def run_worker(queue: WorkQueue[K], handle: Callable[[K], Awaitable[None]]) -> None:
    """Process keys forever; an exception retries the key with backoff, never kills the loop."""
    while True:
        key = await queue.get()
        try:
            await handle(key)
        except Exception as exc:
            delay = queue.retry(key)
            log.warning("reconcile of %s failed, retrying in %.1fs: %s", key, delay, exc)
        else:
            queue.forget(key)
        finally:
            queue.done(key)
