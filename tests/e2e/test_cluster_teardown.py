"""`scripts/local-cluster down` leaves this machine as `up` found it, and `up` works again.

Only meaningful for the local provider (it inspects this machine). The checks here do not reuse
the clean-up code's own helpers: they look at the machine directly (iptables-save, /proc, sysfs).
The cluster is brought back up at the end; the plugin orders this test after all others anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from localkube import hostnet
from localkube.providers import KubeCluster, LocalProvider, Provider, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.node,
    pytest.mark.cluster_teardown,  # the plugin runs it after every other test
    pytest.mark.timeout(900),
]

OUR_CHAINS = ("KUBE-", "CNI-", "SNAKEPIT-")


def workload(cluster: KubeCluster) -> str:
    """Pods with a projected token, an emptyDir, a PVC, a Service and a NetworkPolicy (so the
    policy engine writes chains and ipsets): all of it must go."""
    image, policy = cluster.image("worker"), cluster.pull_policy
    return f"""
apiVersion: v1
kind: Service
metadata: {{name: sleeper}}
spec:
  selector: {{app: sleeper}}
  ports: [{{port: 80}}]
---
apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: sleeper}}
spec:
  serviceName: sleeper
  replicas: 2
  selector: {{matchLabels: {{app: sleeper}}}}
  template:
    metadata: {{labels: {{app: sleeper}}}}
    spec:
      terminationGracePeriodSeconds: 30
      containers:
        - name: sleeper
          image: {image}
          imagePullPolicy: {policy}
          command: [sleep, "3600"]
          volumeMounts: [{{name: data, mountPath: /data}}, {{name: scratch, mountPath: /scratch}}]
      volumes: [{{name: scratch, emptyDir: {{}}}}]
  volumeClaimTemplates:
    - metadata: {{name: data}}
      spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 8Mi}}}}}}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: sleepers-only}}
spec:
  podSelector: {{matchLabels: {{app: sleeper}}}}
  policyTypes: [Ingress]
  ingress: [{{from: [{{podSelector: {{matchLabels: {{app: sleeper}}}}}}]}}]
"""


def live_processes(argv_marks: tuple[str, ...], cgroup_mark: str) -> list[str]:
    """Live processes whose argv names one of ``argv_marks`` or whose cgroup path contains
    ``cgroup_mark`` (read from /proc, not from the clean-up code's own bookkeeping)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cgroups = (proc / "cgroup").read_text()
        except OSError:
            continue  # already gone
        if not argv:
            continue  # kernel thread or zombie
        if any(m in argv for m in argv_marks) or cgroup_mark in cgroups:
            found.append(f"{proc.name}: {argv[:120]}")
    return found


def cluster_processes(state_dir: Path) -> list[str]:
    """Live processes of this cluster: every component names the state dir in its argv, and
    container processes sit in a kubepods cgroup. (Other clusters built from the same binary
    cache, with other state dirs, may legitimately run at the same time.)"""
    return live_processes((str(state_dir),), "/kubepods")


def run_workload(cluster: KubeCluster, ns: str) -> None:
    """The workload below in ``ns`` (made if missing), rolled out."""
    cluster.kubectl_run("create", "namespace", ns, check=False)
    cluster.apply(workload(cluster), ns)
    cluster.kubectl_run(
        "-n", ns, "rollout", "status", "statefulset/sleeper", "--timeout=180s", timeout=200
    )


def assert_clean_report(path: Path) -> None:
    """``down``'s own report of what remained lists nothing."""
    report = json.loads(path.read_text())
    assert {k: v for k, v in report.items() if v and k != "seconds"} == {}


def assert_up_again_runs_pods(provider: Provider, before: KubeCluster, ns: str) -> None:
    """A second ``up`` after ``down`` gives the same kubeconfig path, and pods run again."""
    again = provider.ensure("node")
    assert again.kubeconfig == before.kubeconfig
    run_workload(again, ns)
    again.kubectl_run("delete", "namespace", ns, "--wait=false")


def iptables_lines() -> dict[str, list[str]]:
    dumps = {}
    for save in (
        "iptables-save",
        "ip6tables-save",
        "iptables-legacy-save",
        "ip6tables-legacy-save",
    ):
        proc = subprocess.run([save], capture_output=True, text=True, check=False)
        if proc.returncode == 0:
            dumps[save] = proc.stdout.splitlines()
    return dumps


def ipsets() -> list[str]:
    proc = subprocess.run(["ipset", "list", "-n"], capture_output=True, text=True, check=False)
    return sorted(proc.stdout.split())


def test_down_leaves_the_machine_clean_and_up_works_again(
    kube_node: KubeCluster, kube_provider: Provider
) -> None:
    if not isinstance(kube_provider, LocalProvider):
        pytest.skip("inspects this machine: only for SNAKEPIT_E2E_CLUSTER=local")
    cfg = kube_provider.cfg
    ns = "teardown-check"
    run_workload(kube_node, ns)
    found = hostnet.load_snapshot(cfg)
    assert found.taken_at, "up did not record the machine's state"
    # The policy engine enforces the workload's NetworkPolicy with its own chains and ipsets.
    wait_until(
        "kube-router's ipsets",
        lambda: [n for n in ipsets() if n.startswith("KUBE-") and n not in found.ipsets],
        timeout=60,
    )
    assert any("KUBE-ROUTER-FORWARD" in line for line in iptables_lines()["iptables-save"])

    kube_provider.down()

    # processes: no component, no containerd shim, no container
    assert cluster_processes(cfg.state_dir) == []
    # iptables: no chain or rule of kubelet, kube-proxy, CNI or our fence
    for save, lines in iptables_lines().items():
        ours = [line for line in lines if any(c in line for c in OUR_CHAINS)]
        assert ours == [], f"{save} still has: {ours[:5]}"
    # mounts: nothing under the state dir, no network namespaces, no kubelet/containerd mounts
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    leftover_mounts = [
        m
        for m in mounts
        if m.startswith((str(cfg.state_dir), "/run/netns/", "/run/containerd", "/var/lib/kubelet"))
    ]
    assert leftover_mounts == []
    # network devices: no bridge, no veth
    links = [p.name for p in Path("/sys/class/net").iterdir()]
    assert cfg.net.bridge not in links
    assert [n for n in links if n.startswith("veth")] == []
    assert sorted(links) == sorted(found.links)
    # ipsets: the policy engine's are gone, any that existed before are still there
    assert ipsets() == sorted(found.ipsets)
    # cgroups: no kubepods in any hierarchy
    assert list(Path("/sys/fs/cgroup").glob("*/kubepods")) == []
    # kernel settings: back to what up found
    now = {name: value for name, value in hostnet.read_sysctls().items() if name in found.sysctls}
    assert now == found.sysctls
    # files: the state dir and every fixed path the runtime creates, unless it existed before
    assert not cfg.state_dir.exists()
    for path in hostnet.FOREIGN_PATHS:
        if path not in found.paths:
            assert not os.path.lexists(path), f"{path} was left behind"
    assert_clean_report(cfg.cache_dir / "last-down-report.json")

    # ... and a second `up` after `down` works: pods run again.
    assert_up_again_runs_pods(kube_provider, kube_node, ns)
