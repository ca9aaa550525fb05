"""Autoscaling on a real cluster: a load that steps up and down, then idles, then calls again.

One pool with ``spec.autoscaling`` (min 0, max 4, two routers, short windows so the run takes a
few minutes) behind the chart's operator. A load generator keeps a known number of calls in
flight through the router Service (``tests/support/ramp.py``: one thread per call in flight,
each with its own session, so the offered load is exact and acknowledged counter increments can
be checked afterwards). A timeline records, every half second, that number, the load the
operator's autoscaler last read from the routers (its ``snakepit_operator_autoscale_load``
metric), the pool's ``status.desiredReplicas``, its ready workers and the worker pods that
still exist (terminating ones included).

Asserted: the size the policy must reach at each step, within the windows plus pod start; no
shrink before the scale-down window, no zero before the idle time; every worker pod gone when
idle; the next call answered (its cold start is reported); **no failed call** in the whole run;
no acknowledged session write lost while workers left. The timeline is printed; with
``SNAKEPIT_AUTOSCALE_TIMELINE=path`` it is also written as JSON, which
``bench/plot_autoscaling.py`` draws (docs/autoscaling.png). ``SNAKEPIT_E2E_FULL=1`` runs it three
times in one session (a fresh pool each time).
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from localkube.providers import KubeCluster, wait_until
from snakepit.operator.kube import ApiError, Kube, path
from tests.e2e import test_pool_e2e as pool_e2e
from tests.e2e.report import report
from tests.support.ramp import RampLoad, Timeline

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(1500)]

ROUTER_PORT = 50051
OPERATOR_METRICS_PORT = 9090  # the chart's metrics.port
UP, DOWN, IDLE = 0, 20, 30  # the pool's windows (seconds)
CONCURRENCY = 2
TARGET = 0.75 * CONCURRENCY  # the default target load per worker: 1.5 calls in flight
POD_START = 120  # seconds a worker pod may take to start on a busy 2-core machine
# Each round a fresh pool, once on each data path (spec.router.dataPath): the Python router, and
# HAProxy, whose queue the autoscaler reads from the routers' /metrics and which hands a call
# that finds no worker to the Python router (the wake from zero).
DATA_PATHS = ("python", "haproxy")
ROUNDS = [
    f"{path}-{n}"
    for n in range(3 if os.environ.get("SNAKEPIT_E2E_FULL") else 1)
    for path in DATA_PATHS
]
_failed_rounds: list[str] = []  # a round that failed is not repeated: cluster time is shared

ns = pool_e2e.ns  # a namespace of this module, and an operator release watching it
release = pool_e2e.release


SPEC: dict[str, Any] = {
    "workerConcurrency": CONCURRENCY,
    "drainTimeoutSeconds": 10,
    "router": {"replicas": 2},
    "autoscaling": {
        "minReplicas": 0,
        "maxReplicas": 4,
        "scaleUpWindowSeconds": UP,
        "scaleDownWindowSeconds": DOWN,
        "scaleToZeroAfterSeconds": IDLE,
    },
}


@pytest.fixture(scope="module")
def api(kube_node: KubeCluster) -> Iterator[Kube]:
    from kubernetes import config

    loader: Any = config
    kube = Kube(loader.new_client_from_config(config_file=str(kube_node.kubeconfig)))
    yield kube
    kube.close()


class PoolProbe:
    """One timeline reading: autoscaler's load, desired, ready workers, worker pods left."""

    def __init__(self, api: Kube, namespace: str, pool: str, operator_namespace: str) -> None:
        self.api, self.namespace, self.pool = api, namespace, pool
        self.operator_namespace = operator_namespace
        self._metrics_url = ""
        # (monotonic time, the worker Deployment's spec.replicas): when the operator applied it
        self.deployment: list[tuple[float, int]] = []

    def status(self) -> dict[str, Any]:
        body = self.api.call(
            "GET", path("snakepit.dev/v1alpha1", "SnakepitPool", self.namespace, self.pool)
        )
        return dict(body.get("status") or {})

    def worker_pods(self) -> int:
        """Worker pods that exist, terminating ones included (they may still hold calls)."""
        selector = f"snakepit.dev/pool={self.pool},app.kubernetes.io/component=worker"
        pods = self.api.call(
            "GET",
            f"/api/v1/namespaces/{self.namespace}/pods",
            query=[("labelSelector", selector)],
        )
        return len(pods.get("items") or [])

    def autoscaler_load(self) -> float:
        """The load the operator read from the routers at its last round; -1 if unknown."""
        try:
            if not self._metrics_url:
                pods = self.api.call(
                    "GET",
                    f"/api/v1/namespaces/{self.operator_namespace}/pods",
                    query=[("labelSelector", "app.kubernetes.io/name=snakepit-operator")],
                )
                ips = [p["status"].get("podIP") for p in pods.get("items") or []]
                ip = next(ip for ip in ips if ip)
                self._metrics_url = f"http://{ip}:{OPERATOR_METRICS_PORT}/metrics"
            with urllib.request.urlopen(self._metrics_url, timeout=2) as response:
                text = response.read().decode()
        except (OSError, StopIteration, ApiError):
            self._metrics_url = ""
            return -1.0
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "snakepit_operator_autoscale_load" and sample.labels == {
                    "namespace": self.namespace,
                    "pool": self.pool,
                }:
                    return float(sample.value)
        return -1.0

    def deployment_replicas(self) -> None:
        url = f"/apis/apps/v1/namespaces/{self.namespace}/deployments/{self.pool}-workers"
        try:
            replicas = int(self.api.call("GET", url)["spec"]["replicas"])
        except (ApiError, KeyError):
            return
        if not self.deployment or self.deployment[-1][1] != replicas:
            self.deployment.append((time.monotonic(), replicas))

    def __call__(self) -> tuple[float, int, int, int]:
        status = self.status()
        self.deployment_replicas()
        return (
            self.autoscaler_load(),
            int(status.get("desiredReplicas", -1)),
            int(status.get("readyReplicas", 0)),
            self.worker_pods(),
        )


@pytest.mark.parametrize("round_", ROUNDS)
def test_pool_follows_a_stepped_load_idles_to_zero_and_wakes(
    kube_node: KubeCluster,
    ns: str,
    release: str,
    api: Kube,
    round_: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    if _failed_rounds:
        pytest.skip(f"round {_failed_rounds[0]} failed; not repeated")
    _failed_rounds.append(round_)  # until it passes
    pool = f"scaled-{round_}"
    data_path = round_.split("-")[0]
    spec = {**SPEC, "router": {**SPEC["router"], "dataPath": data_path}}
    kube_node.apply(pool_e2e.pool_manifest(kube_node, pool, spec), namespace=ns)
    results: dict[str, float] = {}
    try:
        # the operator's first pass creates the router Service a moment after the pool exists
        wait_until(
            "router Service",
            lambda: kube_node.kubectl_run(
                "-n", ns, "get", "svc", f"{pool}-router", check=False
            ).returncode == 0,
            timeout=120,
        )  # fmt: skip
        with kube_node.service_address(ns, f"{pool}-router", ROUTER_PORT) as address:
            # Secure by default: the load calls with a token and the pool's CA; the operator's
            # autoscaler reads the routers' /metrics and health port, needing neither.
            pool_e2e.host_caller(kube_node, ns, pool, address, tmp_path_factory.mktemp(pool))
            with pool_e2e.connect(address, timeout=30) as client:
                wait_until("router answers", client.ping, timeout=300)
            wait_until(
                f"both router pods say data path: {data_path}",
                lambda: _routers_on(kube_node, ns, pool, data_path),
                timeout=300,
            )
            load = RampLoad(
                address, call_seconds=0.25, timeout=60, client_options=pool_e2e.CALLERS[address]
            )
            probe = PoolProbe(api, ns, pool, release)
            timeline = Timeline(probe, lambda: load.level, 0.5)
            try:
                _steps(address, load, timeline, results)
            finally:
                load.stop()
                timeline.stop()
                lost = load.lost_increments() if load.calls else []
                load.close()
                applied = [(at - timeline.started, n) for at, n in probe.deployment]
                _record(timeline, results, load, round_, applied, _operator_log(kube_node, release))
    finally:
        kube_node.kubectl_run("-n", ns, "delete", "spp", pool, "--wait=false", check=False)
    assert load.failures == [], load.failures[:5]
    assert lost == []
    _failed_rounds.remove(round_)


def _steps(address: str, load: RampLoad, timeline: Timeline, results: dict[str, float]) -> None:
    """The stepped load: 2 calls in flight, 6, 1, none, then one call. Times are from the step."""
    start = timeline.mark("2 calls in flight")
    load.set_level(2)  # ceil(2 / 1.5) = 2 workers
    results["2 ready"] = timeline.wait(
        start, lambda p: p.desired == 2 and p.ready == 2 and p.total == 2, POD_START + 60
    )
    time.sleep(10)
    steady = [p for p in timeline.points if p.at > start + results["2 ready"]]
    assert {p.desired for p in steady} == {2}, timeline.table(0.5)

    up = timeline.mark("6 calls in flight")
    load.set_level(6)  # ceil(6 / 1.5) = 4 workers, the max
    results["decided 4"] = timeline.wait(up, lambda p: p.desired == 4, UP + 10)
    results["4 ready"] = timeline.wait(up, lambda p: p.ready == 4, UP + POD_START)
    time.sleep(10)
    peak = [p for p in timeline.points if p.at > up + results["4 ready"]]
    assert {p.desired for p in peak} == {4}, timeline.table(0.5)

    down = timeline.mark("1 call in flight")
    load.set_level(1)  # 1 worker, once the scale-down window holds nothing higher
    results["decided 1"] = timeline.wait(down, lambda p: p.desired == 1, DOWN + 15)
    results["1 left"] = timeline.wait(
        down, lambda p: p.ready == 1 and p.total == 1, DOWN + POD_START
    )
    assert results["decided 1"] >= DOWN - 1, "shrank before the scale-down window"

    quiet = timeline.mark("no calls")
    load.set_level(0)  # 0 workers after IDLE seconds without a call
    results["decided 0"] = timeline.wait(quiet, lambda p: p.desired == 0, IDLE + 15)
    results["0 left"] = timeline.wait(quiet, lambda p: p.total == 0, IDLE + POD_START)
    assert results["decided 0"] >= IDLE - 1, "went to zero before the idle time"
    time.sleep(3)

    cold = timeline.mark("one call")
    with pool_e2e.connect(address, timeout=60) as client:
        started = time.monotonic()
        try:
            answer = client.execute("add", a=1, b=2)
        finally:
            results["cold start"] = time.monotonic() - started
            # the wake as the pool saw it, also when the call failed
            woke = timeline.first(cold, lambda p: p.desired >= 1)
            if woke is not None:
                results["woke"] = woke
            ready = timeline.first(cold, lambda p: p.ready >= 1)
            if ready is not None:
                results["1 ready"] = ready
        assert answer == 3
    time.sleep(3)


def _routers_on(cluster: KubeCluster, ns: str, pool: str, data_path: str) -> bool:
    """Whether each of the pool's two router pods logged that it carries calls on
    ``data_path``."""
    routers = pool_e2e.pods(cluster, ns, "router", pool)
    logs = [
        cluster.kubectl_run("-n", ns, "logs", p["metadata"]["name"], check=False).stdout
        for p in routers
    ]
    return len(routers) == 2 and all(f"data path: {data_path}" in text for text in logs)


def _operator_log(cluster: KubeCluster, operator_namespace: str) -> list[str]:
    """The operator's own lines about scaling and reconciling (kopf's are left out)."""
    logs = cluster.kubectl_run(
        "-n", operator_namespace, "logs", "-l", "app.kubernetes.io/name=snakepit-operator",
        "--tail=-1", check=False,
    ).stdout  # fmt: skip
    return [ln for ln in logs.splitlines() if '"snakepit.' in ln]


def _record(
    timeline: Timeline,
    results: dict[str, float],
    load: RampLoad,
    round_: str,
    applied: list[tuple[float, int]],
    operator_log: list[str],
) -> None:
    """Print the timeline and the figures; write them as JSON for bench/plot_autoscaling.py."""
    print("\n" + timeline.table(1.0))
    print(
        "worker Deployment spec.replicas: " + ", ".join(f"{n} at {at:.1f} s" for at, n in applied)
    )
    summary = ", ".join(f"{k} {v:.1f} s" for k, v in results.items())
    line = (
        f"autoscaling e2e ({round_}): {summary}; {load.calls} calls, {len(load.failures)} failed "
        f"(windows: up {UP} s, down {DOWN} s, idle {IDLE} s; load average "
        f"{os.getloadavg()[0]:.1f})"
    )
    print(line)
    report(line)
    target = os.environ.get("SNAKEPIT_AUTOSCALE_TIMELINE")
    if target:
        Path(target.replace("{round}", str(round_))).write_text(
            json.dumps(
                {
                    "points": [p.__dict__ for p in timeline.points],
                    "marks": timeline.marks,
                    "results": results,
                    "calls": load.calls,
                    "failed": len(load.failures),
                    "windows": {"up": UP, "down": DOWN, "idle": IDLE, "target": TARGET},
                    "load_average": os.getloadavg(),
                    "deployment": applied,
                    "started_unix": time.time() - timeline.now(),
                },
                indent=1,
            )
        )
        Path(target.replace("{round}", str(round_)) + ".operator.log").write_text(
            "\n".join(operator_log) + "\n"
        )
