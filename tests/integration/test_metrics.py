"""Metrics checked through a real Prometheus server scraping a real ``snakepit serve`` pool.

The test makes a known set of calls, then asks Prometheus (its HTTP query API, after real
scrapes) whether the counters, the latency histogram and the queue gauge say what happened.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from snakepit import Client
from snakepit.errors import ToolError
from snakepit.metrics import OperatorMetrics, serve_http
from snakepit.metrics.common import MetricsServer
from snakepit.metrics.dashboard import dashboard
from tests.fixtures.processes import ProcessFactory, free_port
from tests.fixtures.prometheus import PrometheusServer

DASHBOARD = (
    Path(__file__).resolve().parents[2] / "charts" / "snakepit" / "dashboards" / "snakepit.json"
)

pytestmark = pytest.mark.timeout(120)

ADDS = 20
FAILS = 3
HELD = 6  # sleep calls against 2 workers x 1 slot: 4 of them wait in the queue
HOLD_SECONDS = 2.0


def test_prometheus_sees_calls_latency_and_queue(procs: ProcessFactory, prometheus_factory) -> None:  # type: ignore[no-untyped-def]
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
    # the queue rose while calls were held, and the calls that waited were timed
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
