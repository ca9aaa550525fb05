"""The operator's autoscaler against a real kube-apiserver and real router and worker processes.

The operator (a real process, the chart's RBAC) finds the pool's routers through the EndpointSlices
of ``<pool>-router``. This tier runs no pods, so the test plays the parts a node would: it adds
an EndpointSlice naming a real ``snakepit router`` process on loopback, and starts a real worker
process when the worker Deployment asks for one. Everything the autoscaler reads and writes is
real: GetPoolStatus and the capacity health stream of the router, the pool's status, its Events
and the Deployment the next reconcile pass sizes.
"""

from __future__ import annotations

import subprocess
import threading
import time
from typing import Any

import pytest

from snakepit import Client
from snakepit.operator.kube import ApiError
from tests.fixtures.processes import ProcessFactory, free_port
from tests.integration import test_operator_kube as kube_tests
from tests.integration.test_operator_kube import OperatorEnv, events_of, wait_for

op = kube_tests.op  # the same fixture: the operator as a process with the chart's RBAC

pytestmark = pytest.mark.kube


def desired(env: OperatorEnv, name: str) -> int | None:
    return (env.pool(name).get("status") or {}).get("desiredReplicas")


def deployment_replicas(env: OperatorEnv, name: str) -> int | None:
    found = env.get("apps/v1", "Deployment", f"{name}-workers")
    return None if found is None else int(found["spec"]["replicas"])


def host_address() -> str:
    """This machine's first non-loopback IPv4 address (EndpointSlices refuse loopback ones)."""
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True, check=True).stdout
    return next(a for a in out.split() if "." in a and not a.startswith("127."))


def put_router_slices(env: OperatorEnv, pool: str, ports: list[int]) -> None:
    """The EndpointSlices a node would produce for router pods: one per router, on this host."""
    url = f"/apis/discovery.k8s.io/v1/namespaces/{env.namespace}/endpointslices"
    host = host_address()
    for i in range(3):
        name = f"{pool}-router-test-{i}"
        if i >= len(ports):
            try:
                env.api.call("DELETE", f"{url}/{name}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
            continue
        body = {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "namespace": env.namespace,
                "labels": {
                    "kubernetes.io/service-name": f"{pool}-router",
                    "endpointslice.kubernetes.io/managed-by": "snakepit-tests",
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": ports[i], "protocol": "TCP"}],
            "endpoints": [
                {
                    "addresses": [host],
                    "conditions": {"ready": True},
                    "targetRef": {"kind": "Pod", "name": f"router-{i}", "namespace": env.namespace},
                }
            ],
        }
        try:
            env.api.call("POST", url, body)
        except ApiError as exc:
            if exc.status != 409:
                raise
            env.api.call("PUT", f"{url}/{name}", body)


class Load:
    """``threads`` calls to ``sleep`` kept in flight through the router, failures counted."""

    def __init__(self, client: Client, threads: int, seconds: float = 0.3) -> None:
        self.calls = 0
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(client, seconds), daemon=True)
            for _ in range(threads)
        ]
        for thread in self._threads:
            thread.start()

    def _run(self, client: Client, seconds: float) -> None:
        while not self._stop.is_set():
            try:
                client.execute("sleep", seconds=seconds)
                self.calls += 1
            except Exception as exc:
                self.failures.append(repr(exc))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)


def test_invalid_autoscaling_is_refused(op: OperatorEnv) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"autoscaling": {"minReplicas": 3, "maxReplicas": 2}}, "minReplicas must not exceed"),
        ({"autoscaling": {"minReplicas": 1}}, "spec.autoscaling.maxReplicas: Required value"),
        ({"autoscaling": {"maxReplicas": 0}}, "spec.autoscaling.maxReplicas"),
        ({"autoscaling": {"maxReplicas": 2, "targetLoadPerWorker": 0}}, "targetLoadPerWorker"),
        (
            {"workerConcurrency": 2, "autoscaling": {"maxReplicas": 2, "targetLoadPerWorker": 3}},
            "cannot exceed workerConcurrency",
        ),
    ]
    for i, (spec, message) in enumerate(cases):
        with pytest.raises(ApiError) as refused:
            op.create_pool(f"bad-scaling-{i}", spec)
        assert refused.value.status == 422
        assert message in refused.value.message, refused.value.message


def test_autoscaler_follows_the_routers_and_wakes_from_zero(
    op: OperatorEnv, procs: ProcessFactory
) -> None:
    name = "scaled"
    created = time.monotonic()
    op.create_pool(
        name,
        {
            # Plaintext and open: the router below is a process on this host playing a pod, and
            # a secured one would be read on the fixed health port 50054 and its /metrics
            # (tests/integration/test_autoscale_routers.py reads one so; the e2e autoscaling
            # test runs the default, secured spec on a real cluster).
            "tls": {"enabled": False},
            "auth": {"enabled": False},
            "workerConcurrency": 2,
            "router": {"replicas": 1},
            "autoscaling": {
                "minReplicas": 0,
                "maxReplicas": 3,
                "scaleDownWindowSeconds": 3,
                "scaleToZeroAfterSeconds": 4,
            },
        },
    )
    # Starting size: spec.replicas (default 2) within the limits, recorded in status.
    wait_for("the starting size in status", lambda: desired(op, name) == 2)
    wait_for("2 workers", lambda: deployment_replicas(op, name) == 2)

    worker_port = free_port()
    # Listening on every address: the operator reaches it at this host's address, as a pod IP.
    router = procs.router(
        [f"w0=127.0.0.1:{worker_port}"], "--worker-concurrency", "2", "--host", "0.0.0.0"
    )
    router_port = int(router.address.rsplit(":", 1)[1])
    put_router_slices(op, name, [router_port])

    # No calls at all: down to zero once the idle time has passed. The pool has had no load
    # since it was created (no router answered before the slices above), so the idle time runs
    # from its creation, not from the slices: starting the router may take longer than it.
    started = time.monotonic()
    wait_for("zero workers", lambda: deployment_replicas(op, name) == 0, timeout=30)
    idle = time.monotonic() - started
    assert desired(op, name) == 0
    assert time.monotonic() - created >= 4, "went to zero before the idle time"

    with Client(router.address, timeout=60) as client:
        # Scale from zero: the router holds the call and tells the operator at once.
        result: list[Any] = []
        called = time.monotonic()
        caller = threading.Thread(target=lambda: result.append(client.execute("add", a=1, b=2)))
        caller.start()
        wait_for("a worker asked for", lambda: deployment_replicas(op, name) == 1, timeout=20)
        woke = time.monotonic() - called
        procs.worker(
            "--store", "router", "--router", router.address,
            port=worker_port, worker_id="w0", concurrency=2,
        )  # fmt: skip  # the node starting the pod
        caller.join(timeout=30)
        answered = time.monotonic() - called
        assert result == [3.0]
        reason = (op.pool(name).get("status") or {}).get("lastScaleReason", "")
        assert reason.startswith("wake from zero")

        # 5 calls kept in flight, target 1.5 per worker: 4 wanted, 3 at most.
        load = Load(client, threads=5)
        try:
            wait_for("3 workers", lambda: deployment_replicas(op, name) == 3, timeout=20)
            # A second router that does not answer: its load is unknown, not zero.
            put_router_slices(op, name, [router_port, free_port()])
        finally:
            load.stop()
        quiet = time.monotonic()
        time.sleep(6)  # twice the scale-down window
        assert desired(op, name) == 3, "shrank while a router did not answer"
        put_router_slices(op, name, [router_port])
        wait_for("1 worker", lambda: desired(op, name) in (0, 1), timeout=20)
        wait_for("0 workers", lambda: deployment_replicas(op, name) == 0, timeout=20)
        down = time.monotonic() - quiet
    assert load.failures == []
    events = events_of(op, name)
    assert ("Normal", "ScaledUp") in events and ("Normal", "ScaledDown") in events
    print(
        f"\nautoscaler on kube-apiserver: idle -> 0 in {idle:.1f} s (window 4 s); held call -> "
        f"worker Deployment scaled in {woke:.2f} s, answered {answered:.2f} s after it was made "
        f"(worker process start included); load stop -> 0 in {down:.1f} s "
        f"(6 s of a silent router included); {load.calls} calls under load, 0 failed"
    )
