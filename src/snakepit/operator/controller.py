"""Turns watch events into work: which pool to reconcile, by how many workers, how often.

Pool events and child events only enqueue the pool's key; the workers run reconcile passes;
a resync re-enqueues every known pool periodically, catching what no watch reports (e.g. the
store password Secret, which is deliberately not watched: watching Secrets needs list access
to every Secret in the namespace).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

from ..metrics import OperatorMetrics
from .autoscaler import Autoscalers
from .children import Children, PoolKey
from .reconciler import Reconciler
from .tokenreviewers import TokenReviewers
from .workqueue import WorkQueue, run_worker

log = logging.getLogger("snakepit.operator")


def pool_needs_pass(event_type: str | None, body: Mapping[str, Any]) -> bool:
    """Whether a pool event can change the desired state.

    Our own status writes come back as events too; those (generation already observed) are
    skipped, so a pass does not trigger the next one.
    """
    if event_type == "DELETED":
        return False
    meta = body.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return False
    status = body.get("status") or {}
    return (
        event_type in (None, "ADDED")
        or status.get("observedGeneration") != meta.get("generation")
        or not status.get("conditions")
    )


class Controller:
    def __init__(
        self,
        reconciler: Reconciler,
        children: Children,
        queue: WorkQueue[PoolKey] | None = None,
        resync_seconds: float = 60.0,
        workers: int = 4,
        metrics: OperatorMetrics | None = None,
        autoscalers: Autoscalers | None = None,
        tokenreviewers: TokenReviewers | None = None,
    ) -> None:
        self.reconciler = reconciler
        self.children = children
        # Not ``queue or WorkQueue()``: a WorkQueue has a length, so the operator's queue, still
        # empty when handed over, is falsy; a fresh one here would leave the autoscaler adding
        # keys to a queue nobody reads (its decisions then waited for the next resync).
        self.queue: WorkQueue[PoolKey] = WorkQueue() if queue is None else queue
        self.resync_seconds = resync_seconds
        self.workers = workers
        self.known: set[PoolKey] = set()
        self.metrics = metrics
        if metrics is not None:
            queue = self.queue
            metrics.bind(lambda: len(queue), lambda: queue.processing)
        self.autoscalers = autoscalers
        self.tokenreviewers = tokenreviewers

    def on_pool_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        if self.autoscalers is not None:
            self.autoscalers.observe(event_type, body)
        if self.tokenreviewers is not None and (
            event_type == "DELETED" or pool_needs_pass(event_type, body)
        ):
            self.tokenreviewers.touch()  # a pool came, went or changed its spec
        if event_type == "DELETED":
            self.known.discard(key)
            self.reconciler.forget(key)
            if self.metrics is not None:
                self.metrics.pool_gone(key)
            self.queue.add(key)  # one pass that finds it gone drops its certificate keys
            return
        self.known.add(key)
        if pool_needs_pass(event_type, body):
            self.queue.add(key)

    def on_child_event(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        key = self.children.observe(event_type, body)
        if key is not None and key in self.known:
            self.queue.add(key)

    async def _pass(self, key: PoolKey) -> None:
        started = time.monotonic()
        try:
            result = await self.reconciler.reconcile(key)
        except Exception:
            if self.metrics is not None:
                self.metrics.pass_done(key, "error", started)
            raise
        if self.metrics is not None:
            self.metrics.pass_done(key, "skipped" if result is None else "success", started)
            if result is not None:
                self.metrics.applied.inc(result.applied)
                self.metrics.pruned.inc(result.pruned)
                self.metrics.pool_seen(key, result.conditions)
        if result is not None and result.requeue_after is not None:
            self.queue.add_after(key, result.requeue_after)
        if result is not None:
            log.info(
                "reconciled %s/%s in %.0f ms: %d applied, %d unchanged, %d pruned",
                *key,
                (time.monotonic() - started) * 1000,
                result.applied,
                result.unchanged,
                result.pruned,
            )

    async def _resync(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            for key in list(self.known):
                self.queue.add(key)

    async def run(self) -> None:
        """Run the workers and the resync until cancelled; any crash of them propagates."""
        async with asyncio.TaskGroup() as group:
            for _ in range(self.workers):
                group.create_task(run_worker(self.queue, self._pass))
            group.create_task(self._resync())
            if self.tokenreviewers is not None:
                group.create_task(self.tokenreviewers.run())
