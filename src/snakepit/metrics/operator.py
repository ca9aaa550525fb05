"""The operator's metrics: reconcile passes by result, their duration, applies and prunes,
the work queue, pools by condition and each pool's last successful pass."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.registry import Collector

from .common import gauge_family, zero

PREFIX = "snakepit_operator"
PASS_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class OperatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.passes = Counter(
            f"{PREFIX}_reconcile_passes", "Reconcile passes, by result (success, error, skipped)",
            ["result"], registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            f"{PREFIX}_reconcile_duration_seconds", "Duration of reconcile passes, by result",
            ["result"], buckets=PASS_BUCKETS, registry=r,
        )  # fmt: skip
        self.applied = Counter(
            f"{PREFIX}_applied_objects", "Child objects written by server-side apply", registry=r
        )
        self.pruned = Counter(
            f"{PREFIX}_pruned_objects", "Child objects deleted because the spec dropped them",
            registry=r,
        )  # fmt: skip
        self.last_success = Gauge(
            f"{PREFIX}_last_success_timestamp_seconds", "Unix time of a pool's last clean pass",
            ["namespace", "pool"], registry=r,
        )  # fmt: skip
        self.scale_decisions = Counter(
            f"{PREFIX}_autoscale_decisions", "Autoscaler size changes, by direction (up, down)",
            ["direction"], registry=r,
        )  # fmt: skip
        self.scale_desired = Gauge(
            f"{PREFIX}_autoscale_desired_replicas", "Workers the autoscaler wants, per pool",
            ["namespace", "pool"], registry=r,
        )  # fmt: skip
        self.scale_load = Gauge(
            f"{PREFIX}_autoscale_load", "Calls in flight plus queued over the routers at the last "
            "reading (a lower bound when not every router answered)",
            ["namespace", "pool"], registry=r,
        )  # fmt: skip
        self.scale_complete = Gauge(
            f"{PREFIX}_autoscale_reading_complete", "1 when every router answered the last reading",
            ["namespace", "pool"], registry=r,
        )  # fmt: skip
        zero(self.passes, ("success", "error", "skipped"))
        zero(self.scale_decisions, ("up", "down"))
        # (namespace, pool) -> {condition type: "True"/"False"/"Unknown"}
        self.conditions: dict[tuple[str, str], Mapping[str, str]] = {}

    def bind(self, queue_depth: Callable[[], int], processing: Callable[[], int]) -> None:
        self.registry.register(_OperatorState(self, queue_depth, processing))

    def pass_done(self, key: tuple[str, str], result: str, started: float) -> None:
        self.passes.labels(result).inc()
        self.duration.labels(result).observe(time.monotonic() - started)
        if result == "success":
            self.last_success.labels(*key).set(time.time())

    def pool_seen(self, key: tuple[str, str], conditions: Mapping[str, str]) -> None:
        self.conditions[key] = dict(conditions)

    def pool_gone(self, key: tuple[str, str]) -> None:
        self.conditions.pop(key, None)
        with contextlib.suppress(KeyError):
            self.last_success.remove(*key)
        self.autoscale_gone(key)

    def autoscale_round(
        self, key: tuple[str, str], load: float, complete: bool, current: int, desired: int
    ) -> None:
        """One reading of an autoscaled pool and what the policy made of it."""
        self.scale_load.labels(*key).set(load)
        self.scale_complete.labels(*key).set(1 if complete else 0)
        self.scale_desired.labels(*key).set(desired)
        if desired != current:
            self.scale_decisions.labels("up" if desired > current else "down").inc()

    def autoscale_gone(self, key: tuple[str, str]) -> None:
        for gauge in (self.scale_load, self.scale_complete, self.scale_desired):
            with contextlib.suppress(KeyError):
                gauge.remove(*key)


class _OperatorState(Collector):
    def __init__(
        self, metrics: OperatorMetrics, depth: Callable[[], int], processing: Callable[[], int]
    ) -> None:
        self.metrics = metrics
        self.depth = depth
        self.processing = processing

    def collect(self) -> Iterator[Any]:
        yield gauge_family(
            f"{PREFIX}_queue_depth", "Pools waiting for a pass", [], {(): self.depth()}
        )
        yield gauge_family(
            f"{PREFIX}_queue_processing", "Pools being reconciled now", [], {(): self.processing()}
        )
        counts: dict[tuple[str, ...], float] = {}
        for conditions in self.metrics.conditions.values():
            for condition, status in conditions.items():
                counts[(condition, status)] = counts.get((condition, status), 0.0) + 1
        yield gauge_family(
            f"{PREFIX}_pools", "Pools by condition type and status",
            ["condition", "status"], counts,
        )  # fmt: skip
