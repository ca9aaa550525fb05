"""A pool's whole life on a real cluster, as users run it: Helm install, apply, call, break, remove.

The tests run in file order and share one operator release and one pool (``examples/pool.yaml``,
secure by default: operator-issued TLS on every hop, callers authenticated as ServiceAccounts of
the pool's namespace) in a namespace of this module. This machine calls it as the namespace's
ServiceAccount ``default`` (a token from ``kubectl create token --audience snakepit``, the pool's
CA from the Secret ``snakepit-certs``); client pods mount a projected token and the CA. Each
disruption runs a mixed load of 32 sessions (``tests/support/load.py``) through the router
Service while it breaks something, and checks that no call failed, that enough calls succeeded
for that to mean something, and that no acknowledged write was lost. Runs unchanged with
SNAKEPIT_E2E_CLUSTER=local|kind|existing (on kind the router Service is reached through a
port-forward).

Each planned disruption runs once in CI; ``SNAKEPIT_E2E_FULL=1`` repeats each as many times as
docs/reliability.md reports (scale 5->1 and 1->5 five times, router pod deletion five times, …).
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from localkube.config import Config
from localkube.providers import KubeCluster, wait_until
from snakepit import Client
from snakepit.errors import (
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ToolError,
    Unauthenticated,
    Unavailable,
)
from snakepit.protocol import method_path
from snakepit.protocol.messages import decode_result, encode_request
from snakepit.protocol.status import SESSION_ID_KEY
from snakepit.security.tls import ChannelTls
from tests.e2e.report import report
from tests.support.load import MixedLoad, Window
from tests.unit.test_operator_boundaries import METADATA, egress_reaches

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parents[2]
POOL = "demo"
ROUTER_PORT = 50051
AUDIENCE = "snakepit"  # the default spec.auth.audience
# What a client pod's script starts with: the pool's CA and the pod's ServiceAccount token,
# mounted by ``client_pod_manifest``.
POD_CREDENTIALS = """
from pathlib import Path
CA = "/etc/snakepit-ca/ca.crt"
TOKEN = Path("/var/run/secrets/snakepit/token").read_text().strip()
"""
# Client pods run this first. A NetworkPolicy engine admits a new pod's address a moment after the
# pod starts (kube-router adds it to the policy's ipset when it sees the pod): until then the
# router, and in direct mode the workers, refuse its connections. Real clusters behave the same
# (Calico, Cilium): a client that starts with its pod waits for that, as this does.
WAIT_ADMITTED = """
import socket, time
from snakepit import Client
from snakepit.errors import Unavailable

def wait_admitted(target):
    deadline = time.monotonic() + 90
    while True:
        try:
            with Client(target, timeout=5, ca=CA, token=TOKEN) as probe:
                probe.ping()
                addresses = [w["address"] for w in probe.routing_table()["workers"]]
            for address in addresses:
                host, port = address.rsplit(":", 1)
                socket.create_connection((host, int(port)), timeout=3).close()
            return
        except (Unavailable, OSError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
"""
SESSIONS = 32
FULL = bool(os.environ.get("SNAKEPIT_E2E_FULL"))


def rounds(full: int) -> range:
    """How many times a disruption is repeated: once in CI, ``full`` times for the record."""
    return range(full if FULL else 1)


# Router address (as this machine dials it) -> the Client keywords that call the pool there.
CALLERS: dict[str, dict[str, Any]] = {}


def connect(router: str, **options: Any) -> Client:
    """A client of the pool at ``router`` with the credentials registered for it."""
    return Client(router, **CALLERS.get(router, {}), **options)


def load_on(router: str) -> MixedLoad:
    return MixedLoad(router, sessions=SESSIONS, tensor_mb=1.0, client_options=CALLERS.get(router))


def pool_ca(cluster: KubeCluster, ns: str, pool: str) -> bytes:
    """The CA the operator issued the pool's certificate from (what a caller trusts)."""

    def issued() -> bytes:
        out = cluster.kubectl_run(
            "-n", ns, "get", "secret", "snakepit-certs", "-o", "json", check=False
        )  # fmt: skip
        data = json.loads(out.stdout).get("data", {}) if out.returncode == 0 else {}
        key = f"{pool}.ca.crt"
        return base64.b64decode(data[key]) if key in data else b""

    return bytes(wait_until(f"the CA of pool {pool}", issued, timeout=300))


def mint_token(cluster: KubeCluster, ns: str, account: str = "default") -> str:
    """A token of ``account`` for the pool's audience: what a default pool accepts from any
    ServiceAccount of its namespace (TokenReview), minted as a user outside the cluster would."""
    wait_until(
        f"ServiceAccount {account}",
        lambda: cluster.kubectl_run("-n", ns, "get", "sa", account, check=False).returncode == 0,
        timeout=60,
    )
    out = cluster.kubectl_run(
        "-n", ns, "create", "token", account, "--audience", AUDIENCE, "--duration", "3h"
    )  # fmt: skip
    return out.stdout.strip()


def host_caller(cluster: KubeCluster, ns: str, pool: str, address: str, directory: Path) -> None:
    """Register how this machine calls ``pool`` at ``address``: its CA, checked against the
    router Service's name (the address is a cluster IP or a port-forward), and a token."""
    ca = directory / f"{pool}-ca.pem"
    ca.write_bytes(pool_ca(cluster, ns, pool))
    CALLERS[address] = {
        "tls": ChannelTls(str(ca), server_name=f"{pool}-router.{ns}.svc"),
        "token": mint_token(cluster, ns),
    }


def principal_of(ns: str, account: str = "default") -> str:
    return f"system:serviceaccount:{ns}:{account}"


def steady(load: MixedLoad, seconds: float = 3.0) -> Window:
    """A window of the load with nothing broken: the latency a disruption is compared with."""
    with load.window("steady") as window:
        time.sleep(seconds)
    return window


def checked(window: Window, before: Window, min_calls: int = 30) -> None:
    """Report the window next to the steady state before it; no failure, enough calls."""
    report(
        f"{window.summary()}; p99 of short calls before "
        f"{before.percentile_ms(0.99, 'add'):.0f} ms, during "
        f"{window.percentile_ms(0.99, 'add'):.0f} ms"
    )
    window.check(min_calls=min_calls)


def helm_binary() -> str:
    cached = Config().helm_bin
    return str(cached) if cached.exists() else (shutil.which("helm") or "helm")


def kube_json(cluster: KubeCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl_run(*args, "-o", "json").stdout)


def pool_manifest(cluster: KubeCluster, name: str, spec: dict[str, Any]) -> str:
    """A SnakepitPool of ``spec`` that uses the images loaded into ``cluster`` as they are."""
    if cluster.pull_policy == "Never":
        spec = {**spec, "imagePullPolicy": "Never"}
    pool = {"apiVersion": "snakepit.dev/v1alpha1", "kind": "SnakepitPool"}
    return json.dumps({**pool, "metadata": {"name": name}, "spec": spec})


def pool_object(cluster: KubeCluster, ns: str) -> Any:
    return kube_json(cluster, "-n", ns, "get", "snakepitpool", POOL)


def condition(pool: Any, kind: str) -> dict[str, Any]:
    for cond in pool.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return dict(cond)
    return {}


def pool_ready(cluster: KubeCluster, ns: str, replicas: int | None = None) -> bool:
    pool = pool_object(cluster, ns)
    status = pool.get("status", {})
    want = pool["spec"]["replicas"] if replicas is None else replicas
    return (
        condition(pool, "Ready").get("status") == "True"
        and status.get("observedGeneration") == pool["metadata"]["generation"]
        and status.get("readyReplicas") == want
        and status.get("replicas") == want
    )


def pods(cluster: KubeCluster, ns: str, component: str, pool: str = POOL) -> list[Any]:
    selector = f"snakepit.dev/pool={pool},app.kubernetes.io/component={component}"
    items = kube_json(cluster, "-n", ns, "get", "pods", "-l", selector)["items"]
    return [p for p in items if not p["metadata"].get("deletionTimestamp")]


def helm(cluster: KubeCluster, *args: str, timeout: float = 600) -> str:
    import subprocess

    proc = subprocess.run(
        [helm_binary(), *args], env=cluster.env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, f"helm {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


# Module fixtures: one namespace, one operator release, one router address --------------------


@pytest.fixture(scope="module")
def ns(kube_node: KubeCluster) -> Iterator[str]:
    name = f"e2e-pool-{uuid.uuid4().hex[:6]}"
    kube_node.kubectl_run("create", "namespace", name)
    yield name
    kube_node.kubectl_run("delete", "namespace", name, "--wait=false", check=False)


def clear_orphaned_chart_objects(cluster: KubeCluster) -> None:
    """Delete the chart's cluster-scoped objects that no live release owns. One left behind (by
    a session killed before ``helm uninstall``, or by the operator tests, which ``kubectl
    apply`` the chart's RBAC) makes every later install fail ("… exists and cannot be imported
    into the current release"). The cluster lock this session holds means no other release is
    being installed meanwhile; one whose namespace still exists is left alone."""
    namespaces = {n["metadata"]["name"] for n in kube_json(cluster, "get", "namespaces")["items"]}
    for kind in ("clusterrolebinding", "clusterrole"):
        found = kube_json(cluster, "get", kind, "-l", "app.kubernetes.io/part-of=snakepit")
        for obj in found["items"]:
            annotations = obj["metadata"].get("annotations") or {}
            if annotations.get("meta.helm.sh/release-namespace") not in namespaces:
                name = obj["metadata"]["name"]
                report(f"deleting the orphaned {kind} {name} (no live release owns it)")
                cluster.kubectl_run("delete", kind, name, "--ignore-not-found", check=False)


@pytest.fixture(scope="module")
def release(kube_node: KubeCluster, ns: str) -> Iterator[str]:
    operator_ns = f"{ns}-system"
    clear_orphaned_chart_objects(kube_node)
    # Helm installs the chart's CRD only where none exists, and the cluster is shared: a CRD
    # left by a run of other code would prune the fields this code adds. What an upgrade
    # does (docs/operator.md): apply this chart's CRD first.
    kube_node.kubectl_run(
        "apply", "--server-side", "--force-conflicts",
        "-f", str(ROOT / "charts/snakepit/crds/snakepitpools.yaml"),
    )  # fmt: skip
    prefix = kube_node.image_prefix
    args = [
        "upgrade", "--install", "snakepit", str(ROOT / "charts/snakepit"),
        "--namespace", operator_ns, "--create-namespace", "--wait", "--timeout", "5m",
        "--set", f"image.repository={prefix}/operator",
        "--set", f"image.pullPolicy={kube_node.pull_policy}",
        "--set", f"workerImage={prefix}/worker:dev",
        "--set", f"redisImage={prefix}/redis:dev",
        "--set", f"watch.namespaces={{{ns}}}",
        "--set", f"test.pool={POOL}", "--set", f"test.namespace={ns}",
    ]  # fmt: skip
    started = time.monotonic()
    helm(kube_node, *args)
    report(f"helm install (operator ready): {time.monotonic() - started:.1f} s")
    yield operator_ns
    helm(
        kube_node,
        "uninstall",
        "snakepit",
        "--namespace",
        operator_ns,
        "--ignore-not-found",
        "--wait",
    )
    kube_node.kubectl_run("delete", "namespace", operator_ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def router(
    kube_node: KubeCluster, ns: str, release: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The router Service's address from this machine (created by the apply test), with the
    credentials to call it registered (``connect``, ``load_on``)."""
    wait_until(
        "router service",
        lambda: pool_object(kube_node, ns).get("status", {}).get("endpoint"),
        timeout=300,
    )
    with kube_node.service_address(ns, f"{POOL}-router", ROUTER_PORT) as address:
        host_caller(kube_node, ns, POOL, address, tmp_path_factory.mktemp("callers"))
        with connect(address, timeout=30) as client:
            wait_until("router answers", lambda: client.ping(), timeout=120)
        yield address


# The pool's life --------------------------------------------------------------------------------


def test_operator_is_ready_after_helm_install(kube_node: KubeCluster, release: str) -> None:
    deployment = kube_json(
        kube_node,
        "-n",
        release,
        "get",
        "deployment",
        "-l",
        "app.kubernetes.io/name=snakepit-operator",
    )
    (operator,) = deployment["items"]
    assert operator["status"].get("readyReplicas") == 1
    assert operator["spec"]["strategy"]["type"] == "Recreate"


def test_apply_the_example_pool_becomes_ready(
    kube_node: KubeCluster, ns: str, release: str
) -> None:
    # Fault tests below call crash(), which only the faults adapter has.
    manifest = (ROOT / "examples/pool.yaml").read_text()
    manifest = manifest.replace(
        "examples.showcase:ShowcaseAdapter", "examples.faults:FaultsAdapter"
    )
    if kube_node.pull_policy == "Never":
        manifest = manifest.replace("spec:\n", "spec:\n  imagePullPolicy: Never\n", 1)
    # This module's pool runs HAProxy as its routers' data path (spec.router.dataPath), so
    # every disruption below is proven on it (it is the default, auto, made explicit); the
    # metrics module runs HAProxy too, the autoscaling module each data path in turn, the
    # identity module the default.
    manifest = manifest.replace("  router:\n", "  router:\n    dataPath: haproxy\n", 1)
    started = time.monotonic()
    kube_node.apply(manifest, namespace=ns)
    wait_until("pool Ready", lambda: pool_ready(kube_node, ns), timeout=600, interval=0.5)
    elapsed = time.monotonic() - started
    report(f"apply examples/pool.yaml -> Ready: {elapsed:.1f} s")
    print(f"apply -> Ready in {elapsed:.1f} s")
    table = kube_node.kubectl_run("-n", ns, "get", "spp").stdout
    header, row = table.strip().splitlines()[:2]
    assert header.split()[:4] == ["NAME", "WORKERS", "READY", "ENDPOINT"]
    assert row.split()[:3] == [POOL, "2", "2"]
    assert f"{POOL}-router.{ns}" in row
    # HAProxy from the router image carries tool calls in every router pod.
    for pod in pods(kube_node, ns, "router"):
        logs = kube_node.kubectl_run("-n", ns, "logs", pod["metadata"]["name"]).stdout
        assert "data path: haproxy" in logs, logs[-2000:]


def test_helm_test_passes(kube_node: KubeCluster, release: str, router: str) -> None:
    helm(kube_node, "test", "snakepit", "--namespace", release, "--timeout", "5m")


def test_every_showcase_tool_through_the_router_service(router: str) -> None:
    with connect(router, timeout=60) as client:
        assert {t.name for t in client.list_tools()} >= {"echo", "add", "whoami", "sleep", "count", "fail",
                                                          "crash", "counter_increment", "tensor_sum",
                                                          "tensor_scale", "nested_add"}  # fmt: skip
        for value in [None, True, 3, 2.5, "text", b"\x00", [1, [2]], {"k": [None, 1.5]}]:
            assert client.execute("echo", value=value) == value
        assert client.execute("add", a=1, b=2) == 3
        assert client.execute("whoami")["worker_id"].startswith(f"{POOL}-workers-")
        assert client.execute("sleep", seconds=0.1) == 0.1
        assert list(client.stream("count", n=50)) == list(range(50))
        with pytest.raises(ToolError, match="boom") as failure:
            client.execute("fail", message="boom")
        assert failure.value.remote_type == "ValueError"
        assert client.execute("tensor_sum", x=np.ones((32, 32))) == 1024.0
        assert client.execute("nested_add", a=40, b=2) == 42
        big = np.random.default_rng(7).random(50 * 1024 * 1024 // 8)
        started = time.monotonic()
        echoed = client.execute("echo", value=big, timeout=120)
        report(
            f"50 MB tensor round trip through the router Service: {time.monotonic() - started:.2f} s"
        )
        assert echoed.dtype == big.dtype and np.array_equal(echoed, big)
        scaled = client.execute("tensor_scale", x=big[:1_000_000], factor=2.0, timeout=60)
        assert np.array_equal(scaled, big[:1_000_000] * 2)


def test_session_variables_affinity_and_tools_reading_them(router: str) -> None:
    with connect(router, timeout=60) as client, client.session() as session:
        session.set("lr", 0.01, type="float", constraints={"min": 0, "max": 1})
        with pytest.raises(InvalidArgument, match="above the maximum"):
            session.set("lr", 5.0)
        assert session.get("lr") == 0.01
        session.set("weights", np.arange(1000, dtype=np.float32))
        session.set("counter", 10, type="integer")
        assert (
            session.execute("counter_increment", by=5) == 15
        )  # a tool reads and writes the client's variable
        assert session.get("counter") == 15
        assert session.list().keys() == {"lr", "weights", "counter"}
        workers = {session.execute("whoami")["worker_id"] for _ in range(10)}
        assert len(workers) == 1  # one worker for the session's calls while it lives


# Secure by default -------------------------------------------------------------------------------

# Run in a worker pod (which the Redis NetworkPolicy admits): one PING to the pool's Redis in
# plaintext and one over TLS with the pool's CA. Redis answers a RESP line ("-NOAUTH ...": it
# wants the pool's password) only over TLS; in plaintext it closes the connection.
REDIS_PROBE = """
import json, socket, ssl, sys
host, port = sys.argv[1], 6379
def ping(tls):
    sock = socket.create_connection((host, port), timeout=5)
    if tls:
        context = ssl.create_default_context(cafile="/etc/snakepit/tls/ca.crt")
        sock = context.wrap_socket(sock, server_hostname=host)
    try:
        sock.sendall(b"PING\\r\\n")
        return sock.recv(200).decode("latin-1")
    except OSError as exc:
        return "error: " + type(exc).__name__
    finally:
        sock.close()
print(json.dumps({"plaintext": ping(False), "tls": ping(True)}))
"""


def test_the_default_pool_is_secured_and_refuses_plaintext_and_anonymous_callers(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    """examples/pool.yaml says nothing about TLS or auth: status shows both on, a plaintext
    client gets one clear error, a TLS client without a token UNAUTHENTICATED, and the managed
    Redis answers only over TLS."""
    status = pool_object(kube_node, ns)["status"]
    assert status["tls"] == "Issued by the operator (Secret snakepit-certs)"
    assert status["auth"] == {"enabled": True, "callers": [f"serviceaccount {ns}/*"]}
    with Client(router, timeout=10) as plaintext, pytest.raises(Unavailable, match="speaks TLS"):
        plaintext.ping()
    with (
        Client(router, timeout=10, tls=CALLERS[router]["tls"], token="") as anonymous,
        pytest.raises(Unauthenticated, match="requires a credential"),
    ):
        anonymous.execute("add", a=1, b=2)
    worker = pods(kube_node, ns, "worker")[0]["metadata"]["name"]
    out = kube_node.kubectl_run(
        "-n", ns, "exec", worker, "--", "python", "-c", REDIS_PROBE, f"{POOL}-redis.{ns}.svc"
    )  # fmt: skip
    answers = json.loads(out.stdout.strip().splitlines()[-1])
    report(f"Redis PING from a worker pod: {answers}")
    assert answers["tls"].startswith("-NOAUTH"), answers
    assert not answers["plaintext"].startswith(("+", "-")), answers


# NetworkPolicy enforcement (the local cluster runs kube-router's firewall as its engine) ---------

# Tries a TCP connection to every host:port argument, with bash's /dev/tcp (every image has bash,
# not every one Python): exit 0 is "open", 124 a timeout (a DROP), anything else a refusal (a
# policy REJECT) or a name that does not resolve.
REACH = (
    'for t in "$@"; do timeout 3 bash -c "exec 3<>/dev/tcp/${t%:*}/${t##*:}" 2>/dev/null; '
    'echo "$t $?"; done'
)
OUTCOME = {"0": "open", "124": "timeout"}
LISTEN_PORT = 8080  # the probe pods' own listener: an in-cluster target no pool rule allows
STORE, COMPONENT = "session-store", "app.kubernetes.io/component"


def _probe_pod(cluster: KubeCluster, ns: str, name: str) -> str:
    """A pod outside the pool (worker image, not a pool pod) that listens on LISTEN_PORT and
    from which ``_reach`` connects; returns its IP once it runs."""
    overrides = {"spec": {"securityContext": {"runAsNonRoot": True, "runAsUser": 10001}}}
    cluster.kubectl_run(
        "-n", ns, "run", name, "--restart=Never", "--labels=app=netpol-probe",
        f"--image={cluster.image('worker')}", f"--image-pull-policy={cluster.pull_policy}",
        f"--overrides={json.dumps(overrides)}", "--command", "--",
        "python", "-m", "http.server", str(LISTEN_PORT), "--directory", "/tmp",
    )  # fmt: skip
    cluster.kubectl_run("-n", ns, "wait", "pod", name, "--for=condition=Ready", "--timeout=120s")
    return str(kube_json(cluster, "-n", ns, "get", "pod", name)["status"]["podIP"])


def _reach(cluster: KubeCluster, ns: str, pod: str, targets: tuple[str, ...]) -> dict[str, str]:
    """What a connection from ``pod`` to each ``host:port`` does (see REACH)."""
    proc = cluster.kubectl_run("-n", ns, "exec", pod, "--", "bash", "-c", REACH, "reach", *targets)
    lines = (line.rsplit(" ", 1) for line in proc.stdout.strip().splitlines())
    return {target: OUTCOME.get(code, "refused") for target, code in lines}


def _all_blocked(cluster: KubeCluster, ns: str, pod: str, *targets: str) -> dict[str, str]:
    """Every target refused or timed out. Polled, like ``_all_open``: the engine applies a
    policy change, or a new pod's rules, a moment after the API has it."""

    def blocked() -> dict[str, str]:
        result = _reach(cluster, ns, pod, targets)
        return result if "open" not in result.values() else {}

    return wait_until(f"{pod} blocked from {targets}", blocked, timeout=60)


def _all_open(cluster: KubeCluster, ns: str, pod: str, *targets: str) -> dict[str, str]:
    def reached() -> dict[str, str]:
        result = _reach(cluster, ns, pod, targets)
        return result if set(result.values()) == {"open"} else {}

    return wait_until(f"{pod} reaches {targets}", reached, timeout=60)


@pytest.fixture(scope="module")
def probes(kube_node: KubeCluster, ns: str) -> Iterator[dict[str, tuple[str, str, str]]]:
    """Probe pods: one in the pool's namespace, one in a namespace no rule lists ("outside"),
    one in a namespace the router test lists ("clients"). Name -> (namespace, pod, IP).

    The tests that use them check what a NetworkPolicy engine does, so they are skipped on a
    cluster without one (kind with the node image built here, docs/local-cluster.md)."""
    if not kube_node.enforces_network_policies:
        pytest.skip(f"no NetworkPolicy engine on this {kube_node.provider} cluster")
    made = {}
    for role, namespace in (("inside", ns), ("outside", f"{ns}-out"), ("clients", f"{ns}-cli")):
        if namespace != ns:
            kube_node.kubectl_run("create", "namespace", namespace)
        made[role] = (namespace, f"probe-{role}", _probe_pod(kube_node, namespace, f"probe-{role}"))
    yield made
    # Gone before the next module: a bare pod left terminating blocks `kubectl drain`
    # (test_multinode.py) on a cluster of several nodes.
    for namespace, pod, _ in made.values():
        kube_node.kubectl_run(
            "-n", namespace, "delete", "pod", pod, "--grace-period=1", "--timeout=120s",
            check=False, timeout=150,
        )  # fmt: skip
    for namespace in (f"{ns}-out", f"{ns}-cli"):
        kube_node.kubectl_run("delete", "namespace", namespace, "--wait=false", check=False)


def _pool_targets(cluster: KubeCluster, ns: str) -> dict[str, list[str]]:
    """host:port of the router Service and of every router, worker and Redis pod."""
    ip = {
        c: [p["status"]["podIP"] for p in pods(cluster, ns, c)] for c in ("router", "worker", STORE)
    }
    return {
        "router": [f"{POOL}-router.{ns}.svc:{ROUTER_PORT}", *(f"{i}:{ROUTER_PORT}" for i in ip["router"])],
        "workers": [f"{i}:50052" for i in ip["worker"]],
        "redis": [f"{i}:6379" for i in ip[STORE]],
    }  # fmt: skip


def test_network_policies_keep_pods_outside_the_pool_off_workers_redis_and_router(
    kube_node: KubeCluster, ns: str, router: str, probes: dict[str, tuple[str, str, str]]
) -> None:
    targets = _pool_targets(kube_node, ns)
    assert targets["workers"] and targets["redis"]
    out_ns, out_pod, _ = probes["outside"]
    in_ns, in_pod, in_ip = probes["inside"]
    # The network works for pods without policies: the outsider reaches a pod in the pool's
    # namespace that no policy selects, so every refusal below is a policy's doing.
    _all_open(kube_node, out_ns, out_pod, f"{in_ip}:{LISTEN_PORT}")
    # A namespace the spec does not list reaches nothing of the pool, not even the router.
    refused = _all_blocked(
        kube_node, out_ns, out_pod, *targets["router"], *targets["workers"], *targets["redis"]
    )
    report(f"NetworkPolicy, pod in another namespace -> pool: {sorted(set(refused.values()))}")
    # A pod of the pool's namespace that is not a pool pod: the router (default routerClients),
    # but no worker (only the pool's pods call workers) and not Redis.
    _all_open(kube_node, in_ns, in_pod, *targets["router"])
    _all_blocked(kube_node, in_ns, in_pod, *targets["workers"], *targets["redis"])


def test_router_clients_admit_a_listed_namespace_and_only_it(
    kube_node: KubeCluster, ns: str, router: str, probes: dict[str, tuple[str, str, str]]
) -> None:
    cli_ns, cli_pod, _ = probes["clients"]
    out_ns, out_pod, _ = probes["outside"]
    listed = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cli_ns}}}
    patch = {"spec": {"networkPolicy": {"routerClients": [listed]}}}
    kube_node.kubectl_run("-n", ns, "patch", "spp", POOL, "--type=merge", "-p", json.dumps(patch))
    try:
        wait_until("policy applied", lambda: pool_ready(kube_node, ns), timeout=120, interval=0.5)
        targets = _pool_targets(kube_node, ns)
        _all_open(kube_node, cli_ns, cli_pod, *targets["router"])
        # The network admits the namespace; the pool still wants a caller it knows: a token of
        # a ServiceAccount of the pool's namespace, handed over with the pool's CA.
        ca = pool_ca(kube_node, ns, POOL).decode()
        call = (
            "import pathlib\nfrom snakepit import Client\n"
            f"pathlib.Path('/tmp/ca.pem').write_text({ca!r})\n"
            f"with Client('{POOL}-router.{ns}.svc:{ROUTER_PORT}', timeout=30, ca='/tmp/ca.pem',\n"
            f"            token={CALLERS[router]['token']!r}) as c:\n"
            "    print(c.execute('add', a=20, b=22))\n"
        )
        out = kube_node.kubectl_run("-n", cli_ns, "exec", cli_pod, "--", "python", "-c", call)
        assert out.stdout.strip().splitlines()[-1] == "42.0"
        # Listed for the router only: still no worker, no Redis; the unlisted namespace still
        # reaches nothing.
        _all_blocked(kube_node, cli_ns, cli_pod, *targets["workers"], *targets["redis"])
        _all_blocked(kube_node, out_ns, out_pod, *targets["router"])
    finally:
        unset = {"spec": {"networkPolicy": {"routerClients": None}}}
        kube_node.kubectl_run(
            "-n", ns, "patch", "spp", POOL, "--type=merge", "-p", json.dumps(unset)
        )
        wait_until("policy restored", lambda: pool_ready(kube_node, ns), timeout=120, interval=0.5)


def test_pool_pods_reach_only_what_their_egress_rules_allow(
    kube_node: KubeCluster, ns: str, router: str, probes: dict[str, tuple[str, str, str]]
) -> None:
    targets = _pool_targets(kube_node, ns)
    _, out_pod, out_ip = probes["outside"]
    outside = f"{out_ip}:{LISTEN_PORT}"
    api = "kubernetes.default.svc:443"
    # Control: a pod with no policy reaches both the API server and the outside listener.
    _all_open(kube_node, f"{ns}-out", out_pod, api, outside)
    worker = pods(kube_node, ns, "worker")[0]["metadata"]["name"]
    # A worker resolves names (DNS is allowed), reaches its router and Redis ...
    _all_open(kube_node, ns, worker, *targets["router"], *targets["redis"])
    # ... but neither the API server nor any other pod.
    _all_blocked(kube_node, ns, worker, api, outside)
    # The router reaches the API server (it watches EndpointSlices), not the outside pod.
    router_pod = pods(kube_node, ns, "router")[0]["metadata"]["name"]
    _all_open(kube_node, ns, router_pod, api, *targets["workers"], *targets["redis"])
    _all_blocked(kube_node, ns, router_pod, outside)
    # Redis connects nowhere.
    redis_pod = pods(kube_node, ns, STORE)[0]["metadata"]["name"]
    _all_blocked(kube_node, ns, redis_pod, outside, *targets["workers"])


def test_no_applied_egress_rule_reaches_the_cloud_metadata_address(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    """Checked on the policies the operator applied, never with traffic to that address."""
    policies = kube_json(kube_node, "-n", ns, "get", "networkpolicies")["items"]
    components = {p["spec"]["podSelector"]["matchLabels"][COMPONENT] for p in policies}
    assert components == {"router", "worker", STORE}
    for policy in policies:
        assert "Egress" in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get("egress", []):
            assert not egress_reaches(rule, METADATA), (policy["metadata"]["name"], rule)


def admit_direct_clients(kube_node: KubeCluster, ns: str) -> None:
    """What a user does: let the client pods through the workers' NetworkPolicy, and allow
    their principal (the namespace's ServiceAccount ``default``) direct mode. Each direct-mode
    test does it itself (idempotent), so none depends on another having run first."""
    peers = {
        "spec": {
            "networkPolicy": {
                "directClients": [
                    {"podSelector": {"matchLabels": {"snakepit.dev/direct-client": POOL}}}
                ]
            },
            "auth": {"directMode": [principal_of(ns)]},
        }
    }
    kube_node.kubectl_run("-n", ns, "patch", "spp", POOL, "--type=merge", "-p", json.dumps(peers))
    # The grant is a router flag: the routers roll; a client must not meet one of the old ones.
    wait_until("grant rolled out", lambda: _rolled_out(kube_node, ns), timeout=300, interval=0.5)


def test_direct_mode_from_a_pod_inside_the_cluster(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    admit_direct_clients(kube_node, ns)
    script = (
        POD_CREDENTIALS
        + WAIT_ADMITTED
        + f"""
import json, numpy as np
from snakepit import Client
target = "{POOL}-router.{ns}.svc:{ROUTER_PORT}"
wait_admitted(target)
out = {{}}
with (Client(target, timeout=30, ca=CA, token=TOKEN) as routed,
      Client(target, direct=True, timeout=30, ca=CA, token=TOKEN) as direct):
    out["add"] = [routed.execute("add", a=2, b=3), direct.execute("add", a=2, b=3)]
    x = np.arange(10000.0)
    out["scale"] = bool(np.array_equal(direct.execute("tensor_scale", x=x, factor=2), x * 2))
    same = []
    for i in range(6):
        s = routed.session(f"direct-{{i}}", keep=True)
        same.append(s.execute("whoami")["worker_id"] == direct.session(s.id, keep=True).execute("whoami")["worker_id"])
    out["same_worker"] = same
    out["workers"] = len(direct.routing_table()["workers"])
    before = routed.status()["calls_total"]
    out["direct_calls"] = [direct.execute("add", a=i, b=1) for i in range(5)]
    out["skipped_router"] = routed.status()["calls_total"] == before  # (one router replica)
print("RESULT " + json.dumps(out))
"""
    )
    result = json.loads(_client_pod_result(kube_node, ns, _start_client_pod(kube_node, ns, script)))
    assert result == {
        "add": [5.0, 5.0],
        "scale": True,
        "same_worker": [True] * 6,
        "workers": 2,
        "direct_calls": [1.0, 2.0, 3.0, 4.0, 5.0],
        "skipped_router": True,
    }


def client_pod_manifest(
    cluster: KubeCluster,
    name: str,
    script: str,
    pool: str,
    account: str = "default",
    labels: dict[str, str] | None = None,
) -> str:
    """A pod of ``account`` (the worker image) that runs ``script`` once, with a token of that
    ServiceAccount projected for the pool's audience at /var/run/secrets/snakepit/token and the
    pool's CA at /etc/snakepit-ca/ca.crt (what ``POD_CREDENTIALS`` reads)."""
    token = {"audience": AUDIENCE, "expirationSeconds": 3600, "path": "token"}
    ca = {"key": f"{pool}.ca.crt", "path": "ca.crt"}
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "serviceAccountName": account,
            "automountServiceAccountToken": False,
            "restartPolicy": "Never",
            "securityContext": {"runAsNonRoot": True, "runAsUser": 10001},
            "containers": [
                {
                    "name": "client",
                    "image": cluster.image("worker"),
                    "imagePullPolicy": cluster.pull_policy,
                    "command": ["python", "-c", script],
                    "volumeMounts": [
                        {"name": "token", "mountPath": "/var/run/secrets/snakepit"},
                        {"name": "ca", "mountPath": "/etc/snakepit-ca"},
                    ],
                }
            ],
            "volumes": [
                {"name": "token", "projected": {"sources": [{"serviceAccountToken": token}]}},
                {"name": "ca", "secret": {"secretName": "snakepit-certs", "items": [ca]}},
            ],
        },
    }
    return json.dumps(pod)


def _start_client_pod(cluster: KubeCluster, ns: str, script: str) -> str:
    """A pod labelled as a direct client of the pool that runs ``script`` once. It runs to
    completion on its own and its logs are read afterwards: attaching (`kubectl run -i`) loses
    what the script printed before the attach (kubernetes#27264)."""
    pod = f"client-{uuid.uuid4().hex[:6]}"
    labels = {"snakepit.dev/direct-client": POOL}
    cluster.apply(client_pod_manifest(cluster, pod, script, POOL, labels=labels), namespace=ns)
    return pod


def _client_pod_result(cluster: KubeCluster, ns: str, pod: str, timeout: float = 300) -> str:
    """Wait for the pod to finish; return what its ``RESULT `` line says, or fail with its
    phase and whole output."""
    try:
        phase = wait_until(
            "client pod finished", lambda: _finished_phase(cluster, ns, pod), timeout=timeout
        )
        logs = cluster.kubectl_run("-n", ns, "logs", pod, check=False)
        lines = [ln for ln in logs.stdout.splitlines() if ln.startswith("RESULT ")]
        assert phase == "Succeeded" and lines, (
            f"pod {pod}: phase {phase}\nstdout:\n{logs.stdout}\nstderr:\n{logs.stderr}"
        )
    finally:
        cluster.kubectl_run("-n", ns, "delete", "pod", pod, "--wait=false", check=False)
    return lines[0][len("RESULT ") :]


def _finished_phase(cluster: KubeCluster, ns: str, pod: str) -> str:
    phase = str(kube_json(cluster, "-n", ns, "get", "pod", pod)["status"].get("phase", ""))
    return phase if phase in ("Succeeded", "Failed") else ""


# Faults under a steady load ---------------------------------------------------------------------


def test_deleting_a_worker_pod_mid_session(kube_node: KubeCluster, ns: str, router: str) -> None:
    with (
        connect(router, timeout=60) as client,
        client.session() as session,
        load_on(router) as load,
    ):
        before = steady(load)
        session.set("data", np.arange(100.0))
        session.execute("counter_increment")
        victim = session.execute("whoami")["worker_id"]
        with load.window("delete a worker pod") as window:
            kube_node.kubectl_run("-n", ns, "delete", "pod", victim, "--wait=false")
            wait_until(
                "session moved",
                lambda: session.execute("whoami")["worker_id"] != victim,
                timeout=60,
            )
            assert session.execute("counter_increment") == 2
            assert np.array_equal(session.get("data"), np.arange(100.0))
            wait_until(
                "a replacement pod Ready",
                lambda: (
                    victim
                    not in {p["metadata"]["name"] for p in _all_pods(kube_node, ns, "worker")}
                    and len([p for p in pods(kube_node, ns, "worker") if _ready(p)]) == 2
                    and pool_ready(kube_node, ns)
                ),
                timeout=300,
                interval=0.5,
            )
        checked(window, before)
        load.check_no_acknowledged_write_lost()


def test_a_crashed_worker_fails_only_the_calls_running_on_it(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    """An unplanned failure has a bounded cost: the calls that were running on the worker fail
    with UNAVAILABLE (none is silently run again), every other call succeeds, and the pod
    restarts.

    The worker dies when it *runs* ``crash``, which may wait behind the calls already on it
    (4 slots, a backlog of 16, calls of up to a second or two under CI's load): the moment is
    when the crash call fails, which is when its connection to the worker breaks, and with it
    every call running there. A failed call that started after that went to a dead worker."""
    restarts = {p["metadata"]["name"]: _restarts(p) for p in pods(kube_node, ns, "worker")}
    with connect(router, timeout=60) as client, load_on(router) as load:
        before = steady(load)
        with load.window("crash() a worker") as window:
            with pytest.raises(Unavailable):
                client.execute("crash")
            died_at = time.monotonic()
            wait_until(
                "container restarted",
                lambda: any(
                    _restarts(p) > restarts.get(p["metadata"]["name"], 0)
                    for p in pods(kube_node, ns, "worker")
                ),
                timeout=120,
            )
            wait_until("pool Ready", lambda: pool_ready(kube_node, ns), timeout=300, interval=0.5)
            assert client.execute("add", a=1, b=1) == 2
        report(
            f"{window.summary()}; p99 of short calls before "
            f"{before.percentile_ms(0.99, 'add'):.0f} ms"
        )
        failed = [c for c in window.calls if c.error is not None]
        # Only calls under way when the worker died, at most what one worker holds at once:
        # its slots plus its backlog (4 + 16 for the example pool).
        assert all(c.error.startswith("UNAVAILABLE") for c in failed), window.failures[:5]
        # 0.25 s: the load thread's clock reading before it sends a call, against this thread's
        # after the crash call's failure reached it.
        assert all(c.started <= died_at + 0.25 for c in failed), window.failures[:5]
        # A call lost with the worker says so; it is not the caller's connection to the router
        # (whose failure the client explains with certificates).
        assert not any("certificate" in c.error for c in failed), window.failures[:5]
        assert len(failed) <= 20, window.failures[:5]
        assert window.succeeded >= 30
        load.check_no_acknowledged_write_lost()


def _restarts(pod: Any) -> int:
    return sum(c.get("restartCount", 0) for c in pod.get("status", {}).get("containerStatuses", []))


def _ready_count(cluster: KubeCluster, ns: str, component: str) -> int:
    return len([p for p in pods(cluster, ns, component) if _ready(p)])


@contextlib.contextmanager
def logs_kept(cluster: KubeCluster, ns: str, pod: str) -> Iterator[None]:
    """Follow ``pod``'s logs while the block runs, and add them to an assertion it raises: a
    deleted pod's logs are gone by the time the ``router`` fixture reads logs at a failure
    (stop 31: a kind failure of the test below could not be read to its end)."""
    with tempfile.TemporaryFile("w+") as kept:
        follower = subprocess.Popen(
            [cluster.kubectl, f"--kubeconfig={cluster.kubeconfig}", "-n", ns, "logs", "-f",
             "--all-containers", "--timestamps", pod],
            stdout=kept,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            yield
        except AssertionError as failure:
            follower.terminate()
            follower.wait(timeout=10)
            kept.seek(0)
            raise AssertionError(f"{failure}\n--- logs of {pod}:\n{kept.read()[-6000:]}") from None
        finally:
            follower.kill()
            follower.wait(timeout=10)


def test_deleting_a_router_pod_with_two_replicas(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    _two_routers(kube_node, ns)
    with load_on(router) as load:
        before = steady(load)
        for i in rounds(5):
            victim = pods(kube_node, ns, "router")[0]["metadata"]["name"]
            with logs_kept(kube_node, ns, victim):
                with load.window(f"delete a router pod (2 replicas) #{i + 1}") as window:
                    kube_node.kubectl_run("-n", ns, "delete", "pod", victim)
                    wait_until(
                        "two routers",
                        lambda: _ready_count(kube_node, ns, "router") == 2,
                        timeout=300,
                    )
                    time.sleep(2)
                checked(window, before)
        load.check_no_acknowledged_write_lost()


def test_a_router_rolling_update_fails_no_call(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    """``kubectl rollout restart`` of the router Deployment (2 replicas), as a user would."""
    with load_on(router) as load:
        before = steady(load)
        for i in rounds(3):
            with load.window(f"router rolling update #{i + 1}") as window:
                kube_node.kubectl_run("-n", ns, "rollout", "restart", f"deployment/{POOL}-router")
                kube_node.kubectl_run(
                    "-n", ns, "rollout", "status", f"deployment/{POOL}-router", "--timeout=300s",
                    timeout=320,
                )  # fmt: skip
                wait_until(
                    "old routers gone",
                    lambda: len(_all_pods(kube_node, ns, "router")) == 2,
                    timeout=120,
                )
                time.sleep(2)
            checked(window, before)
        load.check_no_acknowledged_write_lost()


def _lookup_price(item: str) -> float:
    prices = {"apple": 0.5, "fig": 1.25}
    if item not in prices:
        raise LookupError(f"no price for {item!r}")
    return prices[item]


def test_an_application_outside_the_cluster_hosts_a_tool_with_two_routers(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    """This process hosts lookup_price through the router Service; workers' tools call it."""
    _two_routers(kube_node, ns)
    with connect(router, timeout=60) as app, app.session() as session:
        app.register_tool("lookup_price", _lookup_price, description="Unit price")
        started = time.monotonic()
        calls = 0
        while time.monotonic() - started < 12:  # past the 5 s connection age: both replicas
            quote = session.execute("quote", items={"apple": 4, "fig": 2})
            assert quote == {"lines": {"apple": 2.0, "fig": 2.5}, "total": 4.5}
            calls += 1
        report(f"quotes priced by a tool hosted outside the cluster: {calls} in 12 s")
        with pytest.raises(ToolError, match="no price for 'kiwi'") as failure:
            session.execute("quote", items={"kiwi": 1})
        assert failure.value.remote_type == "LookupError"
        listed = {t.name: t.caller_hosted for t in session.list_tools()}
        assert listed["lookup_price"] and not listed["quote"]
    # Pool-wide, for the principal the pool allows (spec.hostedTools.poolWidePrincipals; this
    # machine calls as the namespace's ServiceAccount default): sessions of a client that hosts
    # nothing reach it, whichever replica the worker's call and the host's stream went through.
    grant = {"spec": {"hostedTools": {"poolWidePrincipals": [principal_of(ns)]}}}
    kube_node.kubectl_run("-n", ns, "patch", "spp", POOL, "--type=merge", "-p", json.dumps(grant))
    wait_until("grant rolled out", lambda: _rolled_out(kube_node, ns), timeout=300, interval=0.5)
    with (
        connect(router, timeout=60) as host,
        connect(router, timeout=60) as caller,
        caller.session() as session,
    ):
        host.register_tool("lookup_price", _lookup_price, pool_wide=True)
        started = time.monotonic()
        while time.monotonic() - started < 12:
            assert session.execute("quote", items={"fig": 2})["total"] == 2.5
        assert {t.name for t in caller.list_tools() if t.pool_wide} == {"lookup_price"}
    if not kube_node.host_reaches_cluster_ips:
        return  # the pinned check below needs the router pods' own addresses
    # Pinned: the stream on router pod A, the calling tool's call entering at pod B, which
    # forwards it to A by pod address (the call a worker's ctx.call_tool makes).
    # Two Ready routers: a pod that is not (yet, or no longer) Ready may not listen at all.
    serving = [p for p in pods(kube_node, ns, "router") if _ready(p)]
    assert len(serving) >= 2, [(p["metadata"]["name"], p.get("status")) for p in serving]
    a, b = (f"{p['status']['podIP']}:{ROUTER_PORT}" for p in serving[:2])
    caller = CALLERS[router]  # the same CA and name (one certificate for the pool), and token
    tls: ChannelTls = caller["tls"]
    with Client(a, timeout=60, **caller) as app, app.session() as session:
        app.register_tool("lookup_price", _lookup_price)
        with grpc.secure_channel(b, tls.credentials(), options=tls.options()) as channel:
            call = channel.unary_unary(method_path("ExecuteHostedTool"))
            request = encode_request("lookup_price", {"item": "fig"}, session.id)
            metadata = (
                (SESSION_ID_KEY, session.id),
                ("authorization", f"Bearer {caller['token']}"),
            )
            answer = call(request, timeout=30, metadata=metadata)
        assert decode_result(answer).value == 1.25


def _rolled_out(cluster: KubeCluster, ns: str) -> bool:
    """The pool's current spec runs on every pod, and no old pod is left."""
    pool = pool_object(cluster, ns)
    return (
        pool_ready(cluster, ns)
        and condition(pool, "Progressing").get("reason") == "RolloutComplete"
        and len(_all_pods(cluster, ns, "router")) == pool["spec"]["router"]["replicas"]
    )


def _two_routers(kube_node: KubeCluster, ns: str) -> None:
    kube_node.kubectl_run(
        "-n", ns, "patch", "spp", POOL, "--type=merge", "-p", '{"spec":{"router":{"replicas":2}}}'
    )
    wait_until("two routers", lambda: _ready_count(kube_node, ns, "router") == 2, timeout=300)


def _ready(pod: Any) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in pod.get("status", {}).get("conditions", [])
    )


def test_deleting_the_redis_pod_keeps_every_variable(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    """Calls wait out the managed Redis restart (graceful delete: it writes its AOF first)."""
    with connect(router, timeout=60) as client:
        session = client.session("redis-survivor", keep=True)
        written = {f"v{i}": i * 1.5 for i in range(50)}
        session.set_many(written)
        session.set("matrix", np.eye(64))
        with load_on(router) as load:
            before = steady(load)
            for i in rounds(3):
                (redis_pod,) = pods(kube_node, ns, "session-store")
                with load.window(f"delete the Redis pod #{i + 1}") as window:
                    kube_node.kubectl_run("-n", ns, "delete", "pod", redis_pod["metadata"]["name"])
                    wait_until(
                        "pool Ready", lambda: pool_ready(kube_node, ns), timeout=300, interval=0.5
                    )
                    wait_until(
                        "store answers",
                        lambda: session.get("v0") == 0.0,
                        timeout=120,
                        interval=0.5,
                    )
                checked(window, before, min_calls=10)
            load.check_no_acknowledged_write_lost()
        assert session.get_many(list(written)) == written
        assert np.array_equal(session.get("matrix"), np.eye(64))
        session.close()


def _scale(cluster: KubeCluster, ns: str, replicas: int) -> None:
    cluster.kubectl_run("-n", ns, "scale", f"spp/{POOL}", f"--replicas={replicas}")


def _wait_scaled(cluster: KubeCluster, ns: str, replicas: int) -> None:
    wait_until(
        f"{replicas} workers",
        lambda: pool_ready(cluster, ns, replicas),
        timeout=300,
        interval=0.5,
    )
    wait_until(
        "old pods gone",
        lambda: len(_all_pods(cluster, ns, "worker")) == replicas,
        timeout=120,
    )


def test_scaling_workers_5_1_5_fails_no_call(kube_node: KubeCluster, ns: str, router: str) -> None:
    _scale(kube_node, ns, 5)
    _wait_scaled(kube_node, ns, 5)
    with load_on(router) as load:
        before = steady(load)
        for i in rounds(5):
            for replicas in (1, 5):
                with load.window(f"kubectl scale spp --replicas={replicas} #{i + 1}") as window:
                    _scale(kube_node, ns, replicas)
                    _wait_scaled(kube_node, ns, replicas)
                checked(window, before)
        load.check_no_acknowledged_write_lost()


def test_direct_mode_load_from_a_pod_during_a_scale_fails_no_call(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    """The same mixed load in direct mode (the client routes itself to worker pods) from a pod
    in the cluster, while the pool scales 2 -> 4 -> 2. The pod keeps its window open until the
    test says the disruption is over (a variable in a control session)."""
    admit_direct_clients(kube_node, ns)
    control = f"direct-load-{uuid.uuid4().hex[:6]}"
    script = (
        (ROOT / "tests/support/load.py").read_text()
        + POD_CREDENTIALS
        + WAIT_ADMITTED
        + f"""
import json
target = "{POOL}-router.{ns}.svc:{ROUTER_PORT}"
wait_admitted(target)
with Client(target, timeout=30, ca=CA, token=TOKEN) as control, MixedLoad(
    target, sessions=16, direct=True, tensor_mb=0.5, client_options={{"ca": CA, "token": TOKEN}}
) as load:
    flag = control.session("{control}", keep=True)
    flag.set("window", "open")
    with load.window("direct mode from a pod") as window:
        deadline = time.monotonic() + 600
        while flag.get("window") != "closed" and time.monotonic() < deadline:
            time.sleep(0.5)
    load.check_no_acknowledged_write_lost()
print("RESULT " + json.dumps({{"summary": window.summary(), "ok": window.succeeded,
                              "failures": window.failures[:5]}}))
"""
    )
    pod = _start_client_pod(kube_node, ns, script)
    with connect(router, timeout=30) as client:
        flag = client.session(control, keep=True)
        wait_until("the pod's load runs", lambda: flag.get("window", None) == "open", timeout=300)
        time.sleep(3)
        for replicas in (4, 2):
            _scale(kube_node, ns, replicas)
            _wait_scaled(kube_node, ns, replicas)
        time.sleep(2)
        flag.set("window", "closed")
        result = json.loads(_client_pod_result(kube_node, ns, pod))
        flag.close()
    report(result["summary"])
    assert not result["failures"], result
    assert result["ok"] >= 30, result


def test_deleting_the_operator_during_a_scale_fails_no_call(
    kube_node: KubeCluster, ns: str, router: str, release: str
) -> None:
    """The operator is gone mid-change; its replacement finishes the scale."""
    with load_on(router) as load:
        before = steady(load)
        for i, replicas in zip(rounds(3), (2, 4, 2), strict=False):
            with load.window(f"delete the operator while scaling to {replicas} #{i + 1}") as window:
                _scale(kube_node, ns, replicas)
                kube_node.kubectl_run(
                    "-n", release, "delete", "pod", "-l", "app.kubernetes.io/name=snakepit-operator"
                )
                _wait_scaled(kube_node, ns, replicas)
            checked(window, before)
        load.check_no_acknowledged_write_lost()
    _scale(kube_node, ns, 2)
    _wait_scaled(kube_node, ns, 2)


def _all_pods(cluster: KubeCluster, ns: str, component: str) -> list[Any]:
    selector = f"snakepit.dev/pool={POOL},app.kubernetes.io/component={component}"
    return list(kube_json(cluster, "-n", ns, "get", "pods", "-l", selector)["items"])


def test_changing_the_worker_image_rolls_with_no_failed_call(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    images = [kube_node.tag_image("worker", "dev-rolled"), kube_node.image("worker")]
    with load_on(router) as load:
        before = steady(load)
        for i in rounds(3):
            new_image = images[i % 2]
            with load.window(f"change the worker image tag #{i + 1}") as window:
                kube_node.kubectl_run(
                    "-n", ns, "patch", "spp", POOL, "--type=merge",
                    "-p", json.dumps({"spec": {"image": new_image}}),
                )  # fmt: skip
                wait_until(
                    "rolled",
                    lambda image=new_image: (
                        pool_ready(kube_node, ns)
                        and all(
                            p["spec"]["containers"][0]["image"] == image
                            for p in _all_pods(kube_node, ns, "worker")
                        )
                    ),
                    timeout=600,
                    interval=0.5,
                )
            checked(window, before)
        load.check_no_acknowledged_write_lost()


# Bad input at the door --------------------------------------------------------------------------


def test_an_invalid_pool_spec_is_refused_by_the_api_server(kube_node: KubeCluster, ns: str) -> None:
    bad = """
apiVersion: snakepit.dev/v1alpha1
kind: SnakepitPool
metadata: {name: broken}
spec: {replicas: 1, adapter: "not-a-module-path"}
"""
    proc = kube_node.kubectl_run("-n", ns, "apply", "-f", "-", input=bad, check=False)
    assert proc.returncode != 0
    assert "spec.adapter" in proc.stderr


def test_bad_calls_get_clear_errors_and_leave_the_pool_healthy(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    with connect(router, timeout=60) as client:
        with pytest.raises(NotFound, match="unknown tool 'no_such_tool'"):
            client.execute("no_such_tool")
        with pytest.raises(
            InvalidArgument, match="argument 'a' of tool 'add' must be of type float"
        ):
            client.execute("add", a="x", b=1)
        with pytest.raises(ResourceExhausted):
            client.execute(
                "echo", value=np.zeros(300 * 1024 * 1024 // 8, dtype=np.float64), timeout=120
            )
        caller = CALLERS[router]
        tls: ChannelTls = caller["tls"]
        bearer = (("authorization", f"Bearer {caller['token']}"),)
        with grpc.secure_channel(router, tls.credentials(), options=tls.options()) as channel:
            raw = channel.unary_unary(method_path("SetVariable"))
            with pytest.raises(grpc.RpcError) as garbage:
                raw(b"\x12\xff\xff\xff\xff\x0f", timeout=10, metadata=bearer)
            assert garbage.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        host, port = router.rsplit(":", 1)
        import socket

        with socket.create_connection((host, int(port)), timeout=10) as sock:  # not even HTTP/2
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" + bytes(range(256)))
            sock.recv(1024)
        assert client.execute("add", a=1, b=2) == 3
        assert pool_ready(kube_node, ns)


# Teardown ------------------------------------------------------------------------------------


def test_deleting_the_pool_removes_every_child(
    kube_node: KubeCluster, ns: str, router: str
) -> None:
    kube_node.kubectl_run("-n", ns, "delete", "spp", POOL, "--wait=true", timeout=300)

    def leftovers() -> list[str]:
        kinds = (
            "deployments,statefulsets,services,secrets,serviceaccounts,roles,rolebindings,"
            "poddisruptionbudgets,networkpolicies,pods"
        )
        items = kube_json(kube_node, "-n", ns, "get", kinds, "-l", f"snakepit.dev/pool={POOL}")[
            "items"
        ]
        return [f"{i['kind']}/{i['metadata']['name']}" for i in items]

    wait_until("children gone", lambda: not leftovers(), timeout=300, interval=1)


def test_helm_uninstall_removes_the_operator(kube_node: KubeCluster, release: str) -> None:
    helm(kube_node, "uninstall", "snakepit", "--namespace", release, "--wait")
    left = kube_json(
        kube_node,
        "-n",
        release,
        "get",
        "deployments,pods,serviceaccounts",
        "-l",
        "app.kubernetes.io/instance=snakepit",
    )
    assert not [i for i in left["items"] if not i["metadata"].get("deletionTimestamp")]
