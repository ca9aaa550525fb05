"""The decision loop: read the load, decide with the policy, apply; the same for serve and operator.

Reading and applying are given as callables, so the loop knows neither processes nor Kubernetes:
``snakepit serve`` reads its in-process router and starts or stops worker processes; the
operator reads every router replica and writes the pool's status. A wake-up (calls held with no
ready worker) runs a round at once instead of waiting for the next period.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .policy import Decision, Policy, Sample, decide, trim

log = logging.getLogger("snakepit.autoscale")

DEFAULT_PERIOD = 1.0


@dataclass(frozen=True)
class Round:
    """One round of the loop, for logs, status and plots."""

    sample: Sample
    current: int
    decision: Decision


class ScaleLoop:
    def __init__(
        self,
        policy: Policy,
        read: Callable[[], Awaitable[tuple[float, bool]]],
        apply: Callable[[Decision, Sample], Awaitable[None]],
        current: int,
        *,
        period: float = DEFAULT_PERIOD,
        clock: Callable[[], float] = time.monotonic,
        on_round: Callable[[Round], None] | None = None,
    ) -> None:
        self.policy = policy
        self.current = current
        self.period = period
        self.last = Decision(current, "starting")
        self.history: list[Sample] = []
        self._read = read
        self._apply = apply
        self._clock = clock
        self._on_round = on_round
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Run a round now (calls are waiting with no worker to run them)."""
        self._wake.set()

    async def step(self) -> Round:
        load, complete = await self._read()
        now = self._clock()
        sample = Sample(now, load, complete)
        self.history.append(sample)
        trim(self.history, now, self.policy)
        decision = decide(self.policy, self.history, self.current, now)
        previous = self.current
        if decision.changes(previous):
            log.info(
                "scaling %d -> %d: %s",
                previous,
                decision.desired,
                decision.reason,
                extra={"load": load, "complete": complete},
            )
            await self._apply(decision, sample)
            self.current = decision.desired
        self.last = decision
        round_ = Round(sample, previous, decision)
        if self._on_round is not None:
            self._on_round(round_)
        return round_

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except asyncio.CancelledError:
                raise
            except Exception:  # one failed round (an API error) must not end autoscaling
                log.exception("autoscaling round failed")
            try:
                async with asyncio.timeout(self.period):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
