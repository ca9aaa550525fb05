"""Traces through a real pool into a real Jaeger, read back through Jaeger's query API.

An application process (tests/support/traced_client.py) calls a ``snakepit serve`` pool with
OpenTelemetry configured by the OTEL_* environment; the test fetches each call's trace and checks
the spans, their parents, services and attributes across client, router, worker, tool and store.

On both data paths. On HAProxy's the router's spans of a tool call (``router ExecuteTool`` and
its ``router attempt``) are recorded from HAProxy's call log under the span ids HAProxy chose,
the attempt's given to the worker as its parent (router/haproxy/spans.py): the same chain, at
the times HAProxy logged (the log is read in batches, up to 50 ms after the call).
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

import pytest

from tests.fixtures import processes
from tests.fixtures.jaeger import Jaeger
from tests.fixtures.processes import ProcessFactory

pytestmark = pytest.mark.timeout(180)


class Trace:
    def __init__(self, data: dict[str, Any]) -> None:
        self.spans = {s["spanID"]: s for s in data["spans"]}
        self.services = {k: v["serviceName"] for k, v in data["processes"].items()}

    def named(self, name: str) -> list[dict[str, Any]]:
        return [s for s in self.spans.values() if s["operationName"] == name]

    def one(self, name: str) -> dict[str, Any]:
        (span,) = self.named(name)
        return span

    def parent(self, span: dict[str, Any]) -> dict[str, Any] | None:
        refs = [r for r in span.get("references", ()) if r["refType"] == "CHILD_OF"]
        return self.spans.get(refs[0]["spanID"]) if refs else None

    def ancestry(self, span: dict[str, Any]) -> list[tuple[str, str]]:
        """(service, operation) from ``span`` up to the root."""
        chain: list[tuple[str, str]] = []
        current: dict[str, Any] | None = span
        while current is not None:
            chain.append((self.services[current["processID"]], current["operationName"]))
            current = self.parent(current)
        return chain


def tags(span: dict[str, Any]) -> dict[str, Any]:
    return {t["key"]: t["value"] for t in span.get("tags", ())}


@pytest.mark.parametrize("data_path", ["python", "haproxy"])
def test_one_call_is_one_trace_across_client_router_worker_tool_and_store(
    procs: ProcessFactory, jaeger: Jaeger, data_path: str
) -> None:
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": jaeger.otlp_endpoint,
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    pool = procs.serve(
        "--worker-concurrency", "1", "--data-path", data_path, workers=2, env=otel
    )  # fmt: skip
    assert f"data path: {data_path}" in pool.logs()
    # A span per attempt on a worker, between the router's span and the worker's
    attempt = [("snakepit-router", "router attempt")]
    extra = len(attempt)
    app = subprocess.run(
        [sys.executable, "-m", "tests.support.traced_client", pool.address],
        capture_output=True,
        text=True,
        timeout=60,
        env=processes.child_env(**otel),
        cwd=processes.ROOT,
    )
    assert app.returncode == 0, app.stderr
    ids = json.loads(app.stdout.strip().splitlines()[-1])

    nested = Trace(jaeger.trace(ids["nested"], min_spans=9 + 2 * extra))
    assert nested.ancestry(nested.one("tool add")) == [
        ("snakepit-worker", "tool add"),
        ("snakepit-worker", "worker add"),
        *attempt,
        ("snakepit-router", "router ExecuteTool"),
        ("snakepit-worker", "client ExecuteTool"),  # ctx.call_tool from inside nested_add
        ("snakepit-worker", "tool nested_add"),
        ("snakepit-worker", "worker nested_add"),
        *attempt,
        ("snakepit-router", "router ExecuteTool"),
        ("test-app", "client ExecuteTool"),
        ("test-app", "app nested"),
    ]
    outer = [
        s for s in nested.named("router ExecuteTool") if tags(s)["snakepit.tool"] == "nested_add"
    ]
    assert len(outer) == 1 and tags(outer[0])["rpc.grpc.status_code"] == "OK"
    # which worker ran it: on each attempt's span
    attempts = nested.named("router attempt")
    assert {tags(a)["snakepit.worker_id"] for a in attempts} <= {"worker-0", "worker-1"}
    # each span lies within its parent's time (microseconds; 1 ms for the clocks' reading)
    for span in nested.named("router attempt") + nested.named("worker add"):
        parent = nested.parent(span)
        assert parent is not None
        assert span["startTime"] >= parent["startTime"] - 1000, (span, parent)
        assert (
            span["startTime"] + span["duration"] <= parent["startTime"] + parent["duration"] + 1000
        ), (span, parent)

    store = Trace(jaeger.trace(ids["store"], min_spans=5 + extra))
    assert store.ancestry(store.one("store increment"))[:3] == [
        ("snakepit-worker", "store increment"),
        ("snakepit-worker", "tool counter_increment"),
        ("snakepit-worker", "worker counter_increment"),
    ]

    failed = Trace(jaeger.trace(ids["fail"], min_spans=5))
    assert tags(failed.one("router ExecuteTool"))["rpc.grpc.status_code"] == "INTERNAL"
    worker_span = tags(failed.one("worker fail"))
    assert worker_span["rpc.grpc.status_code"] == "INTERNAL"
    assert worker_span["otel.status_code"] == "ERROR"
    # the worker's log line about the failure names the same trace
    failure_logs = [
        json.loads(line) for line in pool.logs().splitlines() if '"call failed"' in line
    ]
    assert ids["fail"] in {entry.get("trace_id") for entry in failure_logs}, failure_logs

    waits = []
    for trace_id in ids["held"]:
        held = Trace(jaeger.trace(trace_id, min_spans=5 + extra))
        for span in held.named("queue wait"):
            parent = held.parent(span)
            assert parent is not None and parent["operationName"] == "router ExecuteTool"
            waits.append(span["duration"])
    assert waits, "no held call waited in the queue"
    assert max(waits) > 100_000  # µs: it waited for a 0.5 s call to finish
