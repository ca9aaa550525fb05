"""A pool on several nodes: pods spread, a node drained under load, a node lost under load.

Needs a cluster with at least two schedulable nodes: ``SNAKEPIT_E2E_CLUSTER=kind
SNAKEPIT_E2E_KIND_NODES=3`` (a control plane and two workers); on a single node every test here
is skipped with that reason. The operator release, namespace and router address come from the
pool tests' module fixtures (a release of their own, installed for this module).

Stopping a node needs a provider that can (kind: ``docker stop`` of the node's container); the
others skip that test.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from localkube.providers import KubeCluster, Provider, wait_until
from tests.e2e import test_pool_e2e as pool_e2e
from tests.e2e.report import report
from tests.e2e.test_pool_e2e import POOL, ROOT, kube_json, pods, pool_ready
from tests.support.load import MixedLoad

# The pool tests' module fixtures (a namespace, an operator release, the router's address),
# instantiated again for this module.
ns = pool_e2e.ns
release = pool_e2e.release
router = pool_e2e.router

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(1200)]

WORKERS = 4
ROUTERS = 2


def schedulable_nodes(cluster: KubeCluster) -> list[str]:
    nodes = kube_json(cluster, "get", "nodes")["items"]
    return sorted(
        n["metadata"]["name"]
        for n in nodes
        if not n["spec"].get("unschedulable")
        and not any(t.get("effect") == "NoSchedule" for t in n["spec"].get("taints", []))
    )


def ready(pod: Any) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


def placement(cluster: KubeCluster, ns: str, component: str) -> dict[str, str]:
    """{pod: node} of the component's live, Ready pods."""
    return {
        p["metadata"]["name"]: p["spec"].get("nodeName", "")
        for p in pods(cluster, ns, component)
        if ready(p)
    }


@pytest.fixture(scope="module")
def several_nodes(kube_node: KubeCluster) -> None:
    if len(schedulable_nodes(kube_node)) < 2:
        pytest.skip(
            "needs two schedulable nodes (SNAKEPIT_E2E_CLUSTER=kind SNAKEPIT_E2E_KIND_NODES=3)"
        )


@pytest.fixture(scope="module")
def pool(several_nodes: None, kube_node: KubeCluster, ns: str, release: str) -> Iterator[str]:
    """The example pool with four workers and two routers, Ready."""
    manifest = (ROOT / "examples/pool.yaml").read_text()
    manifest = manifest.replace("replicas: 2\n", f"replicas: {WORKERS}\n", 1)
    manifest = manifest.replace("    replicas: 1\n", f"    replicas: {ROUTERS}\n", 1)
    if kube_node.pull_policy == "Never":
        manifest = manifest.replace("spec:\n", "spec:\n  imagePullPolicy: Never\n", 1)
    kube_node.apply(manifest, namespace=ns)
    wait_until("pool Ready", lambda: pool_ready(kube_node, ns), timeout=600, interval=0.5)
    wait_until(
        "routers Ready",
        lambda: len(placement(kube_node, ns, "router")) == ROUTERS,
        timeout=300,
    )
    yield POOL
    kube_node.kubectl_run("-n", ns, "delete", "spp", POOL, "--wait=true", timeout=300)


def test_worker_and_router_pods_spread_across_nodes(
    kube_node: KubeCluster, ns: str, pool: str
) -> None:
    nodes = schedulable_nodes(kube_node)
    workers = placement(kube_node, ns, "worker")
    routers = placement(kube_node, ns, "router")
    report(f"{len(nodes)} schedulable nodes; workers on {sorted(workers.values())}")
    assert len(workers) == WORKERS
    assert set(workers.values()) == set(nodes), workers
    assert len(set(routers.values())) == ROUTERS, routers


def store_node(cluster: KubeCluster, ns: str) -> str:
    (store,) = pods(cluster, ns, "session-store")
    return str(store["spec"]["nodeName"])


def _drain_under_load(kube_node: KubeCluster, ns: str, router: str, victim: str) -> None:
    """``kubectl drain`` of ``victim`` under a steady load: no call fails, no write is lost."""
    with pool_e2e.connect(router, timeout=60) as client, client.session() as session:
        session.set("weights", np.arange(256.0))
        session.set("counter", 0, type="integer")
        with MixedLoad(
            router, sessions=16, tensor_mb=0.5, client_options=pool_e2e.CALLERS.get(router)
        ) as load:
            with load.window(f"kubectl drain {victim}") as window:
                kube_node.kubectl_run(
                    "drain", victim, "--ignore-daemonsets", "--delete-emptydir-data",
                    "--timeout=300s", timeout=330,
                )  # fmt: skip
                wait_until(
                    "pool Ready off the drained node",
                    lambda: (
                        pool_ready(kube_node, ns)
                        and victim not in placement(kube_node, ns, "worker").values()
                        and len(placement(kube_node, ns, "router")) == ROUTERS
                    ),
                    timeout=300,
                    interval=0.5,
                )
                time.sleep(2)
            report(window.summary())
            window.check()
            load.check_no_acknowledged_write_lost()
        assert session.execute("counter_increment") == 1
        assert np.array_equal(session.get("weights"), np.arange(256.0))


def test_draining_a_node_under_load_fails_no_call(
    kube_node: KubeCluster, pool: str, ns: str, router: str
) -> None:
    # The session store is one pod on one node's volume: drain a node without it.
    victim = next(n for n in schedulable_nodes(kube_node) if n != store_node(kube_node, ns))
    assert victim in placement(kube_node, ns, "worker").values()
    try:
        _drain_under_load(kube_node, ns, router, victim)
    finally:  # a failed drain must not leave the node cordoned for the next test
        kube_node.kubectl_run("uncordon", victim)
    # Back to an even spread for the next test: let the scheduler place fresh pods.
    kube_node.kubectl_run("-n", ns, "rollout", "restart", f"deployment/{POOL}-workers")
    wait_until(
        "workers on every node again",
        lambda: (
            pool_ready(kube_node, ns)
            and set(placement(kube_node, ns, "worker").values())
            == set(schedulable_nodes(kube_node))
        ),
        timeout=300,
        interval=1,
    )


def test_losing_a_node_moves_its_sessions_with_their_variables(
    kube_node: KubeCluster, pool: str, kube_provider: Provider, ns: str, router: str
) -> None:
    if not hasattr(kube_provider, "stop_node"):
        pytest.skip(f"the {kube_provider.name} provider cannot stop a node (kind can)")
    victim = next(n for n in schedulable_nodes(kube_node) if n != store_node(kube_node, ns))
    with pool_e2e.connect(router, timeout=60) as client:
        # Sessions until some are served by a worker on the victim node.
        on_victim = []
        workers = placement(kube_node, ns, "worker")
        for i in range(40):
            session = client.session(f"lost-node-{i}", keep=True)
            session.set("vector", np.full(16, float(i)))
            session.set("n", i, type="integer")
            if workers.get(session.execute("whoami")["worker_id"]) == victim:
                on_victim.append(session)
            if len(on_victim) == 3:
                break
        assert on_victim, f"no session landed on {victim}: {workers}"
        with MixedLoad(
            router, sessions=16, tensor_mb=0.5, client_options=pool_e2e.CALLERS.get(router)
        ) as load:
            with load.window(f"docker stop {victim}") as window:
                started = time.monotonic()
                kube_provider.stop_node(victim)

                def sessions_moved() -> bool:
                    now = placement(kube_node, ns, "worker")
                    for s in on_victim:
                        worker = s.execute("whoami", timeout=10)["worker_id"]
                        if now.get(worker, victim) == victim:
                            return False
                    return True

                wait_until("sessions served off the lost node", sessions_moved, timeout=300)
                moved = time.monotonic() - started
                wait_until(
                    "pool Ready without the lost node",
                    lambda: (
                        pool_ready(kube_node, ns)
                        and victim not in placement(kube_node, ns, "worker").values()
                    ),
                    timeout=300,
                    interval=1,
                )
                rescheduled = time.monotonic() - started
            report(
                f"docker stop {victim}: sessions served elsewhere after {moved:.1f} s, pool Ready "
                f"again after {rescheduled:.1f} s; {window.summary()}"
            )
            load.check_no_acknowledged_write_lost()
        for s in on_victim:
            i = int(s.id.rsplit("-", 1)[1])
            assert s.get("n") == i
            assert np.array_equal(s.get("vector"), np.full(16, float(i)))
            assert s.execute("counter_increment") == 1
    kube_provider.start_node(victim)
    wait_until(
        f"{victim} Ready again",
        lambda: any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in kube_json(kube_node, "get", "node", victim)["status"]["conditions"]
        ),
        timeout=300,
        interval=2,
    )
