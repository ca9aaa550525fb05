"""A real Prometheus finds the pool on the cluster by Kubernetes pod discovery and scrapes it.

Prometheus runs on this machine (built from its Go module by ``scripts/local-cluster build``)
with the scrape job docs/observability.md tells users to copy, parsed from that page: ``role: pod``
discovery and the relabelling that keeps annotated pods' ``metrics`` port and adds ``pool``,
``component``, ``namespace`` and ``pod`` (what the chart's PodMonitor does). Outside the cluster
it needs what a pod would get for free: the API server's address, the cluster CA and a
ServiceAccount token; the account has only get/list/watch on pods in the pool's namespace.

Then the test makes a known number of calls through the router Service and asks Prometheus'
HTTP API: every router and worker target is up and labelled, the call counters (router and
workers, by tool and code) and the latency histogram's count equal the calls made, and the queue
depth rose while calls beyond the pool's slots were held.

It needs the host to reach pod IPs (the local provider routes the pod range): a Prometheus in
the cluster scrapes pod IPs the same way, and the pool's NetworkPolicies admit the metrics port
from anywhere.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from localkube.providers import KubeCluster, wait_until
from snakepit.errors import ToolError
from tests.e2e import test_pool_e2e as pool_e2e
from tests.e2e.report import report
from tests.fixtures.prometheus import (
    PROMETHEUS_MODULE_VERSION,
    PrometheusServer,
    kubernetes_capable_prometheus,
    kubernetes_scrape_config,
)

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(900)]

POOL = "metered"
ROUTER_PORT = 50051
WORKERS, ROUTERS, CONCURRENCY = 2, 2, 2
SLOTS = WORKERS * CONCURRENCY  # calls one router runs at once; more wait in its queue
ADDS, FAILS = 40, 5
HELD, HOLD_SECONDS = 12, 4.0  # at least 12 - 2 x 4 calls wait, whichever router gets them

ns = pool_e2e.ns  # a namespace of this module, and an operator release watching it
release = pool_e2e.release


SPEC = {
    "replicas": WORKERS,
    "workerConcurrency": CONCURRENCY,
    "router": {"replicas": ROUTERS, "dataPath": "haproxy"},
}


def scraper_account(cluster: KubeCluster, namespace: str, directory: Path) -> tuple[Path, Path]:
    """A ServiceAccount that may only watch the namespace's pods: its token and the cluster CA."""
    name = f"prometheus-{uuid.uuid4().hex[:6]}"
    rbac = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name}},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": name},
            "rules": [
                {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": namespace}],
        },
    ]
    cluster.apply(json.dumps({"apiVersion": "v1", "kind": "List", "items": rbac}), namespace)
    token = cluster.kubectl_run("-n", namespace, "create", "token", name, "--duration=1h")
    token_file = directory / "token"
    token_file.write_text(token.stdout.strip())
    ca = cluster.kubectl_run(
        "config", "view", "--raw", "--minify",
        "-o", "jsonpath={.clusters[0].cluster.certificate-authority-data}",
    ).stdout  # fmt: skip
    ca_file = directory / "ca.crt"
    ca_file.write_bytes(base64.b64decode(ca))
    return token_file, ca_file


def api_server(cluster: KubeCluster) -> str:
    return cluster.kubectl_run(
        "config", "view", "--minify", "-o", "jsonpath={.clusters[0].cluster.server}"
    ).stdout.strip()


def ready_workers(cluster: KubeCluster, namespace: str) -> int:
    pool = pool_e2e.kube_json(cluster, "-n", namespace, "get", "snakepitpool", POOL)
    return int(pool.get("status", {}).get("readyReplicas", 0))


@pytest.fixture(scope="module")
def router(
    kube_node: KubeCluster, ns: str, release: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    if not kube_node.host_reaches_cluster_ips:
        pytest.skip(f"the {kube_node.provider} provider does not route pod IPs to this machine")
    kube_node.apply(pool_e2e.pool_manifest(kube_node, POOL, SPEC), namespace=ns)
    wait_until(
        "pool ready", lambda: ready_workers(kube_node, ns) == WORKERS, timeout=600, interval=0.5
    )
    with kube_node.service_address(ns, f"{POOL}-router", ROUTER_PORT) as address:
        # Secure by default: the calls carry a token and trust the pool's CA; the scrapes do
        # not need them (/metrics is plaintext HTTP, open to any scraper: observability.md).
        pool_e2e.host_caller(kube_node, ns, POOL, address, tmp_path_factory.mktemp("metered"))
        with pool_e2e.connect(address, timeout=30) as client:
            wait_until("router answers", client.ping, timeout=120)
        yield address


@pytest.fixture(scope="module", autouse=True)
def prometheus_binary() -> Path:
    """Checked before the module installs anything on the cluster."""
    binary = kubernetes_capable_prometheus()
    if binary is None:
        pytest.fail(
            "Debian's prometheus has no Kubernetes service discovery; build Prometheus "
            f"{PROMETHEUS_MODULE_VERSION} from its Go module: scripts/local-cluster build",
            pytrace=False,
        )
    return binary


@pytest.fixture
def prometheus(
    kube_node: KubeCluster, ns: str, tmp_path: Path, prometheus_binary: Path
) -> Iterator[PrometheusServer]:
    binary = prometheus_binary
    token, ca = scraper_account(kube_node, ns, tmp_path)
    config = kubernetes_scrape_config(api_server(kube_node), [ns], token, ca, interval="1s")
    server = PrometheusServer(tmp_path / "prometheus", config, binary)
    yield server
    server.stop()


def test_prometheus_discovers_the_pool_and_its_numbers_match_the_calls(
    kube_node: KubeCluster, ns: str, router: str, prometheus: PrometheusServer
) -> None:
    pool = f'pool="{POOL}",namespace="{ns}"'
    started = time.monotonic()
    wait_until(
        "every router and worker target up",
        lambda: prometheus.value(f"count(up{{{pool}}} == 1)") == ROUTERS + WORKERS,
        timeout=120,
        interval=0.5,
    )
    discovered = time.monotonic() - started
    targets = [t for t in prometheus.targets() if t["labels"].get("pool") == POOL]
    by_component = sorted(t["labels"]["component"] for t in targets)
    assert by_component == ["router"] * ROUTERS + ["worker"] * WORKERS, targets
    assert all(t["health"] == "up" for t in targets), targets
    assert all(t["labels"]["pod"].startswith(f"{POOL}-") for t in targets), targets
    assert all(t["labels"]["namespace"] == ns for t in targets), targets
    assert all(t["scrapeUrl"].endswith(":9090/metrics") for t in targets), targets
    # Redis has no metrics port and is not annotated: discovered, then dropped by the relabelling
    assert not [t for t in targets if "redis" in t["labels"]["pod"]]

    with pool_e2e.connect(router, timeout=60) as client:
        for i in range(ADDS):
            assert client.execute("add", a=i, b=1) == i + 1
        for _ in range(FAILS):
            with pytest.raises(ToolError, match="boom"):
                client.execute("fail", message="boom")
        with ThreadPoolExecutor(HELD) as threads:
            held = [
                threads.submit(client.execute, "sleep", seconds=HOLD_SECONDS) for _ in range(HELD)
            ]
            # While the calls are held: Prometheus itself sees calls waiting in a router's queue.
            queued_now = prometheus.wait_for(
                f"sum(snakepit_router_queued{{{pool}}})",
                lambda v: v is not None and v >= HELD - 2 * SLOTS,
                timeout=HOLD_SECONDS * 2,
            )
            assert [f.result() for f in held] == [HOLD_SECONDS] * HELD

    calls = f'snakepit_router_calls_total{{{pool},component="router"'
    prometheus.wait_for(f'sum({calls},tool="add",code="OK"}})', lambda v: v == ADDS, 30)
    prometheus.wait_for(f'sum({calls},tool="sleep",code="OK"}})', lambda v: v == HELD, 30)
    assert prometheus.value(f'sum({calls},tool="fail",code="INTERNAL"}})') == FAILS
    assert prometheus.value(f'sum({calls},code!="OK"}})') == FAILS
    histogram = f"snakepit_router_call_duration_seconds_count{{{pool}"
    assert prometheus.value(f'sum({histogram},tool="add"}})') == ADDS
    assert prometheus.value(f'sum({histogram},tool="sleep"}})') == HELD
    # every held call took HOLD_SECONDS or more: none is in a bucket below it
    buckets = f'snakepit_router_call_duration_seconds_bucket{{{pool},tool="sleep",le="1.0"}}'
    assert prometheus.value(f"sum({buckets})") == 0

    worker_calls = f'snakepit_worker_calls_total{{{pool},component="worker"'
    prometheus.wait_for(f'sum({worker_calls},tool="add",code="OK"}})', lambda v: v == ADDS, 30)
    assert prometheus.value(f'sum({worker_calls},tool="fail",code="INTERNAL"}})') == FAILS
    tool_time = f'snakepit_worker_tool_duration_seconds_count{{{pool},tool="add"}}'
    assert prometheus.value(f"sum({tool_time})") == ADDS

    queued_max = prometheus.value(f"max_over_time(sum(snakepit_router_queued{{{pool}}})[5m:1s])")
    waited = prometheus.value(f"sum(snakepit_router_queue_wait_seconds_count{{{pool}}})")
    assert queued_max is not None and HELD - 2 * SLOTS <= queued_max <= HELD - SLOTS
    assert waited is not None and HELD - 2 * SLOTS <= waited <= HELD - SLOTS
    ready = prometheus.value(f'max(snakepit_router_workers{{{pool},state="ready"}})')
    assert ready == WORKERS
    report(
        f"Prometheus on the host, Kubernetes pod discovery: {ROUTERS} routers + {WORKERS} "
        f"workers up {discovered:.1f} s after start; {ADDS} add + {FAILS} fail + {HELD} held "
        f"calls counted exactly; queue depth seen while held {queued_now:g} (max {queued_max:g}),"
        f" {waited:g} calls timed in the queue"
    )
