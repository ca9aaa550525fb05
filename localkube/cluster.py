"""Bring the local cluster up and down.

``up`` is idempotent: a running cluster of the requested tier (or the bigger ``node`` tier) is
reused, and a ``control-plane`` cluster is extended in place to ``node``. ``down`` undoes
everything, in the order the notes on this machine prescribe: workloads are deleted while the
kubelet still runs (so it unmounts volumes and CNI releases addresses), then components stop by
PID, then iptables chains, ipsets, mounts, cgroups, links, files and kernel settings are put back.
"""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

from . import build, components, hostnet, images, pki, procs
from .config import MANIFESTS_DIR, TIERS, Config
from .kubeapi import Kube
from .run import log, run, wait_for

CONTROL_PLANE = ("etcd", "kube-apiserver", "kube-controller-manager")
NODE = (
    "containerd",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kube-router",
    "coredns",
    "provisioner",
)
# Reverse start order, plus anything a crashed earlier run may have left.
STOP_ORDER = (*reversed(NODE), *reversed(CONTROL_PLANE))


def current_tier(cfg: Config) -> str | None:
    """The tier of the running cluster, or None when no control plane is alive."""
    if not cfg.tier_file.exists() or procs.read_pid(cfg, "kube-apiserver") is None:
        return None
    return cfg.tier_file.read_text().strip() or None


def kubectl(
    cfg: Config, *args: str, check: bool = True, capture: bool = True, timeout: float | None = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(cfg.kubectl_bin), f"--kubeconfig={cfg.admin_kubeconfig}", *args],
        capture_output=capture,
        text=True,
        check=check,
        timeout=timeout,
    )


def _http_ok(url: str, ctx: ssl.SSLContext | None = None) -> bool:
    with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
        return bool(resp.status == 200)


def _insecure() -> ssl.SSLContext:
    """For /healthz of components that serve a self-signed cert on 127.0.0.1."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


# ---------------------------------------------------------------- up
def up(cfg: Config, tier: str = "node") -> dict[str, float]:
    """Start (or reuse) a cluster of at least ``tier``; return timings in seconds."""
    if tier not in TIERS:
        raise ValueError(f"tier must be one of {TIERS}")
    from .kind.settings import KindConfig

    if KindConfig().info_file.exists():
        raise RuntimeError(
            "a kind cluster of this tool runs: `scripts/local-cluster down --provider kind` "
            "first (the two must not run at the same time)"
        )
    timings: dict[str, float] = {}
    begin = time.monotonic()
    running = current_tier(cfg)
    if running == "node" or running == tier:
        log(f"reusing the running {running} cluster")
        return {"total": 0.0}
    if running is None and (procs.running(cfg) or cfg.state_dir.exists()):
        # A crashed or half-started cluster (or one from before a reboot): its etcd data, certs
        # and host changes must not leak into the new one.
        log("found the remains of an earlier cluster; cleaning them up first")
        down(cfg)
    t = time.monotonic()
    build.ensure_all(cfg)
    timings["build"] = time.monotonic() - t
    if running is None:
        _start_control_plane(cfg, timings)
    if tier == "node":
        _start_node(cfg, timings)
    cfg.tier_file.write_text(tier + "\n")
    timings["total"] = time.monotonic() - begin
    (cfg.state_dir / "up-timings.json").write_text(json.dumps(timings, indent=1) + "\n")
    log("cluster is up: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return timings


def _start_control_plane(cfg: Config, timings: dict[str, float]) -> None:
    t = time.monotonic()
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    hostnet.snapshot(cfg)
    pki.generate(cfg)
    timings["pki"] = time.monotonic() - t
    env = components.component_env(cfg)

    t = time.monotonic()
    procs.start(cfg, "etcd", components.etcd(cfg), env)
    procs.wait_ready(
        cfg, "etcd", lambda: _http_ok(f"http://127.0.0.1:{cfg.net.etcd_client_port}/health"), 60
    )
    procs.start(cfg, "kube-apiserver", components.apiserver(cfg), env)
    admin = Kube.for_identity(cfg, "admin", timeout=3)
    procs.wait_ready(cfg, "kube-apiserver", lambda: admin.get("/readyz") == "ok", 120)
    timings["apiserver"] = time.monotonic() - t
    procs.start(cfg, "kube-controller-manager", components.controller_manager(cfg), env)
    procs.wait_ready(
        cfg,
        "kube-controller-manager",
        lambda: _http_ok("https://127.0.0.1:10257/healthz", _insecure()),
        60,
    )
    _apply_manifests(cfg)
    # Pods are refused until the ServiceAccount controller made `default`; tests would race it.
    wait_for(
        "the default ServiceAccount",
        lambda: admin.exists("/api/v1/namespaces/default/serviceaccounts/default"),
        60,
    )
    timings["control_plane"] = time.monotonic() - t


def _apply_manifests(cfg: Config) -> None:
    dns = (MANIFESTS_DIR / "kube-dns.yaml.in").read_text()
    for key, value in {
        "@DNS_IP@": cfg.net.dns_service_ip,
        "@DNS_PORT@": str(cfg.net.dns_node_port),
        "@NODE_IP@": cfg.node_ip,
    }.items():
        dns = dns.replace(key, value)
    rendered = cfg.state_dir / "kube-dns.yaml"
    rendered.write_text(dns)
    for path in (MANIFESTS_DIR / "rbac.yaml", MANIFESTS_DIR / "storageclass.yaml", rendered):
        _apply_with_retry(cfg, path)


def _apply_with_retry(cfg: Config, path: Path, timeout: float = 30) -> None:
    """Server-side apply; retried because RBAC and API discovery settle a moment after /readyz."""
    errors: list[str] = []

    def apply() -> bool:
        proc = kubectl(cfg, "apply", "--server-side", "-f", str(path), check=False)
        errors.append(proc.stderr)
        return proc.returncode == 0

    try:
        wait_for(f"kubectl apply {path.name}", apply, timeout, 1)
    except TimeoutError as exc:
        raise RuntimeError(f"{exc}: {errors[-1] if errors else ''}") from None


def _start_node(cfg: Config, timings: dict[str, float]) -> None:
    t = time.monotonic()
    env = components.component_env(cfg)
    hostnet.prepare_kernel(cfg)
    hostnet.fence(cfg)
    components.cni_conflist(cfg)
    cfg.cni_ipam_dir.mkdir(parents=True, exist_ok=True)
    cfg.volumes_dir.mkdir(parents=True, exist_ok=True)
    procs.start(cfg, "containerd", components.containerd(cfg), env)
    procs.wait_ready(
        cfg,
        "containerd",
        lambda: run(images.ctr_cmd(cfg, "version"), quiet=True, check=False).returncode == 0,
        60,
    )
    images.load_pause(cfg)
    timings["containerd"] = time.monotonic() - t

    t = time.monotonic()
    procs.start(cfg, "kube-scheduler", components.scheduler(cfg), env)
    procs.start(cfg, "kubelet", components.kubelet(cfg), env)
    procs.start(cfg, "kube-proxy", components.kube_proxy(cfg), env)
    procs.start(cfg, "coredns", components.coredns(cfg), env)
    procs.start(cfg, "provisioner", components.provisioner(cfg), components.provisioner_env(cfg))
    procs.wait_ready(
        cfg, "kube-scheduler", lambda: _http_ok("https://127.0.0.1:10259/healthz", _insecure()), 60
    )
    procs.wait_ready(cfg, "kube-proxy", lambda: _http_ok("http://127.0.0.1:10256/healthz"), 60)
    procs.wait_ready(cfg, "coredns", lambda: _http_ok("http://127.0.0.1:18181/ready"), 60)
    admin = Kube.for_identity(cfg, "admin", timeout=3)
    procs.wait_ready(cfg, "kubelet", lambda: _node_ready(admin, cfg.node_name), 120)
    timings["node"] = time.monotonic() - t
    # After the Node exists (kube-router looks itself up by name and exits otherwise); healthy
    # once its informers synced and its first full sync wrote the chains, so no test pod starts
    # before NetworkPolicies are enforced.
    t = time.monotonic()
    procs.start(cfg, "kube-router", components.kube_router(cfg), env)
    health = f"http://127.0.0.1:{cfg.net.kube_router_health_port}/healthz"
    procs.wait_ready(cfg, "kube-router", lambda: _http_ok(health), 60)
    timings["netpol"] = time.monotonic() - t


def _node_ready(kube: Kube, name: str) -> bool:
    node = kube.get(f"/api/v1/nodes/{name}")
    if not node["spec"].get("podCIDR"):
        return False
    conds = {c["type"]: c["status"] for c in node.get("status", {}).get("conditions", [])}
    return conds.get("Ready") == "True"


# ---------------------------------------------------------------- down
def delete_workloads(cfg: Config, timeout: float = 90) -> None:
    """Delete every pod-owning object and pod while the kubelet can still clean up after them.

    Pods get a 1 s grace period (a container whose PID 1 ignores SIGTERM would otherwise hold
    `down` for its full grace period); pod deletion repeats until none is left, which also
    catches pods a controller created in between. Claims go last, so the provisioner reclaims
    their volumes.
    """
    if current_tier(cfg) != "node" or procs.read_pid(cfg, "kubelet") is None:
        return
    log("deleting workloads while the kubelet runs")
    owners = "deployments,statefulsets,daemonsets,replicasets,jobs,cronjobs"
    # Orphan the pods: the garbage collector would delete them with their own (long) grace
    # period, and a kubelet already killing a pod does not shorten it for a later request.
    kubectl(
        cfg,
        "delete",
        owners,
        "--all",
        "--all-namespaces",
        "--cascade=orphan",
        "--wait=false",
        check=False,
    )

    def no_pods_left() -> bool:
        kubectl(
            cfg,
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--grace-period=1",
            "--wait=false",
            check=False,
        )
        return not kubectl(cfg, "get", "pods", "-A", "-o", "name", check=False).stdout.strip()

    try:
        waited = wait_for("all pods to be gone", no_pods_left, timeout, 1)
        log(f"pods gone after {waited:.1f}s")
        kubectl(cfg, "delete", "pvc", "--all", "--all-namespaces", "--wait=false", check=False)
        waited = wait_for(
            "volumes to be reclaimed",
            lambda: not kubectl(cfg, "get", "pv", "-o", "name", check=False).stdout.strip(),
            30,
            0.5,
        )
        log(f"volumes reclaimed after {waited:.1f}s")
    except TimeoutError as exc:
        log(f"{exc}; forcing the rest")
        kubectl(
            cfg,
            "delete",
            "pods",
            "--all",
            "--all-namespaces",
            "--force",
            "--grace-period=0",
            check=False,
        )


def down(cfg: Config) -> dict[str, object]:
    """Stop everything and put the machine back; return a report of anything that remained."""
    begin = time.monotonic()
    try:
        delete_workloads(cfg)
    except Exception as exc:  # never let a sick API server block the rest of the clean-up
        log(f"could not delete workloads: {exc}")
    for name in STOP_ORDER:
        if procs.stop(cfg, name):
            log(f"stopped {name}")
    for path in cfg.pid_dir.glob("*.pid") if cfg.pid_dir.is_dir() else []:
        procs.stop(cfg, path.stem)
    images.kill_strays(cfg)
    proxy = cfg.k8s_bin / "kube-proxy"
    if proxy.exists():
        run([proxy, "--cleanup"], check=False, quiet=True, env=components.component_env(cfg))
    found = hostnet.load_snapshot(cfg)
    hostnet.clean_iptables()
    hostnet.clean_ipsets(found)
    hostnet.clean_cgroups()
    hostnet.unmount_all(cfg)
    hostnet.delete_links(cfg, keep=found.links)
    hostnet.clean_conntrack(cfg)
    hostnet.remove_foreign_paths(found.paths)
    hostnet.restore_sysctls(found.sysctls)
    report = leftovers(cfg)
    if not report["mounts"]:
        shutil.rmtree(cfg.state_dir, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - begin, 1)
    report_path = cfg.cache_dir / "last-down-report.json"
    report_path.parent.mkdir(parents=True, exist_ok=True)
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    dirty = {k: v for k, v in report.items() if v and k != "seconds"}
    log(f"down in {report['seconds']}s" + (f"; LEFT OVER: {dirty}" if dirty else "; machine clean"))
    return report


def leftovers(cfg: Config) -> dict[str, object]:
    """What of the cluster still exists on the machine (every value empty when clean)."""
    found = hostnet.load_snapshot(cfg)
    now = hostnet.read_sysctls()
    return {
        "processes": procs.running(cfg) or images.stray_processes(cfg),
        "iptables_chains": hostnet.leftover_chains(),
        "iptables_rules": hostnet.iptables_changes(found),
        "ipsets": hostnet.leftover_ipsets(found),
        "mounts": hostnet.cluster_mounts(cfg),
        "links": [n for n in hostnet.cluster_links(cfg) if n not in found.links],
        "cgroups": [str(p) for p in hostnet.cgroup_dirs()],
        "sysctls": {k: [v, now.get(k)] for k, v in found.sysctls.items() if now.get(k) != v},
    }


def status(cfg: Config) -> dict[str, object]:
    return {
        "tier": current_tier(cfg),
        "state_dir": str(cfg.state_dir),
        "kubeconfig": str(cfg.admin_kubeconfig) if cfg.admin_kubeconfig.exists() else None,
        "processes": procs.running(cfg),
        "binaries": {
            "kubectl": str(cfg.kubectl_bin),
            "helm": str(cfg.helm_bin),
            "kind": str(cfg.kind_bin),
        },
    }


def kubeconfig_export(cfg: Config) -> str:
    return f"export KUBECONFIG={cfg.admin_kubeconfig}"


def path_of(cfg: Config, tool: str) -> Path:
    return {
        "kubectl": cfg.kubectl_bin,
        "helm": cfg.helm_bin,
        "kind": cfg.kind_bin,
        "etcd": cfg.etcd_bin,
        "coredns": cfg.coredns_bin,
    }[tool]
