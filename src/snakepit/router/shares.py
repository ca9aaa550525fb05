"""Calls in flight per principal, so one caller cannot hold every worker slot of the pool.

Without it, a caller that sends as many long calls as the pool has slots makes every other
caller wait until those calls end (the "slot hogging" finding of the security review): each call
is legitimate and within ``--max-call-seconds``; only their number hurts. With
``--max-calls-per-principal N`` a router lets at most N calls of one principal run at once; the
rest wait in that principal's own FIFO line (bounded by the pool's queue size and queue timeout,
like the pool queue behind it), so the other principals' calls go straight to free slots.

The count is per router replica (each router only sees its own calls): with R replicas a
principal may hold up to R x N slots. With auth off every caller is the one ``anonymous``
principal, so the limit caps the pool's calls as a whole; it is off (0) by default for that
reason, and the security guide says when to set it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field

from ..errors import DeadlineExceeded, ResourceExhausted


@dataclass(slots=True)
class _Share:
    running: int = 0
    waiting: deque[asyncio.Future[None]] = field(default_factory=deque)


class PrincipalShares:
    """At most ``limit`` calls per principal at once, the rest waiting in line. Callers check
    ``limit`` first (0: no limit) so the common case costs the call path nothing."""

    def __init__(self, limit: int, *, queue_size: int, queue_timeout: float) -> None:
        self.limit = limit
        self.queue_size = queue_size
        self.queue_timeout = queue_timeout
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

    async def _wait(self, principal: str, share: _Share, time_remaining: float | None) -> None:
        if len(share.waiting) >= self.queue_size:
            raise ResourceExhausted(
                f"principal {principal!r} has {share.running} calls running and "
                f"{len(share.waiting)} waiting on this router, its most "
                f"(--max-calls-per-principal {self.limit})"
            )
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        share.waiting.append(waiter)
        wait = (
            self.queue_timeout
            if time_remaining is None
            else min(time_remaining, self.queue_timeout)
        )
        try:
            async with asyncio.timeout(wait):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # handed a slot in the same instant the wait ran out
            raise DeadlineExceeded(
                f"waited {wait:.3g}s for one of principal {principal!r}'s "
                f"{self.limit} call slots on this router (--max-calls-per-principal)"
            ) from None
        except BaseException:
            if waiter.done() and not waiter.cancelled():
                self.release(principal)  # the caller left just as its slot came
            raise
        finally:
            if not waiter.done():
                waiter.cancel()
                share.waiting.remove(waiter)
