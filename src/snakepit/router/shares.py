"""Calls in flight per principal, so one caller cannot hold every worker slot of the pool.

Without it, a caller that sends as many long calls as the pool has slots makes every other
caller wait until those calls end (the "slot hogging" finding of the security review): each call
is legitimate and within ``--max-call-seconds``; only their number hurts. With
``--max-calls-per-principal N`` a router lets at most N calls of one principal run at once; the
rest wait in that principal's own FIFO line (bounded by the pool's queue size and queue timeout,
like the pool queue behind it), so the other principals' calls go straight to free slots.

The count is per router replica (each router only sees its own calls): with R replicas a
principal may hold up to R x N slots. On the HAProxy data path HAProxy keeps the same share
for the calls it carries, in one count with this router's (``haproxy/principal_shares``,
``haproxy/share_sync``). With auth off every caller is the one ``anonymous``
principal, so the limit caps the pool's calls as a whole; it is off (0) by default for that
reason, and the security guide says when to set it.

The same mechanism bounds each principal's store RPCs in flight on a router
(``--max-store-calls-per-principal``, ``store.service``): there it is the event loop, not a
worker slot, that one caller's flood would otherwise fill.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import DeadlineExceeded, ResourceExhausted

# Store RPCs one authenticated principal may have in flight on a router (docs/security.md):
# enough for a busy client's pipelining, few enough that another caller's small call waits
# behind at most this many of a flooder's requests on the event loop.
DEFAULT_STORE_CALLS_PER_PRINCIPAL = 8


@dataclass(slots=True)
class _Share:
    running: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class PrincipalShares:
    """At most ``limit`` calls per principal at once, the rest waiting in line. Callers check
    ``limit`` first (0: no limit) so the common case costs the call path nothing."""

    def __init__(
        self,
        limit: int,
        *,
        queue_size: int,
        queue_timeout: float,
        flag: str = "--max-calls-per-principal",
        what: str = "calls",
    ) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
        self.flag = flag  # named in refusals, so the caller knows which limit it met
        self.what = what
        self._shares: dict[str, _Share] = {}

    async def acquire(self, principal: str, time_remaining: float | None) -> bool:
        """Take one of ``principal``'s slots, waiting in its line when all are taken (True when
        it waited); the caller must ``release`` it. Raises ResourceExhausted (line full) or
        DeadlineExceeded."""
        share = self._shares.get(principal)
        if share is None:
            share = self._shares[principal] = _Share()
        if share.running < self.limit and not share.waiting:
            share.running += 1
            return False
        await self._wait(principal, share, time_remaining)
        return True

    def release(self, principal: str) -> None:
        """Hand the slot to the next in line, or give it back."""
        share = self._shares[principal]
        while share.waiting:
            waiter = share.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
        share.running -= 1
        if not share.running:
            del self._shares[principal]

    def line_full(self, principal: str, running: int, waiting: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"principal {principal!r} has {running} {self.what} running and "
            f"{waiting} waiting on this router, its most "
            f"({self.flag} {self.limit}, --queue-size {self.queue_size})"
        )

    def waited_out(self, principal: str, wait: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"waited {wait:.3g}s for one of principal {principal!r}'s "
            f"{self.limit} slots for {self.what} on this router ({self.flag})"
        )

    def longest_wait(self, time_remaining: float | None) -> float:
        """How long a call may wait in its principal's line: the queue timeout or its deadline."""
        if time_remaining is None:
            return self.queue_timeout
        return min(time_remaining, self.queue_timeout)

    async def _wait(self, principal: str, share: _Share, time_remaining: float | None) -> None:
        if len(share.waiting) >= self.queue_size:
            raise self.line_full(principal, share.running, len(share.waiting))
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        share.waiting.append(waiter)
        wait = self.longest_wait(time_remaining)
        try:
            async with asyncio.timeout(wait):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # handed a slot in the same instant the wait ran out
            raise self.waited_out(principal, wait) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(principal)  # the caller left just as its slot came
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
                share.waiting.remove(waiter)


# Store calls per second one authenticated principal may start on a router, on average (a
# second's worth at once): far above what a session's tools and its client do (the 32-session
# e2e load makes ~300 a second in all), far below what a router's event loop can answer, so one
# principal's flood leaves the loop to the others (docs/security.md, "Fair shares").
DEFAULT_STORE_CALL_RATE_PER_PRINCIPAL = 500.0
# Principals whose rate is remembered; the least recently seen is forgotten first (it then
# starts again with a full second's allowance, which only errs towards the caller).
RATE_PRINCIPALS = 10_000


class PrincipalRates:
    """At most ``rate`` calls a second per principal on average and a second's worth at once
    (a token bucket). A call over it waits for its turn on a timer, which costs the event loop
    nothing, so a flood's calls are spread out instead of answered back to back; a call whose
    turn would come after its deadline or ``max_wait`` is refused at once."""

    def __init__(
        self,
        rate: float,
        *,
        max_wait: float,
        flag: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate
        self.max_wait = max_wait
        self.flag = flag
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def reserve(self, principal: str, time_remaining: float | None) -> float:
        """Take ``principal``'s next turn: how long to wait for it (0: now). Raises
        ResourceExhausted when that is longer than the call may wait."""
        now = self._clock()
        tokens, then = self._buckets.pop(principal, (self.rate, now))
        tokens = min(self.rate, tokens + (now - then) * self.rate)
        delay = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        limit = self.max_wait if time_remaining is None else min(self.max_wait, time_remaining)
        if delay > limit:
            self._remember(principal, tokens, now)
            raise ResourceExhausted(
                f"principal {principal!r} is over its {self.rate:g} store calls a second on "
                f"this router ({self.flag}): its next turn is {delay:.3g}s away, "
                f"longer than the call may wait ({limit:.3g}s)"
            )
        self._remember(principal, tokens - 1, now)
        return delay

    async def wait(self, principal: str, time_remaining: float | None) -> None:
        delay = self.reserve(principal, time_remaining)
        if delay > 0:
            await asyncio.sleep(delay)

    def _remember(self, principal: str, tokens: float, now: float) -> None:
        self._buckets[principal] = (tokens, now)
        if len(self._buckets) > RATE_PRINCIPALS:
            self._buckets.popitem(last=False)
