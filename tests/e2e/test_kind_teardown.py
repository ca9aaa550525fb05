"""`scripts/local-cluster down --provider kind` leaves this machine as `up` found it.

Only for SNAKEPIT_E2E_CLUSTER=kind with the engine this tool started (on a user's own Docker,
`down` only deletes the cluster and there is nothing of the machine's to check). Like the local
provider's teardown test, it looks at the machine directly (iptables-save, /proc, sysfs, ip route)
rather than through the clean-up code, then brings the cluster back and runs pods on it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from localkube.providers import KubeCluster, Provider
from tests.e2e.test_cluster_teardown import (
    assert_clean_report,
    assert_up_again_runs_pods,
    iptables_lines,
    live_processes,
    run_workload,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.node,
    pytest.mark.cluster_teardown,  # the plugin runs it after every other test
    pytest.mark.timeout(1200),
]


def engine_processes(roots: tuple[str, ...]) -> list[str]:
    """Processes of our engine: dockerd, its containerd, shims and docker-proxy all name its
    exec root or data root in their argv; node containers' processes sit in its cgroup parent."""
    return live_processes(roots, "/snakepit-docker")


def iptables_rules() -> dict[str, list[str]]:
    """Every table, chain and rule, without the dump's timestamp comments and packet counters."""
    return {
        save: [line.split(" [", 1)[0] for line in lines if not line.startswith("#")]
        for save, lines in iptables_lines().items()
    }


def host_routes() -> list[str]:
    out = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True, check=True)
    return sorted(line.strip() for line in out.stdout.splitlines() if line.strip())


def test_kind_down_leaves_the_machine_clean_and_up_works_again(
    kube_node: KubeCluster, kube_provider: Provider
) -> None:
    if kube_provider.name != "kind":
        pytest.skip("checks the kind provider's clean-up: only for SNAKEPIT_E2E_CLUSTER=kind")
    status = kube_provider.status()  # type: ignore[attr-defined]
    if not status.get("engine", {}).get("owned"):
        pytest.skip("the engine is the user's own: `down` leaves the machine's setup to it")
    kcfg = kube_provider.kcfg  # type: ignore[attr-defined]
    ns = "kind-teardown-check"
    run_workload(kube_node, ns)
    found = json.loads(kcfg.snapshot_file.read_text())
    assert found["taken_at"], "up did not record the machine's state"
    iptables_before = iptables_rules()

    kube_provider.down()  # type: ignore[attr-defined]

    roots = (str(kcfg.docker_exec_root), str(kcfg.docker_data_root))
    assert engine_processes(roots) == []
    # iptables: exactly as before (the engine runs with --iptables=false; nodes have their own)
    assert iptables_rules() == iptables_before
    assert not [line for lines in iptables_lines().values() for line in lines if "DOCKER" in line]
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert [m for m in mounts if m.startswith(roots)] == []
    links = sorted(p.name for p in Path("/sys/class/net").iterdir())
    assert links == sorted(found["links"])
    assert host_routes() == sorted(found["routes"])
    assert list(Path("/sys/fs/cgroup").glob(f"*/{kcfg.cgroup_parent}")) == []
    for name, value in found["sysctls"].items():
        assert Path("/proc/sys", name.replace(".", "/")).read_text().strip() == value, name
    for path in ("/etc/docker", "/run/docker", "/run/containerd", "/lib/modules", *roots[:1]):
        if path not in found["paths"]:
            assert not os.path.lexists(path), f"{path} was left behind"
    assert not kcfg.state_dir.exists()
    assert_clean_report(kcfg.cache_dir / "last-kind-down-report.json")
    assert_up_again_runs_pods(kube_provider, kube_node, ns)
