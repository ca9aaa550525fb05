"""One tool call through the router as metrics and traces see it.

The router's call path talks to one observer per call; the observer feeds the Prometheus
metrics (``RouterMetrics``) and, when tracing is on, a server span for the call with a child
span per attempt on a worker (whose context travels to the worker in place of the client's) and
a span for the time spent in the queue. With neither, the router uses ``NULL_OBSERVER``, whose
methods do nothing, so an unobserved router pays one method call per step.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from .. import tracing
from ..metrics import RouterMetrics
from ..metrics.common import tool_name_of
from ..protocol import SERVICE_NAME

Metadata = tuple[tuple[str, Any], ...]


# The router's span of one attempt on a worker, child of its call's span (either data path).
ATTEMPT_SPAN = "router attempt"


def call_span_attributes(method: str, tool: str) -> dict[str, Any]:
    """The attributes of the router's span of a call, on either data path."""
    return {
        "rpc.system": "grpc",
        "rpc.service": SERVICE_NAME,
        "rpc.method": method,
        "snakepit.tool": tool,
    }


class NullObserver:
    """An observer that records nothing (no metrics port, no tracing)."""

    __slots__ = ()

    def forward(self, worker_id: str, forwarded: Metadata) -> Metadata:
        return forwarded

    def attempt_done(self, worker_id: str, ok: bool) -> None:
        pass

    def waited(self, started: float) -> None:
        pass

    def rejected(self, error: BaseException) -> None:
        pass

    def retried(self, code: str) -> None:
        pass

    def done(self, code: str, sent_bytes: int) -> None:
        pass


NULL_OBSERVER = NullObserver()


class CallObserver(NullObserver):
    __slots__ = (
        "_attempt",
        "_attempt_started",
        "method",
        "metrics",
        "raw",
        "span",
        "started",
        "tracer",
    )

    def __init__(
        self,
        metrics: RouterMetrics | None,
        tracer: Any,
        method: str,
        raw: bytes,
        metadata: Sequence[tuple[str, Any]] | None,
    ) -> None:
        self.metrics = metrics
        self.tracer = tracer
        self.method = method
        self.raw = raw
        self.started = time.perf_counter()
        self._attempt_started = self.started
        self._attempt: Any = None
        self.span: Any = None
        if tracer is not None:
            from opentelemetry.trace import SpanKind

            parent = tracing.extract(metadata)
            self.span = tracing.unsampled(parent)  # then no span of ours: pass the decision on
            if self.span is not None:
                return
            self.span = tracer.start_span(
                f"router {method}",
                context=parent,
                kind=SpanKind.SERVER,
                attributes=call_span_attributes(method, tool_name_of(raw)),
            )

    def _child(self, name: str, **kwargs: Any) -> Any:
        from opentelemetry import trace

        return self.tracer.start_span(name, context=trace.set_span_in_context(self.span), **kwargs)

    def forward(self, worker_id: str, forwarded: Metadata) -> Metadata:
        """An attempt on ``worker_id`` starts; the metadata to send it (with this attempt's span)."""
        self._attempt_started = time.perf_counter()
        if self.span is None:
            return forwarded
        if not self.span.is_recording():  # not sampled: pass the decision on, record nothing
            return tracing.replace_context(forwarded, self.span)
        from opentelemetry.trace import SpanKind

        self._attempt = self._child(
            ATTEMPT_SPAN, kind=SpanKind.CLIENT, attributes={"snakepit.worker_id": worker_id}
        )
        return tracing.replace_context(forwarded, self._attempt)

    def attempt_done(self, worker_id: str, ok: bool) -> None:
        if self.metrics is not None:
            self.metrics.attempt_done(worker_id, self._attempt_started)
        if self._attempt is not None:
            self._attempt.set_attribute("snakepit.ok", ok)
            self._attempt.end()
            self._attempt = None

    def waited(self, started: float) -> None:
        if self.metrics is not None:
            self.metrics.waited(started)
        if self.span is not None and self.span.is_recording():
            now = time.time_ns()
            waited_ns = int((time.perf_counter() - started) * 1e9)
            self._child("queue wait", start_time=now - waited_ns).end(end_time=now)

    def rejected(self, error: BaseException) -> None:
        if self.metrics is not None:
            self.metrics.rejected(error)
        if self.span is not None:
            self.span.add_event("rejected by the queue", {"error": type(error).__name__})

    def retried(self, code: str) -> None:
        if self.metrics is not None:
            self.metrics.retried(code)
        if self.span is not None:
            self.span.add_event("retry on another worker", {"rpc.grpc.status_code": code})

    def done(self, code: str, sent_bytes: int) -> None:
        if self.metrics is not None:
            self.metrics.call_done(self.method, self.raw, code, self.started, sent_bytes)
        if self.span is not None:
            tracing.end(self.span, code)
