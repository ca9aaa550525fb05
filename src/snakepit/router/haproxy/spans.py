"""The router's span of a tool call HAProxy carried, recorded from its call log line.

HAProxy makes no spans. With tracing on it gives each traced tool call the id of the router's
span for it and sends the worker that id as the parent (``config.trace_lines``); the line it
logs when the call ends carries the caller's traceparent and that id. This records the span
under that id (``tracing.preset_span_id``), so a trace reads client → ``router ExecuteTool`` →
worker → tool as on the Python path, with the call's time in HAProxy's queue as a ``queue
wait`` child. What the Python path adds and this does not: a ``router attempt`` span per worker
attempt (the span carries the last worker as ``snakepit.worker_id``) and retry events.

The span is recorded when the line arrives, just after the call ended: its start is that
moment less the call's active time (HAProxy's ``%Ta``, milliseconds).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ... import tracing
from ..observe import call_span_attributes

if TYPE_CHECKING:
    from .calllog import Call


def record(tracer: Any, call: Call, tool: str, worker_id: str | None) -> None:
    """Record the router's span of ``call`` (and its queue wait), unless its caller chose not
    to sample the trace."""
    from opentelemetry.trace import SpanKind

    parent = tracing.extract(((tracing.TRACEPARENT, call.parent),))
    if tracing.unsampled(parent) is not None:
        return
    end = time.time_ns()
    start = end - int(call.seconds * 1e9)
    attributes = {**call_span_attributes(call.method, tool), "snakepit.data_path": "haproxy"}
    if worker_id is not None:
        attributes["snakepit.worker_id"] = worker_id
    with tracing.preset_span_id(call.span_id):
        span = tracer.start_span(
            f"router {call.method}",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=start,
            attributes=attributes,
        )
    if call.waited is not None and span.is_recording():
        from opentelemetry import trace

        waited = tracer.start_span(
            "queue wait", context=trace.set_span_in_context(span), start_time=start
        )
        waited.end(end_time=start + int(call.waited * 1e9))
    tracing.end(span, call.code, end_time=end)
