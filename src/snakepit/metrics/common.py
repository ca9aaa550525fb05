"""Pieces every component's metrics share: the HTTP endpoint, bounded labels, status names."""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import grpc
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily

if TYPE_CHECKING:
    from ..store.base import SessionStore

# Call latencies from sub-millisecond proxy hops to minute-long tools.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0,
)  # fmt: skip
# Session store round trips: memory (µs), Redis (~0.2 ms), through the router (~1 ms).
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5)

# ``*_created`` series (a timestamp per counter child) double the series count for no panel.
disable_created_metrics()  # type: ignore[no-untyped-call]

OTHER = "other"
UNKNOWN = "unknown"


@dataclass
class MetricsServer:
    """A running ``/metrics`` HTTP endpoint (a daemon thread of prometheus_client)."""

    port: int
    _httpd: Any

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


def serve_http(registry: CollectorRegistry, port: int, host: str = "0.0.0.0") -> MetricsServer:
    """Serve ``registry`` at ``http://host:port/metrics`` (port 0: any free port)."""
    httpd, _thread = start_http_server(port, addr=host, registry=registry)
    return MetricsServer(int(httpd.server_port), httpd)


def code_name(code: grpc.StatusCode | None) -> str:
    """The label value of a status code: its gRPC name, ``OK`` for success."""
    return "OK" if code is None else str(code.name)


class BoundedLabels:
    """Label values taken from callers (tool names), capped so a client cannot explode series.

    The first ``limit`` distinct values are kept as they are, every later one is ``other``.
    """

    def __init__(self, limit: int = 200) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if not value:
            return UNKNOWN
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(value)
        return value


def tool_name_of(raw: bytes) -> str:
    """The tool name of a serialized ExecuteToolRequest, read without parsing the message.

    ``tool_name`` is field 1 and protobuf writers emit fields in number order, so it is the
    first bytes (tag 0x0A, a varint length, UTF-8). The router forwards requests as opaque bytes;
    this keeps a 100 MB tensor argument unparsed while the call is still labelled by its tool.
    """
    if len(raw) < 2 or raw[0] != 0x0A:
        return ""
    length = shift = 0
    pos = 1
    while pos < len(raw) and pos < 6:
        byte = raw[pos]
        length |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            break
        shift += 7
    if length > 512 or pos + length > len(raw):
        return ""
    return raw[pos : pos + length].decode("utf-8", "replace")


# The SessionStore coroutine methods a TimedStore times (``watch`` and ``backend`` pass through).
STORE_OPERATIONS = frozenset(
    {
        "create_session",
        "get_session",
        "touch_session",
        "delete_session",
        "list_sessions",
        "existing",
        "register_variable",
        "get_variable",
        "get_variables",
        "set_variable",
        "set_variables",
        "delete_variable",
        "list_variables",
        "increment",
        "stats",
        "ping",
    }
)


class TimedStore:
    """A SessionStore seen through a latency histogram and an error counter per operation, and
    a client span per operation when tracing is on.

    A proxy rather than a subclass: it observes whichever store it wraps (memory, Redis, remote)
    with the same ``op`` names, and the stores themselves stay free of metrics and tracing code.
    """

    def __init__(
        self, store: Any, seconds: Histogram | None, errors: Counter | None, tracer: Any = None
    ) -> None:
        self._store = store
        self._seconds = seconds
        self._errors = errors
        self._tracer = tracer

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if name not in STORE_OPERATIONS:
            return attr
        seconds = self._seconds.labels(name) if self._seconds is not None else None
        errors = self._errors.labels(name) if self._errors is not None else None
        timed = _timed(attr, name, seconds, errors, self._tracer)
        setattr(self, name, timed)  # built once per operation
        return timed


def _timed(
    fn: Callable[..., Awaitable[Any]], op: str, seconds: Any, errors: Any, tracer: Any
) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def timed(*args: Any, **kwargs: Any) -> Any:
        span = _store_span(tracer, op) if tracer is not None else contextlib.nullcontext()
        started = time.perf_counter()
        try:
            with span:
                return await fn(*args, **kwargs)
        except Exception:
            if errors is not None:
                errors.inc()
            raise
        finally:
            if seconds is not None:
                seconds.observe(time.perf_counter() - started)

    return timed


def _store_span(tracer: Any, op: str) -> Any:
    from opentelemetry.trace import SpanKind

    from .. import tracing

    if not tracing.recording():  # inside an unsampled call: nothing to record
        return contextlib.nullcontext()

    return tracer.start_as_current_span(
        f"store {op}", kind=SpanKind.CLIENT, attributes={"db.operation.name": op}
    )


def zero(counter: Counter, values: Iterable[str]) -> None:
    """Create a counter's series for every known label value, so rates read 0, not "no data"."""
    for value in values:
        counter.labels(value)


class ToolCalls:
    """``<prefix>_calls_total{tool,code}`` and a latency histogram by tool, as router and worker
    both count them; label children are cached per (label, code), so a call costs a label
    lookup and a cache lookup. The cache is keyed by the bounded label, never by the name the
    caller sent: invented names would otherwise each keep an entry of their own."""

    def __init__(
        self,
        prefix: str,
        duration: tuple[str, str],
        registry: CollectorRegistry,
        label: Callable[[str], str],
    ) -> None:
        self.calls = Counter(
            f"{prefix}_calls", "Tool calls finished, by tool and gRPC status code",
            ["tool", "code"], registry=registry,
        )  # fmt: skip
        self.duration = Histogram(
            duration[0], duration[1], ["tool"], buckets=LATENCY_BUCKETS, registry=registry
        )
        self._label = label
        self._children: dict[tuple[str, str], tuple[Any, Any]] = {}

    def record(self, tool: str, code: str, started: float) -> None:
        self.observe(tool, code, time.perf_counter() - started)

    def observe(self, tool: str, code: str, seconds: float) -> None:
        """A call of ``seconds`` (timed elsewhere: HAProxy's log on its data path)."""
        label = self._label(tool)
        children = self._children.get((label, code))
        if children is None:
            children = (self.calls.labels(label, code), self.duration.labels(label))
            self._children[(label, code)] = children
        children[0].inc()
        children[1].observe(seconds)


def store_metrics(
    seconds: tuple[str, str], errors: tuple[str, str], registry: CollectorRegistry
) -> tuple[Histogram, Counter]:
    """A latency histogram and an error counter per store operation (errors start at 0)."""
    histogram = Histogram(seconds[0], seconds[1], ["op"], buckets=STORE_BUCKETS, registry=registry)
    counter = Counter(errors[0], errors[1], ["op"], registry=registry)
    zero(counter, STORE_OPERATIONS)
    return histogram, counter


def gauge_family(
    name: str, documentation: str, labels: list[str], values: dict[tuple[str, ...], float]
) -> GaugeMetricFamily:
    """A gauge built at scrape time from ``values`` (label values -> value)."""
    family = GaugeMetricFamily(name, documentation, labels=labels)
    for label_values, value in values.items():
        family.add_metric(list(label_values), value)
    return family


def timed_store(store: SessionStore, metrics: Any, tracer: Any = None) -> SessionStore:
    """``store`` timed into ``metrics.store_seconds``/``store_errors`` and traced with ``tracer``
    (either may be None; with neither, ``store`` itself)."""
    if metrics is None and tracer is None:
        return store
    seconds = None if metrics is None else metrics.store_seconds
    errors = None if metrics is None else metrics.store_errors
    return cast("SessionStore", TimedStore(store, seconds, errors, tracer))
