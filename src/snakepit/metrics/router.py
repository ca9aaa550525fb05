"""The router's metrics: calls, latency, queue, retries, workers, sessions, store, bytes.

Counters and histograms are updated on the call path (children cached per label set, so a
call costs a few dictionary lookups and lock-free-ish increments); gauges of the pool's state
(in flight, queued, workers by state) are read from the pool when Prometheus scrapes, so they
cost nothing between scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from .common import (
    LATENCY_BUCKETS,
    BoundedLabels,
    ToolCalls,
    gauge_family,
    store_metrics,
    tool_name_of,
    zero,
)

if TYPE_CHECKING:
    from ..router.pool import WorkerPool

PREFIX = "snakepit_router"
# Why a call never reached a worker (the pool's errors, by class name).
REJECTION_REASONS = {
    "ResourceExhausted": "queue_full",
    "DeadlineExceeded": "queue_timeout",
    "Unavailable": "no_worker",
    "FailedPrecondition": "worker_gone",
}


@dataclass(frozen=True)
class Load:
    """Calls another part of the data path holds now, beside the Python pool's own (HAProxy's
    queue and the calls it runs on workers: ``router.haproxy.load``)."""

    in_flight: int = 0
    queued: int = 0
    workers: dict[str, int] = field(default_factory=dict)  # worker id -> calls running on it
    # Lines of HAProxy's call log it could not send (the router's socket buffer was full): calls
    # missing from the call metrics. None: no call log.
    dropped_log_lines: int | None = None


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.tool_calls = ToolCalls(
            PREFIX,
            (f"{PREFIX}_call_duration_seconds", "Tool call latency seen by the router, end to end"),
            r,
            BoundedLabels(),
        )
        self.queue_wait = Histogram(
            f"{PREFIX}_queue_wait_seconds", "Time calls waited in the queue for a free worker",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.worker_duration = Histogram(
            f"{PREFIX}_worker_call_duration_seconds", "Latency of each attempt on a worker",
            ["worker"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.rejections = Counter(
            f"{PREFIX}_queue_rejections", "Calls the queue refused or timed out, by reason",
            ["reason"], registry=r,
        )  # fmt: skip
        self.retries = Counter(
            f"{PREFIX}_retries", "Attempts sent again to another worker, by the refusal's code",
            ["code"], registry=r,
        )  # fmt: skip
        self.received = Counter(
            f"{PREFIX}_received_bytes", "Request bytes of tool calls", ["method"], registry=r
        )
        self.sent = Counter(
            f"{PREFIX}_sent_bytes", "Response bytes of tool calls", ["method"], registry=r
        )
        self.store_seconds, self.store_errors = store_metrics(
            (
                f"{PREFIX}_store_operation_duration_seconds",
                "Session store operations, by operation",
            ),
            (f"{PREFIX}_store_errors", "Session store operations that failed"),
            r,
        )
        zero(self.rejections, REJECTION_REASONS.values())
        zero(self.retries, ("RESOURCE_EXHAUSTED", "UNAVAILABLE"))
        self.sessions = -1.0  # set by the router's refresher; -1 until the store answered
        self._workers: dict[str, Any] = {}
        self._bytes: dict[str, tuple[Any, Any]] = {}  # method -> (received, sent) children
        self._rejections: dict[str, Any] = {}  # reason -> counter child
        self._collector: _PoolCollector | None = None

    def bind(self, pool: WorkerPool) -> None:
        """Report ``pool``'s live state (in flight, queue, workers) at every scrape."""
        self._collector = _PoolCollector(pool, lambda: self.sessions)
        self.registry.register(self._collector)

    def add_load(self, source: Callable[[], Load | None]) -> None:
        """Add what ``source`` says at each scrape to the pool's in-flight and queue gauges
        (None: nothing to add this time). Called from the scraping thread."""
        assert self._collector is not None, "bind() first"
        self._collector.extra = source

    # The call path -----------------------------------------------------------------------------
    def call_done(
        self, method: str, raw: bytes, code: str, started: float, sent_bytes: int
    ) -> None:
        self.tool_calls.record(tool_name_of(raw), code, started)
        counters = self._byte_counters(method)
        counters[0].inc(len(raw))
        if sent_bytes:
            counters[1].inc(sent_bytes)

    def _byte_counters(self, method: str) -> tuple[Any, Any]:
        counters = self._bytes.get(method)
        if counters is None:
            counters = self._bytes[method] = (
                self.received.labels(method),
                self.sent.labels(method),
            )
        return counters

    def attempt_done(self, worker_id: str, started: float) -> None:
        self.attempt_seconds(worker_id, time.perf_counter() - started)

    # Calls timed elsewhere (HAProxy's call log) ------------------------------------------------
    def call_seen(self, method: str, tool: str, code: str, seconds: float) -> None:
        self.tool_calls.observe(tool, code, seconds)

    def request_bytes(self, method: str, count: int) -> None:
        self._byte_counters(method)[0].inc(count)

    def response_bytes(self, method: str, count: int) -> None:
        self._byte_counters(method)[1].inc(count)

    def attempt_seconds(self, worker_id: str, seconds: float) -> None:
        child = self._workers.get(worker_id)
        if child is None:
            child = self._workers[worker_id] = self.worker_duration.labels(worker_id)
        child.observe(seconds)

    def rejected_for(self, reason: str) -> None:
        """A rejection known by its reason (a ``REJECTION_REASONS`` value)."""
        child = self._rejections.get(reason)
        if child is None:
            child = self._rejections[reason] = self.rejections.labels(reason)
        child.inc()

    def waited(self, started: float) -> None:
        self.queue_wait.observe(time.perf_counter() - started)

    def rejected(self, error: BaseException) -> None:
        self.rejected_for(REJECTION_REASONS.get(type(error).__name__, "other"))

    def retried(self, code: str) -> None:
        self.retries.labels(code).inc()


class _PoolCollector(Collector):
    """Gauges read from the pool at scrape time."""

    def __init__(self, pool: WorkerPool, sessions: Callable[[], float]) -> None:
        self.pool = pool
        self.sessions = sessions
        self.extra: Callable[[], Load | None] | None = None

    def collect(self) -> Iterator[Any]:
        pool = self.pool
        workers = list(pool.workers.values())
        extra = (self.extra() if self.extra is not None else None) or Load()
        states: dict[tuple[str, ...], float] = {
            (s,): 0.0 for s in ("starting", "ready", "draining", "unreachable")
        }
        for w in workers:
            states[(w.state,)] = states.get((w.state,), 0.0) + 1
        yield gauge_family(
            f"{PREFIX}_in_flight",
            "Calls running on workers now",
            [],
            {(): pool.in_flight + extra.in_flight},
        )
        yield gauge_family(
            f"{PREFIX}_queued",
            "Calls waiting for a free worker now",
            [],
            {(): pool.queued + extra.queued},
        )
        yield gauge_family(
            f"{PREFIX}_queue_capacity",
            "Calls that may wait at once",
            [],
            {(): pool.config.queue_size},
        )
        yield gauge_family(
            f"{PREFIX}_workers", "Workers known to the router, by state", ["state"], states
        )
        yield gauge_family(
            f"{PREFIX}_worker_in_flight", "Calls running on each worker now", ["worker"],
            {(w.worker_id,): w.in_flight + extra.workers.get(w.worker_id, 0) for w in workers},
        )  # fmt: skip
        yield gauge_family(
            f"{PREFIX}_worker_capacity", "Calls each worker may run at once", [],
            {(): pool.config.worker_concurrency},
        )  # fmt: skip
        if extra.dropped_log_lines is not None:
            yield CounterMetricFamily(
                f"{PREFIX}_call_log_dropped",
                "HAProxy call log lines lost (socket buffer full): calls the call metrics miss",
                value=extra.dropped_log_lines,
            )
        yield gauge_family(
            f"{PREFIX}_sessions",
            "Live sessions in the store (-1: unknown)",
            [],
            {(): self.sessions()},
        )
