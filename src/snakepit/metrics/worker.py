"""A worker's metrics: calls and tool run time per tool, saturation, recycling, cache, store.

Resident memory and CPU come from prometheus_client's ProcessCollector
(``process_resident_memory_bytes``, ``process_cpu_seconds_total``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, ProcessCollector
from prometheus_client.registry import Collector

from .common import UNKNOWN, ToolCalls, gauge_family, store_metrics, zero

PREFIX = "snakepit_worker"
_RECYCLE_REASONS = (("max requests", "max_requests"), ("max age", "max_age"), ("memory", "max_rss"))


class WorkerMetrics:
    def __init__(self, tools: set[str], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        ProcessCollector(registry=self.registry)
        r = self.registry
        self.tools = frozenset(tools)
        self.tool_calls = ToolCalls(
            PREFIX,
            (f"{PREFIX}_tool_duration_seconds", "Time from admission to the tool's result"),
            r,
            lambda tool: tool if tool in self.tools else UNKNOWN,
        )
        self.refused = Counter(
            f"{PREFIX}_refused_calls", "Calls refused before they ran (draining, at_limit)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.recycles = Counter(
            f"{PREFIX}_recycles", "Drains started, by reason (max_requests, max_age, max_rss, signal)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.cache = Counter(
            f"{PREFIX}_session_cache_lookups", "SessionContext variable reads, by hit or miss",
            ["result"], registry=r,
        )  # fmt: skip
        self.cache_hit = self.cache.labels("hit")
        self.cache_miss = self.cache.labels("miss")
        self.store_seconds, self.store_errors = store_metrics(
            (f"{PREFIX}_store_round_trip_duration_seconds", "Round trips to the session store"),
            (f"{PREFIX}_store_errors", "Session store round trips that failed"),
            r,
        )
        zero(self.refused, ("draining", "at_limit"))
        zero(self.recycles, [label for _prefix, label in _RECYCLE_REASONS] + ["signal"])

    def bind(self, in_flight: Callable[[], int], limit: int, backlog: Callable[[], int]) -> None:
        """Report in-flight calls against the concurrency limit, and the backlog, at each scrape."""
        self.registry.register(_Saturation(in_flight, limit, backlog))

    def call_done(self, tool: str, code: str, started: float) -> None:
        self.tool_calls.record(tool, code, started)

    def recycled(self, reason: str) -> None:
        """Count a drain; ``reason`` is the worker's free-text one, mapped to a bounded label."""
        for prefix, label in _RECYCLE_REASONS:
            if reason.startswith(prefix):
                self.recycles.labels(label).inc()
                return
        self.recycles.labels("signal").inc()

    def cache_lookup(self, hit: bool) -> None:
        (self.cache_hit if hit else self.cache_miss).inc()


class _Saturation(Collector):
    def __init__(
        self, in_flight: Callable[[], int], limit: int, backlog: Callable[[], int]
    ) -> None:
        self.in_flight = in_flight
        self.limit = limit
        self.backlog = backlog

    def collect(self) -> Iterator[Any]:
        yield gauge_family(f"{PREFIX}_in_flight", "Calls running now", [], {(): self.in_flight()})
        yield gauge_family(
            f"{PREFIX}_concurrency_limit", "Calls this worker runs at once", [], {(): self.limit}
        )
        yield gauge_family(
            f"{PREFIX}_backlog",
            "Calls waiting for a slot in this worker now",
            [],
            {(): self.backlog()},
        )
