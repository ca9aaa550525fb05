"""The metric helpers that keep label sets bounded and read the tool name off the wire."""

from __future__ import annotations

from snakepit.metrics import BoundedLabels, tool_name_of
from snakepit.protocol import pb
from snakepit.protocol.messages import encode_request


def test_tool_name_read_from_a_real_request_without_parsing_it() -> None:
    raw = encode_request("tensor_scale", {"x": list(range(1000)), "factor": 2}, session_id="s")
    assert tool_name_of(raw) == "tensor_scale"
    assert tool_name_of(pb.ExecuteToolRequest(tool_name="é" * 100).SerializeToString()) == "é" * 100


def test_tool_name_of_garbage_is_empty() -> None:
    assert tool_name_of(b"") == ""
    assert tool_name_of(b"\x0a\xff\xff\xff\xff\x0f") == ""  # length past the end
    assert tool_name_of(pb.ExecuteToolRequest(session_id="s").SerializeToString()) == ""


def test_bounded_labels_cap_distinct_values() -> None:
    labels = BoundedLabels(limit=2)
    assert [labels(v) for v in ("a", "b", "c", "a", "")] == ["a", "b", "other", "a", "unknown"]


def test_tracing_is_on_only_when_the_otel_environment_names_an_endpoint() -> None:
    from snakepit.tracing import configured

    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}
    assert not configured({})
    assert configured(endpoint)
    assert configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4317"})
    assert not configured({**endpoint, "OTEL_SDK_DISABLED": "true"})
    assert not configured({**endpoint, "OTEL_TRACES_EXPORTER": "none"})


def test_an_unsampled_caller_gets_no_spans_only_its_decision_passed_on() -> None:
    from opentelemetry import trace
    from opentelemetry.sdk.trace import TracerProvider

    from snakepit import tracing

    tracer = TracerProvider().get_tracer("test")  # samples everything it decides itself
    parent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"  # flags 00: not sampled
    started = tracing.start_server(tracer, "worker", [("traceparent", parent)], {})
    try:
        assert started[0] is None
        assert dict(tracing.inject())["traceparent"] == parent  # nested calls carry it on
    finally:
        tracing.end_server(started, "OK", "worker add", {})
    sampled = parent[:-2] + "01"
    started = tracing.start_server(tracer, "worker", [("traceparent", sampled)], {})
    try:
        span = started[0]
        assert span is not None and span.is_recording()
        assert format(span.get_span_context().trace_id, "032x") == parent.split("-")[1]
        assert trace.get_current_span() is span
    finally:
        tracing.end_server(started, "OK", "worker add", {})


def test_a_caller_inventing_tool_names_cannot_grow_the_metrics_memory() -> None:
    """Each distinct name a caller sends (up to 512 bytes, with any code) once kept its own
    cache entry, though its label was already capped to ``other``: 20,000 names past the cap
    held 2.9 MB in the router and in every worker (limits on everything a caller controls)."""
    import time
    import tracemalloc

    from prometheus_client import CollectorRegistry

    from snakepit.metrics import RouterMetrics
    from snakepit.metrics.worker import WorkerMetrics

    for metrics in (
        RouterMetrics(CollectorRegistry()),
        WorkerMetrics({"add"}, CollectorRegistry()),
    ):
        calls = metrics.tool_calls
        started = time.perf_counter()
        for name in ("add", "echo"):  # the names a pool knows are still counted apart
            calls.record(name, "OK", started)
        invented = [f"no-such-tool-{i:06d}-" + "x" * 64 for i in range(21_000)]
        for name in invented[:1_000]:  # past the label cap: what is kept from here is a leak
            calls.record(name, "NOT_FOUND", started)
        tracemalloc.start()
        before = tracemalloc.take_snapshot()
        for name in invented[1_000:]:
            calls.record(name, "NOT_FOUND", started)
        # Only what the metrics code allocates: this process may have other threads left from
        # earlier tests (one pytest run holds every tier).
        mine = [
            tracemalloc.Filter(True, "*/snakepit/metrics/*"),
            tracemalloc.Filter(True, "*/prometheus_client/*"),
        ]
        after = tracemalloc.take_snapshot().filter_traces(mine)
        grown = sum(s.size_diff for s in after.compare_to(before.filter_traces(mine), "filename"))
        tracemalloc.stop()
        assert grown < 256 * 1024, f"{type(metrics).__name__} kept {grown} bytes for 20,000 names"
        samples = {
            (s.labels["tool"], s.labels["code"]): s.value
            for family in calls.calls.collect()
            for s in family.samples
            if s.name.endswith("_total")
        }
        assert samples[("add", "OK")] == 1
        assert sum(v for (_, code), v in samples.items() if code == "NOT_FOUND") == 21_000
        assert len(samples) <= 202  # 200 distinct tools at most, plus other/unknown
