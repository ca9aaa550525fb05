"""``scripts/local-cluster up|down|status --provider kind``: a kind cluster, on this machine or on
a user's Docker.

``up`` records the machine as it finds it, makes sure an engine runs (``engine.py``), builds the
node image when the engine is ours (``nodeimage.py``; a user's engine uses kind's stock image,
pulled by kind), creates the cluster from a generated kind config, and with our own image also
gives the nodes their pod network, takes upstream forwarding out of CoreDNS and starts the volume
provisioner. ``down`` deletes the cluster, stops what ``up`` started and puts the machine back.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import build, hostnet, procs
from ..cluster import current_tier
from ..config import Config
from ..run import log, wait_for, write_file
from . import engine as eng
from . import nodeimage
from .settings import KindConfig

# Kernel-global settings a kind node may change from inside its container (the kubelet writes the
# first ones; systemd-sysctl, masked in our image, would write the fs.* ones): restored by `down`.
EXTRA_SYSCTLS = (
    "fs.protected_fifos",
    "fs.protected_regular",
    "fs.protected_hardlinks",
    "fs.protected_symlinks",
    "kernel.pid_max",
    "fs.inotify.max_user_instances",
    "fs.inotify.max_user_watches",
)
# Fixed paths our engine creates outside its own folders (removed unless they existed), and
# /lib/modules, which kind bind-mounts into every node and which this VM does not have.
FOREIGN_PATHS = (
    "/etc/docker",
    "/run/docker",
    "/run/containerd",
    "/var/lib/docker",
    "/lib/modules",
    "/run/snakepit-nodeimage",
)
STOCK = "stock"
BUILT = "built"


@dataclass
class Found(hostnet.Snapshot):
    """The local provider's snapshot, plus what a kind cluster changes besides: cgroups of the
    engine's parent and routes to the nodes' pod and Service ranges."""

    cgroups: list[str] = field(default_factory=list)
    routes: list[str] = field(default_factory=list)


def read_sysctls() -> dict[str, str]:
    values = hostnet.read_sysctls()
    for name in EXTRA_SYSCTLS:
        with contextlib.suppress(OSError):
            values[name] = Path("/proc/sys", name.replace(".", "/")).read_text().strip()
    return values


def our_links(kcfg: KindConfig) -> list[str]:
    """Our bridge and the host ends of veths plugged into it (never another runtime's veths)."""
    found = []
    for name in hostnet.links():
        master = Path("/sys/class/net", name, "master")
        if name == kcfg.bridge or (master.exists() and master.resolve().name == kcfg.bridge):
            found.append(name)
    return found


def routes() -> list[str]:
    out = subprocess.run(["ip", "-4", "route", "show"], capture_output=True, text=True, check=False)
    return sorted(line.strip() for line in out.stdout.splitlines() if line.strip())


def cgroup_dirs(kcfg: KindConfig) -> list[Path]:
    """Our engine's cgroup parent in every v1 hierarchy (and the v2 root when there is one)."""
    root = Path("/sys/fs/cgroup")
    found = [h / kcfg.cgroup_parent for h in root.iterdir() if (h / kcfg.cgroup_parent).is_dir()]
    return found + ([root / kcfg.cgroup_parent] if (root / kcfg.cgroup_parent).is_dir() else [])


def snapshot(kcfg: KindConfig) -> None:
    if kcfg.snapshot_file.exists():
        return
    found = Found(
        sysctls=read_sysctls(),
        paths=[p for p in FOREIGN_PATHS if os.path.lexists(p)],
        iptables={
            b: hostnet._dump_without_counters(hostnet.iptables_dump(b))
            for b in hostnet.iptables_binaries()
        },
        links=sorted(hostnet.links()),
        cgroups=[str(p) for p in cgroup_dirs(kcfg)],
        routes=routes(),
        taken_at=time.strftime("%F %T"),
    )
    write_file(kcfg.snapshot_file, json.dumps(asdict(found), indent=1) + "\n")


def load_snapshot(kcfg: KindConfig) -> Found:
    try:
        return Found(**json.loads(kcfg.snapshot_file.read_text()))
    except (OSError, ValueError, TypeError):
        return Found()


def read_info(kcfg: KindConfig) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(kcfg.info_file.read_text())
    except (OSError, ValueError):
        return {}
    return data


# ---------------------------------------------------------------- commands
def _run(cmd: list[str], env: dict[str, str], timeout: float = 600, **kw: Any) -> str:
    proc = subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
        **kw,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stderr}")
    return proc.stdout


def kind_bin(kcfg: KindConfig) -> str:
    build.ensure_component(kcfg.cfg, "kind")
    return str(kcfg.cfg.kind_bin)


def kubectl(
    kcfg: KindConfig, *args: str, check: bool = True, timeout: float = 120, **kw: Any
) -> str:
    cmd = [str(kcfg.cfg.kubectl_bin), f"--kubeconfig={kcfg.kubeconfig}", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)} failed:\n{proc.stderr}")
    return proc.stdout


def node_names(kcfg: KindConfig, engine: eng.Engine) -> list[str]:
    out = _run([kind_bin(kcfg), "get", "nodes", "--name", kcfg.name], engine.env)
    return sorted(out.split())


def cluster_exists(kcfg: KindConfig, engine: eng.Engine) -> bool:
    return kcfg.name in _run([kind_bin(kcfg), "get", "clusters"], engine.env).split()


def docker_exec(engine: eng.Engine, node: str, *cmd: str, stdin: str | None = None) -> str:
    args = ["docker", "exec", *(["-i"] if stdin is not None else []), node, *cmd]
    return _run(args, engine.env, input=stdin)


def node_ip(engine: eng.Engine, node: str) -> str:
    fmt = "{{range .NetworkSettings.Networks}}{{.IPAddress}} {{end}}"
    return _run(["docker", "inspect", "-f", fmt, node], engine.env).split()[0]


# ---------------------------------------------------------------- config
def kind_config(kcfg: KindConfig, nodes: int, image: str | None) -> str:
    """The kind config: 1 control plane + ``nodes - 1`` workers.

    With our own image: no default CNI (kindnetd cannot be built here; ``up`` sets up the pod
    network itself), and settings that let a stopped node's pods be replaced within seconds
    rather than minutes (the e2e tests stop a node). Both images: kubelet on cgroup v1
    explicitly allowed (``failCgroupV1`` defaults to true from 1.35 on).
    """
    image_line = f"\n  image: {image}" if image else ""
    roles = ["control-plane"] + ["worker"] * (nodes - 1)
    node_lines = "".join(f"- role: {role}{image_line}\n" for role in roles)
    built = image is not None and image.startswith(nodeimage.REPOSITORY)
    networking = f"""networking:
  podSubnet: "{kcfg.pod_subnet}"
  serviceSubnet: "{kcfg.service_subnet}"
"""
    if built:
        networking += "  disableDefaultCNI: true\n"
    return f"""# generated by scripts/local-cluster up --provider kind
kind: Cluster
apiVersion: kind.x-k8s.io/v1alpha4
name: {kcfg.name}
{networking}nodes:
{node_lines}kubeadmConfigPatches:
- |
  kind: KubeletConfiguration
  failCgroupV1: false
- |
  # kind writes v1beta3 for Kubernetes 1.34 (extraArgs: maps) ...
  apiVersion: kubeadm.k8s.io/v1beta3
  kind: ClusterConfiguration
  apiServer:
    extraArgs:
      default-not-ready-toleration-seconds: "10"
      default-unreachable-toleration-seconds: "10"
  controllerManager:
    extraArgs:
      node-monitor-grace-period: "20s"
- |
  # ... and v1beta4 for newer releases (kind's stock image; extraArgs: lists, replaced whole)
  apiVersion: kubeadm.k8s.io/v1beta4
  kind: ClusterConfiguration
  apiServer:
    extraArgs:
    - name: default-not-ready-toleration-seconds
      value: "10"
    - name: default-unreachable-toleration-seconds
      value: "10"
  controllerManager:
    extraArgs:
    - name: node-monitor-grace-period
      value: "20s"
"""


# ---------------------------------------------------------------- pod network (our image)
def conflist(pod_cidr: str) -> str:
    """ptp + host-local on the node's podCIDR (what kindnetd writes), portmap for hostPorts."""
    return json.dumps(
        {
            "cniVersion": "0.4.0",
            "name": "snakepit-kind",
            "plugins": [
                {
                    "type": "ptp",
                    "ipMasq": False,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": pod_cidr}]],
                        "routes": [{"dst": "0.0.0.0/0"}],
                    },
                },
                {"type": "portmap", "capabilities": {"portMappings": True}},
            ],
        },
        indent=1,
    )


def pod_cidrs(kcfg: KindConfig, nodes: list[str]) -> dict[str, str]:
    """{node: podCIDR}, once the controller-manager has given every node one."""
    cidrs: dict[str, str] = {}

    def all_cidrs() -> bool:
        for node in nodes:
            cidr = kubectl(kcfg, "get", "node", node, "-o", "jsonpath={.spec.podCIDR}").strip()
            if not cidr:
                return False
            cidrs[node] = cidr
        return True

    wait_for("podCIDRs for every node", all_cidrs, 120, 1)
    return cidrs


def setup_pod_network(kcfg: KindConfig, engine: eng.Engine, nodes: list[str]) -> None:
    """Each node: a CNI config for its podCIDR, and a route to every other node's podCIDR via
    that node's address on the kind network (all nodes share one bridge, so no overlay)."""
    cidrs = pod_cidrs(kcfg, nodes)
    ips = {node: node_ip(engine, node) for node in nodes}
    for node in nodes:
        docker_exec(
            engine,
            node,
            "cp",
            "/dev/stdin",
            "/etc/cni/net.d/10-snakepit.conflist",
            stdin=conflist(cidrs[node]),
        )
        for other in nodes:
            if other != node:
                docker_exec(engine, node, "ip", "route", "replace", cidrs[other], "via", ips[other])
    log("pod network: " + ", ".join(f"{n} {cidrs[n]} via {ips[n]}" for n in nodes))


def host_routes(kcfg: KindConfig, engine: eng.Engine, nodes: list[str]) -> str:
    """The host reaches pods and Services as the nodes do, and nothing of their ranges leaves
    the machine by the default route: each node's podCIDR is routed to that node, ClusterIPs to
    the control-plane node (whose kube-proxy forwards, and masquerades, to any node), and the
    rest of the pod range is unreachable. The routes via nodes go with the bridge; ``down``
    deletes the unreachable one. Returns the Service route."""
    env = engine.env
    _run(["ip", "route", "replace", "unreachable", kcfg.pod_subnet], env)
    for node, cidr in pod_cidrs(kcfg, nodes).items():
        _run(
            ["ip", "route", "replace", cidr, "via", node_ip(engine, node), "dev", kcfg.bridge], env
        )
    via = node_ip(engine, f"{kcfg.name}-control-plane")
    _run(["ip", "route", "replace", kcfg.service_subnet, "via", via, "dev", kcfg.bridge], env)
    return f"{kcfg.service_subnet} via {via}"


def without_forward(corefile: str) -> str:
    """The Corefile without its ``forward`` block(s)."""
    out: list[str] = []
    depth = 0
    for line in corefile.splitlines():
        if depth:
            depth += line.count("{") - line.count("}")
            continue
        if line.strip().startswith("forward "):
            depth = line.count("{") - line.count("}")
            continue
        out.append(line)
    return "\n".join(out) + "\n"


def drop_coredns_forward(kcfg: KindConfig) -> None:
    """CoreDNS answers cluster names only: no query goes to an upstream resolver."""
    cm = json.loads(kubectl(kcfg, "-n", "kube-system", "get", "configmap", "coredns", "-o", "json"))
    cm["data"]["Corefile"] = without_forward(cm["data"]["Corefile"])
    kubectl(kcfg, "apply", "-f", "-", input=json.dumps(cm))


# ---------------------------------------------------------------- provisioner (our image)
def write_client_pki(kcfg: KindConfig) -> dict[str, str]:
    """The admin identity of the kubeconfig as files (the provisioner's stdlib client)."""
    import base64

    conf = json.loads(kubectl(kcfg, "config", "view", "--raw", "--minify", "-o", "json"))
    cluster, user = conf["clusters"][0]["cluster"], conf["users"][0]["user"]
    pki = kcfg.state_dir / "pki"
    files = {
        "ca": ("ca.crt", cluster["certificate-authority-data"]),
        "cert": ("admin.crt", user["client-certificate-data"]),
        "key": ("admin.key", user["client-key-data"]),
    }
    paths = {}
    for key, (name, data) in files.items():
        path = write_file(pki / name, base64.b64decode(data), 0o600)
        paths[key] = str(path)
    paths["server"] = cluster["server"]
    return paths


def start_provisioner(kcfg: KindConfig, engine: eng.Engine) -> None:
    import sys

    from ..config import REPO_ROOT

    pki = write_client_pki(kcfg)
    argv = [
        sys.executable,
        "-m",
        "localkube.provisioner",
        "--kind-state-dir",
        str(kcfg.state_dir),
        "--server",
        pki["server"],
        "--ca",
        pki["ca"],
        "--cert",
        pki["cert"],
        "--key",
        pki["key"],
        "--root",
        kcfg.volumes_dir,
    ]
    env = {"PYTHONPATH": str(REPO_ROOT), "DOCKER_HOST": engine.docker_host or ""}
    procs.start(kcfg.cfg, "provisioner", argv, env)


# ---------------------------------------------------------------- up
def choose_image(kcfg: KindConfig, engine: eng.Engine) -> str:
    """``SNAKEPIT_KIND_IMAGE``: ``built`` (made here), ``stock`` (kind's default, pulled) or an
    image reference. Default: built when the engine is ours, stock on a user's engine."""
    return os.environ.get("SNAKEPIT_KIND_IMAGE") or (BUILT if engine.owned else STOCK)


def up(kcfg: KindConfig, nodes: int = 1) -> dict[str, float]:
    if nodes < 1:
        raise ValueError("--nodes must be at least 1")
    if current_tier(Config()) is not None:
        raise RuntimeError(
            "the local provider's cluster runs: `scripts/local-cluster down` first "
            "(the two must not run at the same time)"
        )
    timings: dict[str, float] = {}
    begin = time.monotonic()
    info = read_info(kcfg)
    engine = eng.running_engine(kcfg)
    complete = bool(info.get("up_timings"))  # written last: an `up` that failed left none
    if complete and engine and cluster_exists(kcfg, engine):
        if info.get("nodes") == nodes:
            log(f"reusing the running kind cluster {kcfg.name} ({nodes} nodes)")
            return {"total": 0.0}
        log(f"the running kind cluster has {info.get('nodes')} nodes, not {nodes}: recreating")
        down(kcfg)
    elif kcfg.state_dir.exists():
        log("found the remains of an earlier kind cluster; cleaning them up first")
        down(kcfg)
    kcfg.state_dir.mkdir(parents=True, exist_ok=True)
    snapshot(kcfg)
    t = time.monotonic()
    build.ensure_all(kcfg.cfg, ("k8s", "kind"))
    engine = eng.ensure_engine(kcfg)
    timings["engine"] = time.monotonic() - t
    info = {"engine": asdict(engine), "nodes": nodes, "name": kcfg.name}
    write_file(kcfg.info_file, json.dumps(info, indent=1) + "\n")

    choice = choose_image(kcfg, engine)
    image: str | None
    t = time.monotonic()
    if choice == BUILT:
        image, image_timings = nodeimage.ensure_node_image(kcfg, engine)
        info["image_build"] = image_timings
    elif choice == STOCK:
        image = None
    else:
        image = choice
    timings["image"] = time.monotonic() - t
    info["image"] = image or "kind default"
    built = image is not None and image.startswith(nodeimage.REPOSITORY)
    write_file(kcfg.info_file, json.dumps(info, indent=1) + "\n")

    env = engine.env
    if engine.owned:
        _ensure_network(kcfg, engine)
    if not os.path.lexists("/lib/modules"):
        Path("/lib/modules").mkdir(parents=True)  # kind mounts it into every node
    config = write_file(kcfg.state_dir / "kind-config.yaml", kind_config(kcfg, nodes, image))
    t = time.monotonic()
    log(f"kind create cluster {kcfg.name}: {nodes} node(s), image {info['image']}")
    args = [kind_bin(kcfg), "create", "cluster", "--name", kcfg.name, f"--config={config}"]
    args += [f"--kubeconfig={kcfg.kubeconfig}", "--retain"]
    if not built:
        args.append("--wait=180s")
    try:
        _run(args, {**env, "KIND_EXPERIMENTAL_PROVIDER": "docker"}, timeout=900)
    except RuntimeError:
        _export_logs(kcfg, engine)
        raise
    timings["create"] = time.monotonic() - t
    t = time.monotonic()
    names = node_names(kcfg, engine)
    if built:
        drop_coredns_forward(kcfg)
        setup_pod_network(kcfg, engine, names)
        start_provisioner(kcfg, engine)
    if engine.owned:
        info["service_route"] = host_routes(kcfg, engine, names)
    kubectl(kcfg, "wait", "--for=condition=Ready", "node", "--all", "--timeout=180s", timeout=200)
    kubectl(
        kcfg,
        "-n",
        "kube-system",
        "rollout",
        "status",
        "deployment/coredns",
        "--timeout=180s",
        timeout=200,
    )
    timings["ready"] = time.monotonic() - t
    timings["total"] = time.monotonic() - begin
    info.update(
        {
            "node_names": names,
            "node_ips": {n: node_ip(engine, n) for n in names},
            "up_timings": timings,
        }
    )
    write_file(kcfg.info_file, json.dumps(info, indent=1) + "\n")
    log("kind cluster is up: " + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return timings


def _ensure_network(kcfg: KindConfig, engine: eng.Engine) -> None:
    """The nodes' network on our engine: a bridge with a fixed name and subnet, no NAT."""
    inspect = subprocess.run(
        ["docker", "network", "inspect", kcfg.network],
        capture_output=True,
        env=engine.env,
        check=False,
    )
    if inspect.returncode == 0:
        return
    _run(
        [
            "docker",
            "network",
            "create",
            "--driver=bridge",
            f"--subnet={kcfg.node_subnet}",
            "-o",
            f"com.docker.network.bridge.name={kcfg.bridge}",
            "-o",
            "com.docker.network.bridge.enable_ip_masquerade=false",
            kcfg.network,
        ],
        engine.env,
    )


def _export_logs(kcfg: KindConfig, engine: eng.Engine) -> None:
    dest = kcfg.state_dir / "kind-logs"
    subprocess.run(
        [kind_bin(kcfg), "export", "logs", str(dest), "--name", kcfg.name],
        capture_output=True,
        env=engine.env,
        check=False,
        timeout=300,
    )
    log(f"kind logs exported to {dest}")


# ---------------------------------------------------------------- down
def down(kcfg: KindConfig) -> dict[str, object]:
    begin = time.monotonic()
    info = read_info(kcfg)
    engine = eng.running_engine(kcfg)
    procs.stop(kcfg.cfg, "provisioner")
    if engine is not None:
        try:
            if cluster_exists(kcfg, engine):
                log(f"kind delete cluster {kcfg.name}")
                _run([kind_bin(kcfg), "delete", "cluster", "--name", kcfg.name], engine.env)
        except Exception as exc:  # an engine that fails must not block the clean-up
            log(f"could not delete the kind cluster: {exc}")
        if engine.owned:
            subprocess.run(
                ["docker", "network", "rm", kcfg.network],
                capture_output=True,
                env=engine.env,
                check=False,
            )
    found = load_snapshot(kcfg)
    if engine is None or engine.owned or info.get("engine", {}).get("owned"):
        eng.stop_engine(kcfg)
        if f"unreachable {kcfg.pod_subnet}" not in found.routes:
            subprocess.run(
                ["ip", "route", "delete", "unreachable", kcfg.pod_subnet],
                capture_output=True,
                check=False,
            )
    _unmount_under((kcfg.docker_exec_root, kcfg.docker_data_root))
    _clean_cgroups(kcfg, found)
    for name in our_links(kcfg):
        if name not in found.links:
            subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)
    shutil.rmtree(kcfg.docker_exec_root, ignore_errors=True)
    if current_tier(Config()) is not None:
        # Someone started the local provider's cluster meanwhile (they must not run together):
        # /run/containerd, the sysctls and such are its now; leave them to its own `down`.
        log("the local provider's cluster runs: shared paths and kernel settings left alone")
    else:
        for path in FOREIGN_PATHS:
            if found.taken_at and path not in found.paths and os.path.lexists(path):
                shutil.rmtree(path, ignore_errors=True)
        hostnet.restore_sysctls(found.sysctls)
    report = leftovers(kcfg, found)
    shutil.rmtree(kcfg.state_dir, ignore_errors=True)
    report["seconds"] = round(time.monotonic() - begin, 1)
    path = kcfg.cache_dir / "last-kind-down-report.json"
    write_file(path, json.dumps(report, indent=1) + "\n")
    dirty = {k: v for k, v in report.items() if v and k != "seconds"}
    log(f"down in {report['seconds']}s" + (f"; LEFT OVER: {dirty}" if dirty else "; machine clean"))
    return report


def _unmount_under(tops: tuple[Path, ...]) -> None:
    prefixes = tuple(str(t) + "/" for t in tops)
    for _ in range(3):
        points = sorted(
            (m for m in hostnet.mounts() if m.startswith(prefixes)), key=len, reverse=True
        )
        if not points:
            return
        for point in points:
            if subprocess.run(["umount", point], capture_output=True, check=False).returncode:
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)


def _clean_cgroups(kcfg: KindConfig, found: Found) -> None:
    for _ in range(10):
        pids = set()
        for top in cgroup_dirs(kcfg):
            for f in top.rglob("cgroup.procs"):
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(p) for p in f.read_text().split())
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.3)
    for top in cgroup_dirs(kcfg):
        if str(top) in found.cgroups:
            continue
        dirs = sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts))
        for d in [*reversed(dirs), top]:
            with contextlib.suppress(OSError):
                d.rmdir()


def leftovers(kcfg: KindConfig, found: Found | None = None) -> dict[str, object]:
    """What of the kind cluster and our engine remains on this machine (all empty when clean)."""
    found = found or load_snapshot(kcfg)
    now = read_sysctls()
    changes = []
    for binary, before in found.iptables.items():
        current = hostnet._dump_without_counters(hostnet.iptables_dump(binary))
        for line in sorted(set(current) ^ set(before)):
            if line.startswith("*") or line == "COMMIT":
                continue
            if line.startswith(":") and line.split()[1] == "ACCEPT":
                continue  # an empty built-in chain of a table something else touched
            changes.append(f"{binary}: {'+' if line in current else '-'} {line}")
    prefixes = (str(kcfg.docker_exec_root) + "/", str(kcfg.docker_data_root) + "/")
    if current_tier(Config()) is not None:
        # The local cluster's own rules, paths and settings are not ours to report.
        changes, now, found.sysctls, found.taken_at = [], {}, {}, ""
    return {
        "processes": {**procs.running(kcfg.cfg), **eng.stray_processes(kcfg)},
        "iptables_rules": changes,
        "mounts": [m for m in hostnet.mounts() if m.startswith(prefixes)],
        "links": [n for n in our_links(kcfg) if n not in found.links],
        "cgroups": [str(p) for p in cgroup_dirs(kcfg) if str(p) not in found.cgroups],
        "routes": sorted(set(routes()) ^ set(found.routes)) if found.taken_at else [],
        "paths": [
            p
            for p in (*FOREIGN_PATHS, str(kcfg.docker_exec_root))
            if found.taken_at and p not in found.paths and os.path.lexists(p)
        ],
        "sysctls": {k: [v, now.get(k)] for k, v in found.sysctls.items() if now.get(k) != v},
    }


def built_image(info: dict[str, object]) -> bool:
    """Whether the cluster ``info`` describes runs the node image built here (no CNI daemon, so
    no NetworkPolicy engine: pods are wired by static routes) rather than kind's stock one."""
    return str(info.get("image", "")).startswith(nodeimage.REPOSITORY)


def status(kcfg: KindConfig) -> dict[str, object]:
    info = read_info(kcfg)
    engine = eng.running_engine(kcfg)
    running = bool(info.get("up_timings")) and engine is not None and cluster_exists(kcfg, engine)
    return {
        "provider": "kind",
        "running": running,
        "kubeconfig": str(kcfg.kubeconfig) if kcfg.kubeconfig.exists() else None,
        "processes": procs.running(kcfg.cfg),
        **info,
    }


def _engine(kcfg: KindConfig) -> eng.Engine:
    engine = eng.running_engine(kcfg)
    if engine is None:
        raise RuntimeError("no container engine runs")
    return engine


def stop_node(kcfg: KindConfig, node: str) -> None:
    _run(["docker", "stop", node], _engine(kcfg).env, timeout=120)


def start_node(kcfg: KindConfig, node: str) -> None:
    """Start a stopped node's container again; with our image, give it its routes back (its
    network namespace is new) and check it kept its address (kubeadm's files name it)."""
    engine = _engine(kcfg)
    info = read_info(kcfg)
    before = info.get("node_ips", {}).get(node)
    _run(["docker", "start", node], engine.env, timeout=120)
    after = node_ip(engine, node)
    if before and after != before:
        raise RuntimeError(f"{node} came back with address {after}, not {before}")
    if built_image(info):
        wait_for(
            f"{node}'s systemd",
            lambda: (
                subprocess.run(
                    ["docker", "exec", node, "test", "-S", "/run/containerd/containerd.sock"],
                    env=engine.env,
                    capture_output=True,
                    check=False,
                ).returncode
                == 0
            ),
            120,
            1,
        )
        setup_pod_network(kcfg, engine, node_names(kcfg, engine))


def load_images(kcfg: KindConfig, archives: dict[str, Path]) -> float:
    """``kind load image-archive`` into every node; an archive already loaded into this cluster
    (its name carries the content key) is skipped."""
    begin = time.monotonic()
    engine = eng.running_engine(kcfg)
    if engine is None:
        raise RuntimeError("no container engine runs")
    record = kcfg.state_dir / "loaded-images.json"
    try:
        loaded: dict[str, str] = json.loads(record.read_text())
    except (OSError, ValueError):
        loaded = {}
    for name, archive in archives.items():
        if loaded.get(name) == archive.name:
            continue
        log(f"kind load image-archive {archive.name}")
        _run(
            [kind_bin(kcfg), "load", "image-archive", str(archive), "--name", kcfg.name],
            engine.env,
            timeout=900,
        )
        loaded[name] = archive.name
        write_file(record, json.dumps(loaded, indent=1) + "\n")
    return time.monotonic() - begin


def kubeconfig_export(kcfg: KindConfig) -> str:
    return f"export KUBECONFIG={kcfg.kubeconfig}"
