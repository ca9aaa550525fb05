"""Autoscaling on a real cluster: a load that steps up and down, then idles, then calls again.

One pool with ``spec.autoscaling`` (min 0, max 4, two routers) behind the chart's operator. A
load generator keeps a known number of calls in flight (``tests/support/ramp.py``); a timeline
records, every half second, that number, the pool's ``status.desiredReplicas`` and its ready
workers. Asserted: the size the policy must reach at each step, within the windows plus pod
start; zero when idle; the next call answered; **no failed call** in the whole run; no session
write lost while workers left. The timeline is printed; with ``SNAKEPIT_AUTOSCALE_TIMELINE=path``
it is also written as JSON, which ``bench/plot_autoscaling.py`` draws (docs/autoscaling-e2e.png).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from snakepit import Client
from snakepit.operator.kube import Kube, path
from tests.e2e import test_pool_e2e as pool_e2e
from tests.e2e.cluster.providers import KubeCluster, wait_until
from tests.e2e.report import report
from tests.support.ramp import RampLoad, Timeline

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(1500)]

POOL = "scaled"
ROUTER_PORT = 50051
UP, DOWN, IDLE = 0, 20, 30  # the pool's windows (seconds)
TARGET = 1.5  # 0.75 x workerConcurrency 2

ns = pool_e2e.ns  # a namespace of this module, and an operator release watching it
release = pool_e2e.release


def manifest(pull_policy: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "workerConcurrency": 2,
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
    if pull_policy == "Never":
        spec["imagePullPolicy"] = "Never"
    return {
        "apiVersion": "snakepit.dev/v1alpha1",
        "kind": "SnakepitPool",
        "metadata": {"name": POOL},
        "spec": spec,
    }


@pytest.fixture(scope="module")
def api(kube_node: KubeCluster) -> Iterator[Kube]:
    from kubernetes import config

    loader: Any = config
    kube = Kube(loader.new_client_from_config(config_file=str(kube_node.kubeconfig)))
    yield kube
    kube.close()


def pool_status(api: Kube, namespace: str) -> dict[str, Any]:
    body = api.call("GET", path("snakepit.dev/v1alpha1", "SnakepitPool", namespace, POOL))
    return dict(body.get("status") or {})


def test_pool_follows_a_stepped_load_idles_to_zero_and_wakes(
    kube_node: KubeCluster, ns: str, release: str, api: Kube
) -> None:
    kube_node.apply(json.dumps(manifest(kube_node.pull_policy)), namespace=ns)
    wait_until(
        "the pool's starting workers ready",
        lambda: pool_status(api, ns).get("readyReplicas") == 2,
        timeout=600,
        interval=0.5,
    )
    with kube_node.service_address(ns, f"{POOL}-router", ROUTER_PORT) as address:
        load = RampLoad(address, call_seconds=0.25, timeout=60)

        def probe() -> tuple[float, int, int, int]:
            status = pool_status(api, ns)
            return (
                float(load.level),
                int(status.get("desiredReplicas", -1)),
                int(status.get("readyReplicas", 0)),
                int(status.get("replicas", 0)),
            )

        timeline = Timeline(probe, lambda: load.level, interval=0.5)
        results: dict[str, float] = {}
        try:
            load.set_level(2)
            time.sleep(15)
            assert timeline.points[-1].desired == 2  # ceil(2 / 1.5)

            up = timeline.mark("6 calls in flight")
            load.set_level(6)
            results["decided 4"] = timeline.wait(up, lambda p: p.desired == 4, 10)
            results["4 ready"] = timeline.wait(up, lambda p: p.ready == 4, UP + 120)
            time.sleep(15)
            assert {p.desired for p in timeline.points if p.at > up + results["4 ready"]} == {4}

            down = timeline.mark("1 call in flight")
            load.set_level(1)
            results["decided 1"] = timeline.wait(down, lambda p: p.desired == 1, DOWN + 15)
            results["1 ready"] = timeline.wait(
                down, lambda p: p.ready == 1 and p.total == 1, DOWN + 60
            )
            assert results["decided 1"] >= DOWN - 2, "shrank before the scale-down window"

            quiet = timeline.mark("no calls")
            load.set_level(0)
            results["decided 0"] = timeline.wait(quiet, lambda p: p.desired == 0, IDLE + 15)
            results["0 left"] = timeline.wait(quiet, lambda p: p.total == 0, IDLE + 60)
            assert results["decided 0"] >= IDLE - 2, "went to zero before the idle time"
            time.sleep(3)

            timeline.mark("one call")
            with Client(address, timeout=60) as client:
                started = time.monotonic()
                assert client.execute("add", a=1, b=2) == 3
                results["cold start"] = time.monotonic() - started
            time.sleep(3)
        finally:
            load.stop()
            timeline.stop()
            lost = load.lost_increments() if load.calls else []
            load.close()
    print("\n" + timeline.table(1.0))
    summary = ", ".join(f"{k} {v:.1f} s" for k, v in results.items())
    line = (
        f"autoscaling e2e: {summary}; {load.calls} calls, {len(load.failures)} failed "
        f"(windows: up {UP} s, down {DOWN} s, idle {IDLE} s)"
    )
    print(line)
    report(line)
    target = os.environ.get("SNAKEPIT_AUTOSCALE_TIMELINE")
    if target:
        Path(target).write_text(
            json.dumps(
                {
                    "points": [p.__dict__ for p in timeline.points],
                    "marks": timeline.marks,
                    "results": results,
                    "windows": {"up": UP, "down": DOWN, "idle": IDLE, "target": TARGET},
                },
                indent=1,
            )
        )
    assert load.failures == []
    assert lost == []
