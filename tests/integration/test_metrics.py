"""Metrics checked through a real Prometheus server scraping a real ``snakepit serve`` pool, and
the router's metrics read from its /metrics on both data paths.

The first test makes a known set of calls, then asks Prometheus (its HTTP query API, after real
scrapes) whether the counters, the latency histogram and the queue gauge say what happened. The
others make calls through a router on each data path (``data_path``: the Python router, or
HAProxy with the Python router reading its call log and counters) and read the router's own
/metrics: both must say the same.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from snakepit import Client
from snakepit.autoscale.routers import metrics_load
from snakepit.errors import DeadlineExceeded, NotFound, ResourceExhausted, ToolError
from snakepit.metrics import OperatorMetrics, serve_http
from snakepit.metrics.common import MetricsServer
from snakepit.metrics.dashboard import dashboard
from tests.fixtures.processes import ProcessFactory, free_port, start_pool, wait_for
from tests.fixtures.prometheus import PrometheusServer, scrape, value

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "charts" / "snakepit" / "dashboards" / "snakepit.json"
)

pytestmark = pytest.mark.timeout(120)

ADDS = 20
FAILS = 3
HELD = 6  # sleep calls against 2 workers x 1 slot: 4 of them wait in the queue
HOLD_SECONDS = 2.0


def test_prometheus_sees_calls_latency_and_queue(  # type: ignore[no-untyped-def]
    procs: ProcessFactory, prometheus_factory, data_path: str
) -> None:
    """What the cluster's metrics e2e test asks of a pool, on each data path."""
    metrics_port = free_port()
    pool = procs.serve("--metrics-port", str(metrics_port), "--worker-concurrency", "1", workers=2)
    with Client(pool.address) as client:
        status = client.status()
        workers = [w["metrics_address"] for w in status["workers"]]
        assert status["metrics_address"].endswith(f":{metrics_port}")
        assert all(workers), status["workers"]
        operator = operator_metrics_endpoint()
        prometheus = prometheus_factory(
            {
                "router": [f"127.0.0.1:{metrics_port}"],
                "worker": workers,
                "operator": [f"127.0.0.1:{operator.port}"],
            },
            {"pool": "local"},
        )
        prometheus.wait_for("sum(up)", lambda v: v == 4)

        for i in range(ADDS):
            assert client.execute("add", a=i, b=1) == i + 1
        for _ in range(FAILS):
            with pytest.raises(ToolError):
                client.execute("fail", message="boom")
        with ThreadPoolExecutor(HELD) as pool_threads:
            held = list(
                pool_threads.map(
                    lambda _: client.execute("sleep", seconds=HOLD_SECONDS), range(HELD)
                )
            )
        assert len(held) == HELD

    router = 'job="router"'
    prometheus.wait_for(
        f'snakepit_router_calls_total{{{router},tool="add",code="OK"}}', lambda v: v == ADDS
    )
    assert (
        prometheus.value(f'snakepit_router_calls_total{{{router},tool="fail",code="INTERNAL"}}')
        == FAILS
    )
    assert (
        prometheus.value(f'snakepit_router_call_duration_seconds_count{{{router},tool="add"}}')
        == ADDS
    )
    # every held call took at least HOLD_SECONDS end to end: none is in a bucket below it
    assert (
        prometheus.value(
            f'snakepit_router_call_duration_seconds_bucket{{{router},tool="sleep",le="1.0"}}'
        )
        == 0
    )
    prometheus.wait_for(
        'sum(snakepit_worker_calls_total{job="worker",tool="add",code="OK"})', lambda v: v == ADDS
    )
    assert (
        prometheus.value('sum(snakepit_worker_calls_total{tool="fail",code="INTERNAL"})') == FAILS
    )
    # the queue rose while calls were held, and the calls that waited were timed (on HAProxy a
    # call's wait is logged when the call ends: wait for the last held ones to be counted)
    prometheus.wait_for(
        f'snakepit_router_calls_total{{{router},tool="sleep",code="OK"}}', lambda v: v == HELD
    )
    assert (prometheus.value(f"max_over_time(snakepit_router_queued{{{router}}}[5m])") or 0) >= 2
    assert prometheus.value(f"snakepit_router_queue_wait_seconds_count{{{router}}}") == HELD - 2
    assert prometheus.value(f'snakepit_router_workers{{{router},state="ready"}}') == 2
    assert prometheus.value('sum(max_over_time(snakepit_worker_in_flight{job="worker"}[5m]))') == 2
    check_dashboard(prometheus)
    operator.close()


def operator_metrics_endpoint() -> MetricsServer:
    """The operator's metrics module after one clean pass, served as `snakepit operator` does.

    No Kubernetes API here: tests/integration/test_operator_kube.py checks the real operator's
    endpoint; this one only gives the dashboard's operator panels real series to query.
    """
    metrics = OperatorMetrics()
    metrics.bind(lambda: 0, lambda: 0)
    metrics.pass_done(("default", "local"), "success", time.monotonic() - 0.05)
    metrics.pool_seen(("default", "local"), {"Ready": "True", "Degraded": "False"})
    return serve_http(metrics.registry, 0, "127.0.0.1")


def check_dashboard(prometheus: PrometheusServer) -> None:
    """Every query of the chart's dashboard is valid PromQL and draws data from this pool."""
    shipped = json.loads(DASHBOARD.read_text())
    assert shipped == json.loads(json.dumps(dashboard())), (
        "charts/snakepit/dashboards/snakepit.json is stale: "
        "python -m snakepit.metrics.dashboard > charts/snakepit/dashboards/snakepit.json"
    )
    empty = []
    targets = [t for p in shipped["panels"] for t in p.get("targets", ())]
    assert len(targets) >= 30
    for target in targets:
        expr = target["expr"].replace("$pool", "local").replace("$__rate_interval", "30s")
        if not prometheus.query(expr):  # query() raises on a PromQL error
            empty.append(expr)
    assert not empty, f"dashboard queries with no data: {empty}"


def test_tool_calls_count_by_tool_and_code_on_either_data_path(
    procs: ProcessFactory, data_path: str
) -> None:
    """An OK call, a tool error, an unknown tool and a stream, through either data path."""
    port = free_port()
    router, _ = start_pool(procs, 1, "--metrics-port", str(port), concurrency=2)
    with Client(router.address) as client:
        for i in range(ADDS):
            assert client.execute("add", a=i, b=1) == i + 1
        for _ in range(FAILS):
            with pytest.raises(ToolError):
                client.execute("fail", message="boom")
        with pytest.raises(NotFound):
            client.execute("no_such_tool")
        assert list(client.stream("count", n=3)) == [0, 1, 2]

    calls = "snakepit_router_calls_total"
    # HAProxy's call log reaches the router a moment after the caller has its answer
    wait_for(lambda: _counted(port) == ADDS + FAILS + 2)
    samples = scrape(port)
    assert value(samples, calls, tool="add", code="OK") == ADDS
    assert value(samples, calls, tool="fail", code="INTERNAL") == FAILS
    assert value(samples, calls, tool="no_such_tool", code="NOT_FOUND") == 1
    # a stream takes the Python router on either path, which counts its real status
    assert value(samples, calls, tool="count", code="OK") == 1
    duration = "snakepit_router_call_duration_seconds_count"
    assert value(samples, duration, tool="add") == ADDS
    assert value(samples, duration, tool="fail") == FAILS
    attempts = "snakepit_router_worker_call_duration_seconds_count"
    assert value(samples, attempts, worker="worker-0") == ADDS + FAILS + 2
    assert value(samples, "snakepit_router_received_bytes_total", method="ExecuteTool") > 0
    assert value(samples, "snakepit_router_queue_wait_seconds_count") == 0
    assert value(samples, "snakepit_router_workers", state="ready") == 1
    # HAProxy's count of call log lines it could not send: none lost here
    dropped = ("snakepit_router_call_log_dropped_total", ())
    assert samples.get(dropped) == (0.0 if data_path == "haproxy" else None)


def test_answer_bytes_are_counted_on_either_data_path(
    procs: ProcessFactory, data_path: str
) -> None:
    """``sent_bytes_total`` is the answers' message bytes on both paths: the Python router
    counts the messages it forwards, HAProxy logs each answer's length from its gRPC prefix. An
    answer without a message (a tool's error) adds nothing."""
    port = free_port()
    router, _ = start_pool(procs, 1, "--metrics-port", str(port), concurrency=2)
    payload = bytes(range(256)) * 80  # 20,480 bytes: under HAProxy's large-body bound
    with Client(router.address) as client:
        assert client.execute("echo", value=payload) == payload
        wait_for(lambda: _counted(port) == 1)
        sent = value(scrape(port), "snakepit_router_sent_bytes_total", method="ExecuteTool")
        # the bytes, the value's header, the worker's id and the call's duration
        assert len(payload) < sent < len(payload) + 100
        with pytest.raises(ToolError):
            client.execute("fail", message="boom")
        wait_for(lambda: _counted(port) == 2)
    after = value(scrape(port), "snakepit_router_sent_bytes_total", method="ExecuteTool")
    assert after == sent


@pytest.mark.parametrize("data_path", ["haproxy"], indirect=True)
def test_calls_haproxy_carries_while_the_router_is_stalled_are_all_counted(
    procs: ProcessFactory, data_path: str
) -> None:
    """HAProxy keeps serving tool calls while the router's Python process is stopped (its event
    loop busy, or descheduled); each call's log line waits for it. With lines sent as unix
    datagrams HAProxy dropped all but the 10 the socket queues (``net.unix.max_dgram_qlen``);
    the ring forwarded over a stream keeps them (``config.call_log_ring``)."""
    port = free_port()
    router, _ = start_pool(procs, 1, "--metrics-port", str(port), concurrency=4)
    with Client(router.address) as client:
        assert client.execute("add", a=1, b=1) == 2
        wait_for(lambda: _counted(port) == 1)
        router.signal(signal.SIGSTOP)
        try:
            for i in range(STALLED_CALLS):
                assert client.execute("add", a=i, b=1) == i + 1
        finally:
            router.signal(signal.SIGCONT)
    wait_for(lambda: _counted(port) == 1 + STALLED_CALLS)
    samples = scrape(port)
    assert value(samples, "snakepit_router_calls_total", tool="add", code="OK") == 1 + STALLED_CALLS
    assert samples.get(("snakepit_router_call_log_dropped_total", ())) == 0.0


STALLED_CALLS = 200


def _counted(port: int) -> float:
    """Tool calls the router's metrics count."""
    samples = scrape(port)
    return sum(v for (name, _), v in samples.items() if name == "snakepit_router_calls_total")


def test_held_calls_show_as_queued_then_as_a_wait_a_timeout_or_a_refusal(
    procs: ProcessFactory, data_path: str
) -> None:
    """One worker with one slot: a second call waits (the queued gauge, then the wait histogram);
    calls that wait out the queue timeout, and one that finds the queue full, are rejections."""
    port = free_port()
    router, _ = start_pool(
        procs, 1, "--metrics-port", str(port), "--queue-timeout", "2.5", "--queue-size", "2",
        concurrency=1,
    )  # fmt: skip
    with Client(router.address, timeout=30) as client, ThreadPoolExecutor(4) as threads:

        def sleep(seconds: float) -> Future[float]:
            return threads.submit(client.execute, "sleep", seconds=seconds)

        def now_queued(queued: int) -> bool:
            samples = scrape(port)
            return (
                value(samples, "snakepit_router_queued") == queued
                and value(samples, "snakepit_router_in_flight") == 1
                and value(samples, "snakepit_router_worker_in_flight", worker="worker-0") == 1
            )

        first, second = sleep(1.5), sleep(1.5)
        wait_for(lambda: now_queued(1), timeout=1.4)
        # what the autoscaler reads from a secured router: in flight + queued from /metrics
        assert asyncio.run(metrics_load("127.0.0.1", port)) == 2
        assert [first.result(), second.result()] == [1.5, 1.5]
        wait_for(lambda: value(scrape(port), "snakepit_router_queue_wait_seconds_count") == 1)
        samples = scrape(port)
        assert value(samples, "snakepit_router_queue_wait_seconds_sum") > 0.5
        assert value(samples, "snakepit_router_queued") == 0

        holder = sleep(4.0)
        wait_for(lambda: now_queued(0))  # the holder runs before anything queues
        waiting = [sleep(0.1), sleep(0.1)]
        wait_for(lambda: now_queued(2), timeout=2.0)
        with pytest.raises(ResourceExhausted):
            client.execute("add", a=1, b=2)
        for call in waiting:
            with pytest.raises(DeadlineExceeded):
                call.result()
        assert holder.result() == 4.0

    rejections = "snakepit_router_queue_rejections_total"
    wait_for(lambda: value(scrape(port), rejections, reason="queue_timeout") == 2)
    samples = scrape(port)
    assert value(samples, rejections, reason="queue_full") == 1
    calls = "snakepit_router_calls_total"
    assert value(samples, calls, tool="sleep", code="OK") == 3
    assert value(samples, calls, tool="sleep", code="DEADLINE_EXCEEDED") == 2
    assert value(samples, calls, tool="add", code="RESOURCE_EXHAUSTED") == 1
    assert value(samples, "snakepit_router_queue_wait_seconds_count") == 1
    # every held call took its seconds end to end
    assert (
        value(samples, "snakepit_router_call_duration_seconds_bucket", tool="sleep", le="1.0") == 0
    )
