"""Smoke test of the node tier with the real worker image: probes, self-healing, Services,
cluster DNS from pods and from the host, and a volume that outlives its pod.

Runs unchanged on every provider (SNAKEPIT_E2E_CLUSTER=local|kind|existing).
"""

from __future__ import annotations

import json
import uuid

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from localkube.providers import KubeCluster, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.node, pytest.mark.timeout(900)]

ADAPTER = "snakepit.examples.showcase:ShowcaseAdapter"
PORT = 50052


def worker_deployment(cluster: KubeCluster, replicas: int = 2) -> str:
    return f"""
apiVersion: apps/v1
kind: Deployment
metadata: {{name: worker, labels: {{app: worker}}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: worker}}}}
  template:
    metadata: {{labels: {{app: worker}}}}
    spec:
      terminationGracePeriodSeconds: 5
      containers:
        - name: worker
          image: {cluster.image("worker")}
          imagePullPolicy: {cluster.pull_policy}
          args: [worker, --adapter, "{ADAPTER}", --port, "{PORT}"]
          env:
            - name: POD_NAME
              valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}
          ports: [{{name: grpc, containerPort: {PORT}}}]
          readinessProbe: {{grpc: {{port: {PORT}}}, periodSeconds: 2, failureThreshold: 2}}
          livenessProbe: {{grpc: {{port: {PORT}}}, periodSeconds: 5, failureThreshold: 3}}
          securityContext: {{runAsNonRoot: true, allowPrivilegeEscalation: false}}
---
apiVersion: v1
kind: Service
metadata: {{name: worker}}
spec:
  type: ClusterIP
  selector: {{app: worker}}
  ports: [{{name: grpc, port: {PORT}, targetPort: grpc}}]
"""


def ready_pods(cluster: KubeCluster, ns: str, selector: str) -> list[str]:
    out = cluster.kubectl_run("-n", ns, "get", "pods", "-l", selector, "-o", "json").stdout
    names = []
    for pod in json.loads(out)["items"]:
        if pod["metadata"].get("deletionTimestamp"):
            continue
        conds = {c["type"]: c["status"] for c in pod.get("status", {}).get("conditions", [])}
        if conds.get("Ready") == "True":
            names.append(pod["metadata"]["name"])
    return sorted(names)


def health(address: str) -> int:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    return int(reply.status)


@pytest.fixture
def workers(kube_node: KubeCluster, kube_namespace: str) -> str:
    kube_node.apply(worker_deployment(kube_node), kube_namespace)
    kube_node.kubectl_run(
        "-n",
        kube_namespace,
        "rollout",
        "status",
        "deployment/worker",
        "--timeout=180s",
        timeout=200,
    )
    wait_until(
        "the Service's EndpointSlice to list both workers as ready",
        lambda: ready_endpoints(kube_node, kube_namespace, "worker") == 2,
        timeout=60,
    )
    return kube_namespace


def ready_endpoints(cluster: KubeCluster, ns: str, service: str) -> int:
    slices = json.loads(
        cluster.kubectl_run(
            "-n",
            ns,
            "get",
            "endpointslices",
            "-l",
            f"kubernetes.io/service-name={service}",
            "-o",
            "json",
        ).stdout
    )["items"]
    return sum(
        1 for s in slices for e in s.get("endpoints") or [] if e.get("conditions", {}).get("ready")
    )


def test_worker_deployment_becomes_ready_with_grpc_probes(
    kube_node: KubeCluster, workers: str
) -> None:
    spec = json.loads(
        kube_node.kubectl_run("-n", workers, "get", "deployment", "worker", "-o", "json").stdout
    )
    container = spec["spec"]["template"]["spec"]["containers"][0]
    assert container["readinessProbe"]["grpc"]["port"] == PORT
    assert container["livenessProbe"]["grpc"]["port"] == PORT
    assert spec["status"].get("readyReplicas") == 2
    assert len(ready_pods(kube_node, workers, "app=worker")) == 2


def test_deleted_pod_is_replaced(kube_node: KubeCluster, workers: str) -> None:
    before = ready_pods(kube_node, workers, "app=worker")
    victim = before[0]
    kube_node.kubectl_run("-n", workers, "delete", "pod", victim, "--wait=false")
    after = wait_until(
        "a replacement pod to become Ready",
        lambda: (
            (pods := ready_pods(kube_node, workers, "app=worker"))
            and len(pods) == 2
            and victim not in pods
            and pods
        ),
        timeout=120,
    )
    assert victim not in after
    assert before[1] in after


def test_service_answers_from_the_host(kube_node: KubeCluster, workers: str) -> None:
    from snakepit import Client

    with kube_node.service_address(workers, "worker", PORT) as address:
        assert wait_until("the Service to answer", lambda: health(address) == 1, timeout=60)
        with Client(address) as client:
            assert client.execute("add", a=1, b=2) == 3


def test_service_answers_from_another_pod_by_dns_name(kube_node: KubeCluster, workers: str) -> None:
    target = f"worker.{workers}.svc.cluster.local:{PORT}"
    script = (
        "import grpc, socket;"
        "from grpc_health.v1 import health_pb2 as h, health_pb2_grpc as g;"
        f"print('resolved', socket.gethostbyname('worker.{workers}.svc.cluster.local'));"
        f"c = grpc.insecure_channel('{target}');"
        # wait_for_ready: kube-proxy may program a brand-new Service a moment after it exists
        "print('status', g.HealthStub(c).Check(h.HealthCheckRequest(), timeout=60,"
        " wait_for_ready=True).status)"
    )
    client_pod = f"""
apiVersion: v1
kind: Pod
metadata: {{name: dns-client}}
spec:
  restartPolicy: Never
  containers:
    - name: client
      image: {kube_node.image("worker")}
      imagePullPolicy: {kube_node.pull_policy}
      command: [python3, -c, "{script}"]
"""
    kube_node.apply(client_pod, workers)
    phase = wait_until(
        "the client pod to finish",
        lambda: (
            kube_node.kubectl_run(
                "-n", workers, "get", "pod", "dns-client", "-o", "jsonpath={.status.phase}"
            ).stdout
            in ("Succeeded", "Failed")
            and kube_node.kubectl_run(
                "-n", workers, "get", "pod", "dns-client", "-o", "jsonpath={.status.phase}"
            ).stdout
        ),
        timeout=120,
    )
    logs = kube_node.kubectl_run("-n", workers, "logs", "dns-client").stdout
    assert phase == "Succeeded", logs
    cluster_ip = kube_node.kubectl_run(
        "-n", workers, "get", "svc", "worker", "-o", "jsonpath={.spec.clusterIP}"
    ).stdout.strip()
    assert f"resolved {cluster_ip}" in logs
    assert "status 1" in logs  # SERVING


def test_volume_binds_and_data_survives_pod_deletion(
    kube_node: KubeCluster, kube_namespace: str
) -> None:
    """A StatefulSet with volumeClaimTemplates on the default StorageClass, run as non-root."""
    token = uuid.uuid4().hex
    ns = kube_namespace
    kube_node.apply(
        f"""
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: keeper}}
spec:
  serviceName: keeper
  replicas: 1
  selector: {{matchLabels: {{app: keeper}}}}
  template:
    metadata: {{labels: {{app: keeper}}}}
    spec:
      terminationGracePeriodSeconds: 1
      securityContext: {{runAsUser: 10001, runAsGroup: 10001, fsGroup: 10001}}
      containers:
        - name: keeper
          image: {kube_node.image("worker")}
          imagePullPolicy: {kube_node.pull_policy}
          command: [/bin/sh, -c]
          args: ["test -f /data/token || echo {token} > /data/token; exec sleep 3600"]
          volumeMounts: [{{name: data, mountPath: /data}}]
  volumeClaimTemplates:
    - metadata: {{name: data}}
      spec:
        accessModes: [ReadWriteOnce]
        resources: {{requests: {{storage: 16Mi}}}}
""",
        ns,
    )
    kube_node.kubectl_run(
        "-n", ns, "rollout", "status", "statefulset/keeper", "--timeout=180s", timeout=200
    )
    pvc = json.loads(
        kube_node.kubectl_run("-n", ns, "get", "pvc", "data-keeper-0", "-o", "json").stdout
    )
    assert pvc["status"]["phase"] == "Bound"
    assert pvc["spec"]["storageClassName"]  # the default class was applied

    def read_token() -> str:
        return kube_node.kubectl_run(
            "-n", ns, "exec", "keeper-0", "--", "cat", "/data/token"
        ).stdout.strip()

    assert read_token() == token
    old_uid = kube_node.kubectl_run(
        "-n", ns, "get", "pod", "keeper-0", "-o", "jsonpath={.metadata.uid}"
    ).stdout
    kube_node.kubectl_run("-n", ns, "delete", "pod", "keeper-0", "--wait=true", timeout=120)
    wait_until(
        "keeper-0 to come back Ready",
        lambda: (
            ready_pods(kube_node, ns, "app=keeper") == ["keeper-0"]
            and kube_node.kubectl_run(
                "-n", ns, "get", "pod", "keeper-0", "-o", "jsonpath={.metadata.uid}"
            ).stdout
            != old_uid
        ),
        timeout=120,
    )
    assert read_token() == token
