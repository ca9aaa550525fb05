"""The operator against a real kube-apiserver (control-plane tier: etcd, apiserver, controllers).

The operator runs as a real process (``python -m snakepit operator``) authenticated as the Helm
chart's ServiceAccount with the chart's RBAC (rendered by ``helm template``, token minted by the
TokenRequest API), so every test here also proves the chart grants enough. No pod runs in this
tier: the controllers create pods that are never scheduled. Where a test needs ready pods it
patches the pods' status subresource to Ready, as a kubelet would; the ReplicaSet, Deployment
and StatefulSet controllers then compute their status from those pods as usual.

Cluster: the ``kube_control_plane`` fixture (localkube), or an existing API server
named by ``SNAKEPIT_TEST_KUBECONFIG``.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest

from snakepit.operator.kube import ApiError, Kube, path
from tests.fixtures.processes import free_port

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "snakepit"
CRD = ROOT / "crds" / "snakepitpools.yaml"
POOLS = ("snakepit.dev/v1alpha1", "SnakepitPool")
TOKENREVIEW_BINDING = "snakepit-tokenreviewer"  # the chart's, for the release name "snakepit"

pytestmark = pytest.mark.kube

T = TypeVar("T")


# ---------------------------------------------------------------- cluster access


def tool(name: str) -> str:
    """kubectl/helm: the local cluster's pinned builds when present, else from PATH."""
    try:
        sys.path.insert(0, str(ROOT))
        from localkube.config import Config

        pinned = {"kubectl": Config().kubectl_bin, "helm": Config().helm_bin}[name]
        if pinned.exists():
            return str(pinned)
    except Exception:
        pass
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed")
    return found


def admin_kubeconfig(request: pytest.FixtureRequest) -> Path:
    try:
        plane = request.getfixturevalue("kube_control_plane")
    except pytest.FixtureLookupError:
        existing = os.environ.get("SNAKEPIT_TEST_KUBECONFIG")
        if not existing:
            pytest.skip(
                "needs a kube-apiserver: the kube_control_plane fixture "
                "(localkube) or SNAKEPIT_TEST_KUBECONFIG"
            )
        return Path(existing)
    for attr in ("kubeconfig", "admin_kubeconfig", "kubeconfig_path"):
        value = getattr(plane, attr, None)
        if value:
            return Path(value)
    if isinstance(plane, dict) and plane.get("kubeconfig"):
        return Path(plane["kubeconfig"])
    return Path(plane)


@dataclass
class Kubectl:
    kubeconfig: Path
    binary: str = field(default_factory=lambda: tool("kubectl"))

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.binary, f"--kubeconfig={self.kubeconfig}", *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
        return proc

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def server_version(self) -> str:
        return str(self.json("version")["serverVersion"]["gitVersion"]).lstrip("v")


def api_client(kubeconfig: Path) -> Kube:
    """Synchronous in-process API access (fast polling for latency measurements)."""
    from kubernetes import config

    loader: Any = config
    return Kube(loader.new_client_from_config(config_file=str(kubeconfig)))


def wait_for(
    what: str, probe: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.02
) -> T:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except (ApiError, KeyError, IndexError, TypeError) as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last})")


def helm_template(namespace: str, kube_version: str, *args: str) -> str:
    proc = subprocess.run(
        [
            tool("helm"),
            "template",
            "snakepit",
            str(CHART),
            "--namespace",
            namespace,
            "--kube-version",
            kube_version,
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def install_crd(kubectl: Kubectl) -> None:
    kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
    kubectl.run(
        "wait", "--for=condition=Established", "crd/snakepitpools.snakepit.dev", "--timeout=60s"
    )


# ---------------------------------------------------------------- the operator under test


@dataclass
class OperatorEnv:
    admin: Kubectl
    api: Kube
    namespace: str
    sa_kubeconfig: Path
    log_path: Path
    liveness_port: int = 0
    metrics_port: int = 0
    process: subprocess.Popen[bytes] | None = None
    latencies: dict[str, list[float]] = field(default_factory=dict)
    scope: list[str] = field(default_factory=list)  # operator flags; default: this namespace

    def get(self, api_version: str, kind: str, name: str) -> dict[str, Any] | None:
        try:
            return self.api.call("GET", path(api_version, kind, self.namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    def pool(self, name: str) -> dict[str, Any]:
        found = self.get(*POOLS, name)
        assert found is not None, f"pool {name} is gone"
        return found

    def patch_pool(self, name: str, patch: dict[str, Any]) -> float:
        """Merge-patch a pool's spec; returns the monotonic time the API server accepted it."""
        self.api.call(
            "PATCH",
            path(*POOLS, self.namespace, name),
            patch,
            "application/merge-patch+json",
        )
        return time.monotonic()

    def create_pool(self, name: str, spec: dict[str, Any]) -> dict[str, Any]:
        body = {
            "apiVersion": POOLS[0],
            "kind": POOLS[1],
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": spec,
        }
        return self.api.call("POST", path(*POOLS, self.namespace), body)

    def start(self) -> None:
        self.liveness_port = free_port()
        self.metrics_port = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.sa_kubeconfig),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "SNAKEPIT_RESYNC_SECONDS": "3",
            "SNAKEPIT_ROUTER_IMAGE": "snakepit/operator:dev",
            "SNAKEPIT_TOKENREVIEW_BINDING": TOKENREVIEW_BINDING,  # as the chart sets it
            "SNAKEPIT_LOG_LEVEL": "INFO",
        }
        env.pop("KUBERNETES_SERVICE_HOST", None)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "snakepit",
                    "operator",
                    *(self.scope or ["--namespace", self.namespace]),
                    "--liveness-port",
                    str(self.liveness_port),
                    "--metrics-port",
                    str(self.metrics_port),
                ],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        url = f"http://127.0.0.1:{self.liveness_port}/healthz"

        def healthy() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"operator exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    return bool(resp.status == 200)
            except OSError:
                return False

        wait_for("the operator's liveness endpoint", healthy, timeout=60, interval=0.2)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        self.process = None

    def record(self, what: str, seconds: float) -> None:
        self.latencies.setdefault(what, []).append(seconds)


def service_account_kubeconfig(admin: Kubectl, namespace: str, account: str, dest: Path) -> Path:
    """A kubeconfig for the chart's ServiceAccount, with a token from the TokenRequest API."""
    token = admin.run("create", "token", account, "-n", namespace, "--duration=2h").stdout.strip()
    view = admin.json("config", "view", "--raw", "--minify")
    cluster = view["clusters"][0]["cluster"]
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": account}}],
        "current-context": "c",
    }
    dest.write_text(json.dumps(doc))
    dest.chmod(0o600)
    return dest


@pytest.fixture(scope="module")
def op(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorEnv]:
    admin = Kubectl(admin_kubeconfig(request))
    namespace = f"spp-it-{uuid.uuid4().hex[:6]}"
    admin.run("create", "namespace", namespace)
    install_crd(admin)
    rbac = helm_template(
        namespace,
        admin.server_version(),
        "--show-only",
        "templates/serviceaccount.yaml",
        "--show-only",
        "templates/rbac.yaml",
    )
    admin.run("apply", "-f", "-", stdin=rbac)
    work = tmp_path_factory.mktemp("operator")
    env = OperatorEnv(
        admin=admin,
        api=api_client(admin.kubeconfig),
        namespace=namespace,
        sa_kubeconfig=service_account_kubeconfig(
            admin, namespace, "snakepit", work / "operator.kubeconfig"
        ),
        log_path=work / "operator.log",
    )
    env.start()
    try:
        yield env
    finally:
        env.stop()
        # The chart's cluster-scoped RBAC outlives the namespace, and a later `helm install`
        # refuses objects it does not own: take them away too.
        admin.run(
            "delete", "--ignore-not-found", "--wait=false", "-f", "-", stdin=rbac, check=False
        )
        admin.run("delete", "namespace", namespace, "--wait=false", check=False)
        if env.latencies:
            summary = {
                k: {
                    "n": len(v),
                    "median_ms": round(statistics.median(v) * 1000, 1),
                    "max_ms": round(max(v) * 1000, 1),
                }
                for k, v in env.latencies.items()
            }
            print("\nreconcile latency (spec change or deletion -> child updated):")
            print(json.dumps(summary, indent=1))


# ---------------------------------------------------------------- helpers on pools


def owned_by(obj: dict[str, Any], pool: dict[str, Any]) -> bool:
    refs = obj["metadata"].get("ownerReferences") or []
    return any(
        r["uid"] == pool["metadata"]["uid"] and r.get("controller") and r["kind"] == "SnakepitPool"
        for r in refs
    )


CHILDREN = [
    ("v1", "ServiceAccount", "{}-router"),
    ("rbac.authorization.k8s.io/v1", "Role", "{}-router"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding", "{}-router"),
    ("v1", "Service", "{}-redis"),
    ("apps/v1", "StatefulSet", "{}-redis"),
    ("v1", "Service", "{}-workers"),
    ("v1", "Service", "{}-router"),
    ("v1", "Service", "{}-metrics"),
    ("apps/v1", "Deployment", "{}-workers"),
    ("apps/v1", "Deployment", "{}-router"),
    ("policy/v1", "PodDisruptionBudget", "{}-workers"),
    ("policy/v1", "PodDisruptionBudget", "{}-router"),
    ("networking.k8s.io/v1", "NetworkPolicy", "{}-workers"),
    ("networking.k8s.io/v1", "NetworkPolicy", "{}-redis"),
    ("v1", "Secret", "{}-redis-auth"),
]


def condition(pool: dict[str, Any], ctype: str) -> dict[str, Any]:
    for cond in (pool.get("status") or {}).get("conditions") or []:
        if cond["type"] == ctype:
            return dict(cond)
    return {}


def worker_container(env: OperatorEnv, pool: str) -> dict[str, Any]:
    deployment = env.get("apps/v1", "Deployment", f"{pool}-workers")
    assert deployment is not None
    return dict(deployment["spec"]["template"]["spec"]["containers"][0])


def scheduled(env: OperatorEnv, selector: str) -> bool:
    """Whether a node runs these pods (node tier): then a kubelet, not the test, reports them."""
    pods = env.admin.json("get", "pods", "-n", env.namespace, "-l", selector)["items"]
    return any(p["spec"].get("nodeName") for p in pods)


def mark_pods_ready(env: OperatorEnv, selector: str) -> int:
    """What a kubelet would report for running, ready containers (no kubelet in this tier)."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    pods = env.admin.json("get", "pods", "-n", env.namespace, "-l", selector)["items"]
    status = {
        "status": {
            "phase": "Running",
            "conditions": [
                {"type": t, "status": "True", "lastTransitionTime": now}
                for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
            ],
        }
    }
    for pod in pods:
        env.admin.run(
            "patch",
            "pod",
            pod["metadata"]["name"],
            "-n",
            env.namespace,
            "--subresource=status",
            "--type=merge",
            "-p",
            json.dumps(status),
        )
    return len(pods)


def events_of(env: OperatorEnv, pool: str) -> list[tuple[str, str]]:
    items = env.admin.json(
        "get",
        "events",
        "-n",
        env.namespace,
        "--field-selector",
        f"involvedObject.kind=SnakepitPool,involvedObject.name={pool}",
    )["items"]
    return [(e["type"], e["reason"]) for e in items]


# ---------------------------------------------------------------- the CRD


def test_crd_is_established_with_scale_status_and_columns(op: OperatorEnv) -> None:
    crd = op.admin.json("get", "crd", "snakepitpools.snakepit.dev")
    established = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert established["Established"] == "True"
    assert crd["spec"]["names"]["shortNames"] == ["spp"]
    (version,) = crd["spec"]["versions"]
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    assert "status" in version["subresources"]
    columns = [c["name"] for c in version["additionalPrinterColumns"] if not c.get("priority")]
    assert columns == ["Workers", "Ready", "Endpoint", "Age"]
    resources = op.admin.run("api-resources", "--api-group=snakepit.dev").stdout
    assert "spp" in resources and "SnakepitPool" in resources


INVALID = [
    ({"adapter": "no_class_here"}, "spec.adapter", "MODULE:CLASS"),
    ({"replicas": -1}, "spec.replicas", "greater than or equal to 0"),
    ({"workerConcurrency": 0}, "spec.workerConcurrency", "greater than or equal to 1"),
    ({"router": {"port": 70000}}, "spec.router.port", "less than or equal to 65535"),
    ({"router": {"serviceType": "ExternalName"}}, "spec.router.serviceType", "Unsupported value"),
    ({"router": {"nodePort": 30001}}, "spec.router.nodePort", "serviceType NodePort"),
    (
        {"router": {"serviceType": "LoadBalancer"}},
        "spec.router.loadBalancerSourceRanges",
        "list the networks that may connect",
    ),
    (
        {
            "router": {"serviceType": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
            "tls": {"enabled": False},
        },
        "spec.tls.enabled",
        "a LoadBalancer router needs TLS",
    ),
    (
        {
            "router": {"serviceType": "LoadBalancer", "loadBalancerSourceRanges": ["10.0.0.0/8"]},
            "auth": {"enabled": False},
        },
        "spec.auth.enabled",
        "a LoadBalancer router needs authentication",
    ),
    (
        {"router": {"serviceType": "LoadBalancer", "loadBalancerSourceRanges": ["0.0.0.0/0"]}},
        "spec.router.loadBalancerSourceRanges[0]",
        "admits every address",
    ),
    ({"router": {"dataPath": "envoy"}}, "spec.router.dataPath", "Unsupported value"),
    ({"auth": {"serviceAccounts": []}}, "spec.auth", "nobody could call"),
    ({"session": {"ttlSeconds": 10**9}}, "spec.session.ttlSeconds", "less than or equal to"),
    ({"maxCallSeconds": -1}, "spec.maxCallSeconds", "greater than or equal to 0"),
    ({"sessionStore": {"managed": False}}, "spec.sessionStore.url", "required when managed"),
    (
        {"sessionStore": {"managed": False, "url": "redis://r:6379/0", "storage": {"size": "1Gi"}}},
        "spec.sessionStore.storage",
        "only to a managed store",
    ),
    ({"sessionStore": {"url": "redis://r:6379/0"}}, "spec.sessionStore.url", "must not be set"),
    (
        {"sessionStore": {"managed": False, "url": "http://r"}},
        "spec.sessionStore.url",
        "redis://",
    ),
    (
        {"sessionStore": {"passwordSecretRef": {"name": "x"}}},
        "spec.sessionStore.passwordSecretRef",
        "external store",
    ),
    ({"resources": {"limits": {"memory": "lots"}}}, "spec.resources.limits.memory", "should match"),
    (
        {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]},
        "spec.env[1]",
        "Duplicate",
    ),
    (
        {"podTemplate": {"metadata": {"labels": {"snakepit.dev/pool": "other"}}}},
        "spec.podTemplate.metadata.labels",
        "cannot be overridden",
    ),
]


@pytest.mark.parametrize(("spec", "field_path", "message"), INVALID, ids=[c[1] for c in INVALID])
def test_invalid_pools_are_refused_naming_the_field(
    op: OperatorEnv, spec: dict[str, Any], field_path: str, message: str
) -> None:
    body = {"apiVersion": POOLS[0], "kind": POOLS[1], "metadata": {"name": "bad"}, "spec": spec}
    proc = op.admin.run(
        "apply",
        "-n",
        op.namespace,
        "--dry-run=server",
        "-f",
        "-",
        stdin=json.dumps(body),
        check=False,
    )
    assert proc.returncode != 0
    assert field_path in proc.stderr, proc.stderr
    assert message in proc.stderr, proc.stderr


def test_pool_name_must_leave_room_for_child_names(op: OperatorEnv) -> None:
    body = {"apiVersion": POOLS[0], "kind": POOLS[1], "metadata": {"name": "p" * 41}}
    proc = op.admin.run(
        "apply",
        "-n",
        op.namespace,
        "--dry-run=server",
        "-f",
        "-",
        stdin=json.dumps(body),
        check=False,
    )
    assert proc.returncode != 0
    assert "metadata.name must be a DNS label of at most 40 characters" in proc.stderr


def test_storage_of_a_managed_store_cannot_change(op: OperatorEnv) -> None:
    op.create_pool("fixed", {"sessionStore": {"storage": {"size": "1Gi"}}, "replicas": 0})
    with pytest.raises(ApiError) as refused:
        op.patch_pool("fixed", {"spec": {"sessionStore": {"storage": {"size": "2Gi"}}}})
    assert "spec.sessionStore.storage" in refused.value.message
    assert "cannot change" in refused.value.message
    op.admin.run("delete", "spp", "fixed", "-n", op.namespace, "--wait=false")


def test_examples_are_accepted_by_the_api_server(op: OperatorEnv) -> None:
    for example in ("pool.yaml", "pool-external-redis.yaml", "adapter/pool.yaml"):
        op.admin.run(
            "apply", "-n", op.namespace, "--dry-run=server", "-f", str(ROOT / "examples" / example)
        )


# ---------------------------------------------------------------- reconciliation


def test_created_pool_gets_every_child_owned_by_it(op: OperatorEnv) -> None:
    created = op.create_pool("alpha", {"replicas": 2, "router": {"replicas": 1}})
    started = time.monotonic()
    for api_version, kind, pattern in CHILDREN:
        name = pattern.format("alpha")
        obj = wait_for(f"{kind} {name}", lambda a=api_version, k=kind, n=name: op.get(a, k, n))
        assert owned_by(obj, created), f"{kind} {name} is not owned by the pool"
        assert obj["metadata"]["labels"]["snakepit.dev/pool"] == "alpha"
    op.record("create pool -> all 15 children exist", time.monotonic() - started)
    deployment = op.get("apps/v1", "Deployment", "alpha-workers")
    assert deployment is not None
    managers = {(m["manager"], m["operation"]) for m in deployment["metadata"]["managedFields"]}
    assert ("snakepit-operator", "Apply") in managers
    pool = op.pool("alpha")
    assert not pool["metadata"].get("finalizers"), "the operator must not block deletion"
    assert not [a for a in pool["metadata"].get("annotations") or {} if "kopf" in a]


def test_status_follows_the_children_and_the_generation(op: OperatorEnv) -> None:
    pool = wait_for(
        "status of alpha",
        lambda: (p := op.pool("alpha")).get("status", {}).get("observedGeneration") == 1 and p,
    )
    status = pool["status"]
    assert status["endpoint"] == f"alpha-router.{op.namespace}.svc:50051"
    assert status["selector"] == "app.kubernetes.io/component=worker,snakepit.dev/pool=alpha"
    assert condition(pool, "Ready")["status"] == "False"
    assert condition(pool, "Degraded")["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])

    # No kubelet here: report the pods Ready as one would; the controllers do the rest.
    selector = "snakepit.dev/pool=alpha"
    wait_for(
        "pods",
        lambda: len(op.admin.json("get", "pods", "-n", op.namespace, "-l", selector)["items"]) >= 4,
    )
    if scheduled(op, selector):
        pytest.skip("a node runs these pods: real readiness is the e2e suite's subject")
    mark_pods_ready(op, selector)
    pool = wait_for(
        "Ready=True with every worker ready",
        lambda: (
            condition(p := op.pool("alpha"), "Ready").get("status") == "True"
            and p["status"]["readyReplicas"] == 2
            and condition(p, "Progressing").get("status") == "False"
            and p
        ),
    )
    assert pool["status"]["replicas"] == 2
    assert condition(pool, "Progressing")["reason"] == "RolloutComplete"
    assert condition(pool, "Degraded")["status"] == "False"
    wait_for(
        "events",
        lambda: {("Normal", "Available"), ("Normal", "Reconciled")} <= set(events_of(op, "alpha")),
    )
    printed = op.admin.run("get", "spp", "alpha", "-n", op.namespace).stdout.split("\n")
    assert printed[0].split()[:4] == ["NAME", "WORKERS", "READY", "ENDPOINT"]
    assert printed[1].split()[:4] == ["alpha", "2", "2", f"alpha-router.{op.namespace}.svc:50051"]


def _measure(op: OperatorEnv, what: str, patch: dict[str, Any], done: Callable[[], bool]) -> None:
    accepted = op.patch_pool("alpha", patch)
    wait_for(what, done, timeout=20, interval=0.005)
    op.record("spec change -> child updated", time.monotonic() - accepted)


def test_spec_changes_reach_the_children(op: OperatorEnv) -> None:
    generation = op.pool("alpha")["metadata"]["generation"]
    _measure(
        op,
        "replicas 4",
        {"spec": {"replicas": 4}},
        lambda: op.get("apps/v1", "Deployment", "alpha-workers")["spec"]["replicas"] == 4,
    )  # type: ignore[index]
    _measure(
        op,
        "new image",
        {"spec": {"image": "example/textstats:2"}},
        lambda: worker_container(op, "alpha")["image"] == "example/textstats:2",
    )
    _measure(
        op,
        "env",
        {"spec": {"env": [{"name": "MODEL", "value": "large"}]}},
        lambda: {"name": "MODEL", "value": "large"} in worker_container(op, "alpha")["env"],
    )
    _measure(
        op,
        "NodePort",
        {"spec": {"router": {"serviceType": "NodePort"}}},
        lambda: op.get("v1", "Service", "alpha-router")["spec"]["type"] == "NodePort",
    )  # type: ignore[index]
    _measure(
        op,
        "adapter",
        {"spec": {"adapter": "textstats.adapter:TextStatsAdapter"}},
        lambda: "textstats.adapter:TextStatsAdapter" in worker_container(op, "alpha")["args"],
    )
    _measure(
        op,
        "back to ClusterIP",
        {"spec": {"router": {"serviceType": "ClusterIP"}}},
        lambda: op.get("v1", "Service", "alpha-router")["spec"]["type"] == "ClusterIP",
    )  # type: ignore[index]
    _measure(
        op,
        "env removed",
        {"spec": {"env": None}},
        lambda: "MODEL" not in {e["name"] for e in worker_container(op, "alpha")["env"]},
    )
    pool = wait_for(
        "observedGeneration",
        lambda: (p := op.pool("alpha"))["status"]["observedGeneration"] == generation + 7 and p,
    )
    assert all(c["observedGeneration"] == generation + 7 for c in pool["status"]["conditions"])
    # New ReplicaSets with unready pods: a rollout is under way.
    assert wait_for(
        "Progressing=True",
        lambda: condition(op.pool("alpha"), "Progressing").get("status") == "True",
    )


def test_kubectl_scale_changes_the_worker_deployment(op: OperatorEnv) -> None:
    op.admin.run("scale", "spp/alpha", "--replicas=3", "-n", op.namespace)
    wait_for(
        "worker Deployment at 3",
        lambda: op.get("apps/v1", "Deployment", "alpha-workers")["spec"]["replicas"] == 3,  # type: ignore[index]
    )
    scale = op.api.call("GET", path(*POOLS, op.namespace, "alpha", "scale"))
    assert scale["spec"]["replicas"] == 3
    assert (
        scale["status"]["selector"] == "app.kubernetes.io/component=worker,snakepit.dev/pool=alpha"
    )


def test_drift_in_a_child_is_reverted(op: OperatorEnv) -> None:
    op.admin.run("scale", "deployment/alpha-workers", "--replicas=9", "-n", op.namespace)
    wait_for(
        "drift reverted",
        lambda: op.get("apps/v1", "Deployment", "alpha-workers")["spec"]["replicas"] == 3,  # type: ignore[index]
    )


@pytest.mark.parametrize(
    ("api_version", "kind", "name"),
    [
        ("apps/v1", "Deployment", "alpha-workers"),
        ("apps/v1", "Deployment", "alpha-router"),
        ("v1", "Service", "alpha-router"),
        ("apps/v1", "StatefulSet", "alpha-redis"),
        ("rbac.authorization.k8s.io/v1", "RoleBinding", "alpha-router"),
        ("networking.k8s.io/v1", "NetworkPolicy", "alpha-workers"),
        ("policy/v1", "PodDisruptionBudget", "alpha-workers"),
    ],
)
def test_a_deleted_child_comes_back(
    op: OperatorEnv, api_version: str, kind: str, name: str
) -> None:
    before = op.get(api_version, kind, name)
    assert before is not None
    op.api.call("DELETE", path(api_version, kind, op.namespace, name))
    deleted = time.monotonic()
    again = wait_for(
        f"{kind} {name} recreated",
        lambda: (
            (o := op.get(api_version, kind, name))
            and o["metadata"]["uid"] != before["metadata"]["uid"]
            and not o["metadata"].get("deletionTimestamp")
            and o
        ),
        interval=0.005,
    )
    op.record("child deleted -> recreated", time.monotonic() - deleted)
    assert owned_by(again, op.pool("alpha"))


def test_a_horizontal_pod_autoscaler_scales_the_pool(op: OperatorEnv) -> None:
    """The HPA controller drives the pool through its scale subresource (no metrics needed to
    lift a pool below minReplicas)."""
    op.patch_pool("alpha", {"spec": {"replicas": 1}})
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "alpha", "namespace": op.namespace},
        "spec": {
            "scaleTargetRef": {"apiVersion": POOLS[0], "kind": POOLS[1], "name": "alpha"},
            "minReplicas": 2,
            "maxReplicas": 4,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 80},
                    },
                }
            ],
        },
    }
    op.admin.run("apply", "-f", "-", stdin=json.dumps(hpa))
    try:
        wait_for(
            "the HPA to lift alpha to minReplicas",
            lambda: (
                op.pool("alpha")["spec"]["replicas"] == 2
                and op.get("apps/v1", "Deployment", "alpha-workers")["spec"]["replicas"] == 2
            ),  # type: ignore[index]
            timeout=90,
            interval=0.5,
        )
        status = op.admin.json("get", "hpa", "alpha", "-n", op.namespace)["status"]
        able = {c["type"]: c for c in status.get("conditions", [])}["AbleToScale"]
        assert able["status"] == "True", able
    finally:
        op.admin.run("delete", "hpa", "alpha", "-n", op.namespace)


def test_password_secret_is_created_once_and_only_replaced_when_deleted(op: OperatorEnv) -> None:
    op.create_pool("beta", {"replicas": 1, "router": {"replicas": 1}})
    secret = wait_for("beta secret", lambda: op.get("v1", "Secret", "beta-redis-auth"))
    password = base64.b64decode(secret["data"]["password"])
    assert len(password) >= 40
    for replicas in (2, 3, 1):
        op.patch_pool("beta", {"spec": {"replicas": replicas}})
    wait_for(
        "beta at generation 4",
        lambda: op.pool("beta").get("status", {}).get("observedGeneration") == 4,
    )
    same = op.get("v1", "Secret", "beta-redis-auth")
    assert same is not None
    assert same["metadata"]["uid"] == secret["metadata"]["uid"]
    assert same["data"] == secret["data"]
    annotation = "snakepit.dev/store-secret-uid"
    template = op.get("apps/v1", "Deployment", "beta-workers")["spec"]["template"]  # type: ignore[index]
    assert template["metadata"]["annotations"][annotation] == secret["metadata"]["uid"]

    # Deleting it is the way to rotate: a new one appears (no watch on Secrets: the resync
    # finds it) and every pod template moves to it, so pods restart with the new password.
    op.api.call("DELETE", path("v1", "Secret", op.namespace, "beta-redis-auth"))
    fresh = wait_for(
        "new secret",
        lambda: (
            (s := op.get("v1", "Secret", "beta-redis-auth"))
            and s["metadata"]["uid"] != secret["metadata"]["uid"]
            and s
        ),
        timeout=30,
    )
    assert base64.b64decode(fresh["data"]["password"]) != password
    for kind, name in (
        ("Deployment", "beta-workers"),
        ("Deployment", "beta-router"),
        ("StatefulSet", "beta-redis"),
    ):
        wait_for(
            f"{name} rolled to the new secret",
            lambda k=kind, n=name: (
                op.get("apps/v1", k, n)["spec"]["template"]["metadata"][  # type: ignore[index]
                    "annotations"
                ][annotation]
                == fresh["metadata"]["uid"]
            ),
        )


def test_spec_auth_wires_routers_and_workers_with_one_ticket_key(op: OperatorEnv) -> None:
    """spec.auth (issue 12): the API server takes its schema, the operator creates the ticket
    key once, routers get its private half and the tokens Secret, workers only the public one."""
    spec = {
        "replicas": 1,
        "router": {"replicas": 1},
        "auth": {
            "serviceAccounts": [{"namespace": op.namespace, "name": "caller"}],
            "tokensSecret": "auth-tokens",
            "admins": ["ops"],
            "directMode": ["*"],
        },
    }
    op.create_pool("gamma", spec)
    secret = wait_for("gamma ticket key", lambda: op.get("v1", "Secret", "gamma-ticket-key"))
    assert set(secret["data"]) == {"key.pem", "public"}
    assert base64.b64decode(secret["data"]["public"]).startswith(b"ed25519:")
    router = wait_for("gamma router", lambda: op.get("apps/v1", "Deployment", "gamma-router"))
    pod = router["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    assert f"{op.namespace}/caller" in args and "--auth-tokens" in args
    assert {v["name"] for v in pod["volumes"]} >= {"ticket-key", "auth-tokens"}
    # The operator applies a pool's children concurrently: the router's Deployment existing
    # says nothing about the workers' one yet.
    workers = wait_for("gamma workers", lambda: op.get("apps/v1", "Deployment", "gamma-workers"))
    worker_pod = workers["spec"]["template"]["spec"]
    env = {e["name"]: e for e in worker_pod["containers"][0]["env"]}
    assert env["SNAKEPIT_TICKET_PUBLIC_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "public"
    assert "ticket-key" not in {v["name"] for v in worker_pod["volumes"]}
    op.patch_pool("gamma", {"spec": {"replicas": 2}})
    wait_for(
        "gamma at generation 2",
        lambda: op.pool("gamma").get("status", {}).get("observedGeneration") == 2,
    )
    again = op.get("v1", "Secret", "gamma-ticket-key")
    assert again is not None and again["metadata"]["uid"] == secret["metadata"]["uid"]


def test_switching_to_an_external_store_prunes_the_managed_redis(op: OperatorEnv) -> None:
    op.patch_pool(
        "beta",
        {"spec": {"sessionStore": {"managed": False, "url": "redis://cache.example:6379/3"}}},
    )
    for kind, api_version, name in (
        ("StatefulSet", "apps/v1", "beta-redis"),
        ("Service", "v1", "beta-redis"),
        ("NetworkPolicy", "networking.k8s.io/v1", "beta-redis"),
    ):
        wait_for(
            f"{kind} {name} pruned", lambda a=api_version, k=kind, n=name: op.get(a, k, n) is None
        )
    args = worker_container(op, "beta")["args"]
    assert args[args.index("--store") + 1] == "redis://cache.example:6379/3"
    assert op.get("apps/v1", "Deployment", "beta-workers") is not None


def test_changes_made_while_the_operator_was_down_are_applied_on_restart(op: OperatorEnv) -> None:
    op.stop()
    op.patch_pool("beta", {"spec": {"replicas": 5}})
    op.admin.run("delete", "service", "beta-workers", "-n", op.namespace)
    op.start()
    wait_for(
        "beta-workers at 5 after restart",
        lambda: op.get("apps/v1", "Deployment", "beta-workers")["spec"]["replicas"] == 5,  # type: ignore[index]
    )
    wait_for("beta-workers Service back", lambda: op.get("v1", "Service", "beta-workers"))


def test_deleting_a_pool_garbage_collects_everything(op: OperatorEnv) -> None:
    selector = "snakepit.dev/pool=alpha"
    kinds = "deployments,statefulsets,replicasets,pods,services,serviceaccounts,roles,rolebindings,poddisruptionbudgets,networkpolicies,secrets,persistentvolumeclaims"  # noqa: E501
    assert op.admin.run("get", kinds, "-n", op.namespace, "-l", selector, "-o", "name").stdout
    op.admin.run("delete", "spp", "alpha", "-n", op.namespace, "--wait=false")
    wait_for(
        "alpha's children to be collected",
        lambda: (
            not op.admin.run(
                "get", kinds, "-n", op.namespace, "-l", selector, "-o", "name"
            ).stdout.strip()
        ),
        timeout=120,
        interval=0.5,
    )


def test_the_charts_rbac_was_enough(op: OperatorEnv) -> None:
    log = op.log_path.read_text()
    assert "forbidden" not in log.lower(), log[-4000:]
    errors = [
        line
        for line in log.splitlines()
        if '"level": "error"' in line and not _is_apiserver_warming_up(line)
    ]
    assert not errors, "\n".join(errors[-10:])


def _is_apiserver_warming_up(line: str) -> bool:
    """kopf logs, at level error, the watch it retries while a new CRD's watch cache fills.

    The apiserver answers 429 "storage is (re)initializing" for a second after the CRD is created;
    kopf retries after the server's Retry-After. That is not an RBAC gap, nor an operator error.
    """
    return "will retry" in line and "storage is (re)initializing" in line


def test_operator_metrics_count_passes_and_pools(op: OperatorEnv) -> None:
    """The operator's /metrics (its --metrics-port) as a person running it would read it."""
    from prometheus_client.parser import text_string_to_metric_families

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://127.0.0.1:{op.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    op.create_pool("gauged", {"replicas": 1, "router": {"replicas": 1}})
    key = (
        "snakepit_operator_last_success_timestamp_seconds",
        (("namespace", op.namespace), ("pool", "gauged")),
    )
    samples = wait_for(
        "a clean pass of pool gauged in the metrics",
        lambda: (m := scrape()).get(key) and m,
        interval=0.2,
    )
    assert samples[key] > time.time() - 120
    assert samples[("snakepit_operator_reconcile_passes_total", (("result", "success"),))] >= 1
    assert (
        samples[("snakepit_operator_reconcile_duration_seconds_count", (("result", "success"),))]
        >= 1
    )
    assert samples[("snakepit_operator_applied_objects_total", ())] >= len(CHILDREN) - 1
    assert samples[("snakepit_operator_pools", (("condition", "Ready"), ("status", "False")))] >= 1
    assert ("snakepit_operator_queue_depth", ()) in samples
