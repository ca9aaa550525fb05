"""The router's spans of a tool call HAProxy carried, recorded from its call log line.

HAProxy makes no spans. With tracing on it gives each traced tool call the ids of the router's
span for it and of its attempt on a worker, and sends the worker the attempt's id as the parent
(``config.trace_lines``); the line it logs when the call ends carries the caller's traceparent,
those ids, and the call's start and end in microseconds. This records the spans under those ids
(``tracing.preset_span_id``), so a trace reads client → ``router ExecuteTool`` → ``router
attempt`` → worker → tool as on the Python path, with the call's time in HAProxy's queue as a
``queue wait`` child. What the Python path has and this does not: an attempt span per failed
connect and retry events (HAProxy redispatches with the same attempt id; the one attempt span
names the last worker).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ... import tracing
from ..observe import ATTEMPT_SPAN, call_span_attributes

if TYPE_CHECKING:
    from .calllog import Call


def record(tracer: Any, call: Call, tool: str, worker_id: str | None) -> None:
    """Record the router's span of ``call``, its queue wait and its attempt on a worker, unless
    its caller chose not to sample the trace."""
    from opentelemetry import trace
    from opentelemetry.trace import SpanKind

    parent = tracing.extract(((tracing.TRACEPARENT, call.parent),))
    if tracing.unsampled(parent) is not None:
        return
    end = call.ended_us * 1000 if call.ended_us else time.time_ns()
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
    if span.is_recording():
        inside = trace.set_span_in_context(span)
        if call.waited is not None:
            waited = tracer.start_span("queue wait", context=inside, start_time=start)
            waited.end(end_time=start + int(call.waited * 1e9))
        if call.slot and call.attempt_span_id:
            with tracing.preset_span_id(call.attempt_span_id):
                attempt = tracer.start_span(
                    ATTEMPT_SPAN,
                    context=inside,
                    kind=SpanKind.CLIENT,
                    start_time=end - int(call.attempt * 1e9),
                    attributes={
                        "snakepit.worker_id": worker_id or "",
                        "snakepit.ok": call.code == "OK",  # an answer, as on the Python path
                    },
                )
            attempt.end(end_time=end)
    tracing.end(span, call.code, end_time=end)
