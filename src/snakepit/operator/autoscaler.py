"""The operator's autoscaler: one decision loop per pool that has ``spec.autoscaling``.

It reads, decides and writes, nothing else:

- reads the pool's router replicas from the EndpointSlices of ``<pool>-router`` (the same watch
  a router uses to find its workers) and each one's load over gRPC (``autoscale.routers``);
  a router holding calls with no ready worker is heard at once through its health stream;
- decides with the pure policy (``autoscale.policy``) in the shared loop (``autoscale.loop``);
- writes ``status.desiredReplicas``, ``lastScaleTime`` and ``lastScaleReason`` (merge patch on
  the status subresource), posts an Event, and enqueues the pool: its next reconcile pass sizes
  the worker Deployment from the status, like every other child, by server-side apply.

Keeping the decision in status (not in ``spec.replicas``) leaves the spec to its owner: the
scale subresource and ``kubectl scale`` still write ``spec.replicas``, which counts again as
soon as ``spec.autoscaling`` is removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from ..autoscale.loop import Round, ScaleLoop
from ..autoscale.policy import Decision, Policy, Sample, default_target
from ..autoscale.routers import RouterSet
from ..metrics import OperatorMetrics
from ..router.discovery import Discovery, EndpointSliceDiscovery
from .builders import Names
from .builders.tls import HEALTH_PORT
from .children import PoolKey
from .kube import ApiError, Kube, now_rfc3339
from .spec import API_VERSION, KIND, Pool, PoolSpec, SpecError, parse_pool

log = logging.getLogger("snakepit.operator")

DiscoveryFactory = Callable[[Pool], Discovery]


def policy_for(spec: PoolSpec) -> Policy:
    """The policy of a pool's ``spec.autoscaling`` (which must be set)."""
    scaling = spec.autoscaling
    assert scaling is not None
    return Policy(
        min_replicas=scaling.min_replicas,
        max_replicas=scaling.max_replicas,
        target_per_worker=scaling.target_load_per_worker or default_target(spec.worker_concurrency),
        scale_up_seconds=scaling.scale_up_window_seconds,
        scale_down_seconds=scaling.scale_down_window_seconds,
        idle_seconds=scaling.scale_to_zero_after_seconds,
    )


def router_discovery(pool: Pool) -> Discovery:
    return EndpointSliceDiscovery(Names(pool.name).router, pool.namespace)


def router_reading(spec: PoolSpec) -> dict[str, int | None]:
    """How the autoscaler reads a pool's routers (autoscale/routers.py): a secured router (TLS
    or auth on, the defaults) answers GetPoolStatus only to its callers, so its load comes from
    its public /metrics, and with TLS its health stream from the plaintext health port."""
    secured = spec.tls.enabled or spec.auth.enabled
    return {
        "metrics_port": spec.metrics.port if secured and spec.metrics.enabled else None,
        "health_port": HEALTH_PORT if spec.tls.enabled else None,
    }


def scale_status(desired: int, reason: str, now: str) -> dict[str, Any]:
    return {"desiredReplicas": desired, "lastScaleTime": now, "lastScaleReason": reason[:1024]}


class PoolAutoscaler:
    def __init__(
        self,
        pool: Pool,
        kube: Kube,
        enqueue: Callable[[PoolKey], None],
        *,
        period: float,
        discovery: Discovery,
        clock: Callable[[], str] = now_rfc3339,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.key: PoolKey = (pool.namespace, pool.name)
        self.metrics = metrics
        self.kube = kube
        self._enqueue = enqueue
        self._clock = clock
        self._ref = {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": pool.name, "namespace": pool.namespace, "uid": pool.uid},
        }
        self._recorded = pool.desired_replicas
        self.discovery = discovery
        reading = router_reading(pool.spec)
        if (pool.spec.tls.enabled or pool.spec.auth.enabled) and reading["metrics_port"] is None:
            log.warning(
                "pool %s/%s: secured routers with spec.metrics.enabled false: the autoscaler "
                "cannot read their load (it grows on a held call, never shrinks)",
                pool.namespace,
                pool.name,
            )
        self.routers = RouterSet(on_starved=self.wake, **reading)
        self.loop = ScaleLoop(
            policy_for(pool.spec),
            self.routers.read,
            self._apply,
            pool.worker_replicas,
            period=period,
            on_round=self._on_round,
        )

    def _on_round(self, round_: Round) -> None:
        if self.metrics is not None:
            sample = round_.sample
            self.metrics.autoscale_round(
                self.key, sample.load, sample.complete, round_.current, round_.decision.desired
            )

    def wake(self) -> None:
        self.loop.wake()

    def update(self, pool: Pool) -> None:
        """A new spec: the next round decides with the new limits and windows."""
        self.loop.policy = policy_for(pool.spec)

    def _publish_routers(self, routers: Mapping[str, str]) -> None:
        self.routers.set_routers(routers.values())
        log.info("autoscaler of %s/%s reads %d routers", *self.key, len(routers))

    async def run(self) -> None:
        try:
            if self._recorded is None:  # make the starting size visible (kubectl get -o wide)
                await self._write(self.loop.current, "autoscaling started")
            async with asyncio.TaskGroup() as group:
                group.create_task(self.discovery.run(self._publish_routers))
                group.create_task(self.loop.run())
        finally:
            await self.routers.close()

    async def _apply(self, decision: Decision, sample: Sample) -> None:
        previous = self.loop.current
        await self._write(decision.desired, decision.reason)
        direction = "ScaledUp" if decision.desired > previous else "ScaledDown"
        message = f"workers {previous} -> {decision.desired}: {decision.reason}"
        try:
            await self.kube.event(self._ref, "Normal", direction, message)
        except ApiError as exc:  # an event is a courtesy
            log.warning("could not post event %s: %s", direction, exc)

    async def _write(self, desired: int, reason: str) -> None:
        await self.kube.patch_status(self._ref, scale_status(desired, reason, self._clock()))
        self._recorded = desired
        self._enqueue(self.key)


class Autoscalers:
    """Starts, updates and stops the per-pool loops as pool events come in."""

    def __init__(
        self,
        kube: Kube,
        enqueue: Callable[[PoolKey], None],
        *,
        period: float = 1.0,
        discovery: DiscoveryFactory = router_discovery,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.kube = kube
        self.metrics = metrics
        self._enqueue = enqueue
        self.period = period
        self._discovery = discovery
        self.pools: dict[PoolKey, PoolAutoscaler] = {}
        self._tasks: dict[PoolKey, asyncio.Task[None]] = {}
        # Created inside the operator's event loop; kopf runs sync handlers in worker threads,
        # so ``observe`` hands its decision over to this loop.
        self._loop = asyncio.get_running_loop()

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> None:
        """A pool event (from any thread): start, update or stop that pool's loop."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        pool: Pool | None = None
        if event_type != "DELETED" and not meta.get("deletionTimestamp"):
            try:
                pool = parse_pool(body)
            except (SpecError, KeyError, TypeError, ValueError):
                return  # the reconciler reports the invalid spec
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._follow(key, pool)
        else:
            self._loop.call_soon_threadsafe(self._follow, key, pool)

    def _follow(self, key: PoolKey, pool: Pool | None) -> None:
        if pool is None or pool.spec.autoscaling is None:
            self.stop(key)
        elif key in self.pools:
            self.pools[key].update(pool)
        else:
            self._start(key, pool)

    def _start(self, key: PoolKey, pool: Pool) -> None:
        scaler = PoolAutoscaler(
            pool,
            self.kube,
            self._enqueue,
            period=self.period,
            discovery=self._discovery(pool),
            metrics=self.metrics,
        )
        self.pools[key] = scaler
        task = asyncio.get_running_loop().create_task(scaler.run(), name=f"autoscale {key}")
        self._tasks[key] = task
        task.add_done_callback(lambda t: self._ended(key, t))
        log.info("autoscaling %s/%s", *key)

    def _ended(self, key: PoolKey, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]
            del self.pools[key]
        if not task.cancelled() and task.exception() is not None:
            log.error("autoscaler of %s/%s stopped", *key, exc_info=task.exception())

    def stop(self, key: PoolKey) -> None:
        task = self._tasks.pop(key, None)
        self.pools.pop(key, None)
        if task is not None:
            task.cancel()
            log.info("autoscaling of %s/%s stopped", *key)
        if self.metrics is not None:
            self.metrics.autoscale_gone(key)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
