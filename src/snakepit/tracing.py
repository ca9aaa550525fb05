"""OpenTelemetry traces: W3C trace context in gRPC metadata, spans exported over OTLP.

Off unless the standard environment asks for it: ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set, and neither ``OTEL_SDK_DISABLED=true`` nor
``OTEL_TRACES_EXPORTER=none``. Then ``setup`` (called by ``snakepit router|worker|serve``)
installs the SDK with an OTLP/gRPC exporter, a batch processor and the sampler of
``OTEL_TRACES_SAMPLER``/``OTEL_TRACES_SAMPLER_ARG`` (e.g. ``parentbased_traceidratio`` 0.01).
When off, nothing of OpenTelemetry is even imported: every hook is one ``is None`` test.

A process that configured OpenTelemetry itself (an application using the ``Client``) gets client
spans and context propagation through its own global tracer provider.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
_CARRIER_KEYS = (TRACEPARENT, TRACESTATE)

_tracer: Any = None
# A span id the next span started in this context takes (``preset_span_id``); None: random.
_preset_span_id: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "snakepit_preset_span_id", default=None
)
_ids_presettable = False


def configured(env: dict[str, str] | None = None) -> bool:
    """Whether the OTEL_* environment asks this process to export traces."""
    env = dict(os.environ) if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return False
    return bool(
        env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def setup(service_name: str) -> bool:
    """Install the SDK as the global tracer provider when configured; True when tracing is on.

    ``OTEL_SERVICE_NAME`` and ``OTEL_RESOURCE_ATTRIBUTES`` override ``service_name`` as usual.
    """
    global _tracer, _ids_presettable
    if not configured():
        return False
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        def generate_span_id(self) -> int:
            preset = _preset_span_id.get()
            return int(super().generate_span_id()) if preset is None else preset

    resource = Resource.create({SERVICE_NAME: service_name})
    if os.environ.get("OTEL_SERVICE_NAME"):
        resource = Resource.create({})  # the SDK reads OTEL_SERVICE_NAME itself
    provider = TracerProvider(resource=resource, id_generator=PresetIds())
    _ids_presettable = True
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    _tracer = trace.get_tracer("snakepit")
    return True


def span_ids_presettable() -> bool:
    """Whether a span can be given an id chosen elsewhere (``preset_span_id``): only with the
    provider ``setup`` installed. HAProxy, which makes no spans, chooses the id of the router's
    span for a call it carries and hands it to the worker as the parent; the router records that
    span from HAProxy's call log once the call has ended (``router/haproxy/calllog.py``)."""
    return _ids_presettable


@contextlib.contextmanager
def preset_span_id(span_id: int) -> Iterator[None]:
    """Spans started inside take ``span_id`` (see ``span_ids_presettable``)."""
    token = _preset_span_id.set(span_id)
    try:
        yield
    finally:
        _preset_span_id.reset(token)


def shutdown() -> None:
    """Flush spans still queued for export (at process exit)."""
    if _tracer is None:
        return
    from opentelemetry import trace

    provider: Any = trace.get_tracer_provider()
    if hasattr(provider, "shutdown"):
        provider.shutdown()


def tracer() -> Any:
    """The tracer to use, or None when tracing is off (then callers do nothing at all).

    Set by ``setup``; otherwise the global provider of an application that configured the
    OpenTelemetry SDK itself (only looked at once its module is imported: never imported here).
    """
    global _tracer
    if _tracer is None and "opentelemetry.sdk.trace" in sys.modules:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider

        if isinstance(trace.get_tracer_provider(), TracerProvider):
            _tracer = trace.get_tracer("snakepit")
    return _tracer


def inject(span: Any = None) -> tuple[tuple[str, str], ...]:
    """Metadata entries carrying ``span``'s context (default: the current span's)."""
    from opentelemetry import propagate, trace

    carrier: dict[str, str] = {}
    context = trace.set_span_in_context(span) if span is not None else None
    propagate.inject(carrier, context=context)
    return tuple(carrier.items())


def extract(metadata: Iterable[tuple[str, Any]] | None) -> Any:
    """The OpenTelemetry context a caller sent in gRPC metadata (an empty one without it)."""
    from opentelemetry import propagate

    carrier = {k: v for k, v in metadata or () if k in _CARRIER_KEYS}
    return propagate.extract(carrier)


def replace_context(metadata: Sequence[tuple[str, Any]], span: Any) -> tuple[tuple[str, Any], ...]:
    """``metadata`` with its trace context replaced by ``span``'s (a proxy's child span)."""
    kept = tuple((k, v) for k, v in metadata if k not in _CARRIER_KEYS)
    return kept + inject(span)


def trace_id() -> str:
    """The current trace id (32 hex digits) for logs, or "" when there is none."""
    if _tracer is None:
        return ""
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else ""


def end(span: Any, code: str, end_time: int | None = None) -> None:
    """End ``span`` with its gRPC status (``rpc.grpc.status_code``) and error status."""
    from opentelemetry.trace import Status, StatusCode

    if not span.is_recording():
        return
    span.set_attribute("rpc.grpc.status_code", code)
    if code != "OK":
        span.set_status(Status(StatusCode.ERROR, code))
    span.end(end_time=end_time)


def client_span(tracer: Any, method: str, request: bytes) -> Any:
    """The current span of one client call (a context manager); its context goes out in metadata."""
    from opentelemetry.trace import SpanKind

    from .metrics.common import tool_name_of

    return tracer.start_as_current_span(
        f"client {method}",
        kind=SpanKind.CLIENT,
        attributes={
            "rpc.system": "grpc",
            "rpc.method": method,
            "snakepit.tool": tool_name_of(request),
        },
    )


def start_server(tracer: Any, name: str, metadata: Any, attributes: dict[str, Any]) -> Any:
    """Start a server span whose parent came in ``metadata`` and make it current (in this task's
    context, so the spans of what the call does nest under it); end it with ``end_server``."""
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind

    parent = extract(metadata)
    if unsampled(parent) is not None:  # the caller decided not to sample: only pass that on
        return None, context.attach(parent)
    span = tracer.start_span(
        name, context=parent, kind=SpanKind.SERVER, attributes={"rpc.system": "grpc", **attributes}
    )
    return span, context.attach(trace.set_span_in_context(span))


def end_server(started: Any, code: str, name: str, attributes: dict[str, Any]) -> None:
    from opentelemetry import context

    span, token = started
    context.detach(token)
    if span is not None:
        span.update_name(name)
        span.set_attributes(attributes)
        end(span, code)


def unsampled(parent_context: Any) -> Any:
    """The caller's span (non-recording) when it sent a trace context it chose not to sample;
    None otherwise. Spans under it would all be dropped, so none are made: that keeps the cost
    of an unsampled call (99 % of them at 1 % sampling) to parsing and passing on one header."""
    from opentelemetry import trace

    parent = trace.get_current_span(parent_context)
    span_context = parent.get_span_context()
    if span_context.is_valid and not span_context.trace_flags.sampled:
        return parent
    return None


def recording() -> bool:
    """Whether the current span records (a sampled call): child spans are worth making."""
    from opentelemetry import trace

    return bool(trace.get_current_span().is_recording())
