"""Host-level state the cluster changes, and how it is put back.

The kubelet and kube-proxy rewrite kernel settings, iptables, mounts and cgroups that outlive their
processes. ``snapshot`` records what matters before the first component starts; ``restore`` and the
``clean_*`` functions bring the machine back to it. ``fence`` adds the network-hygiene rules that
keep every cluster packet on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import Config
from .run import log, run

# Settings the kubelet (setupKernelTunables), kube-proxy, the CNI bridge plugin or we ourselves may
# change. All are restored by `down`.
SYSCTLS = (
    "kernel.panic",
    "kernel.panic_on_oops",
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.default.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
    "net.netfilter.nf_conntrack_udp_timeout",
    "net.netfilter.nf_conntrack_udp_timeout_stream",
)

# Paths outside the state dir that containerd, libcni or the kubelet create with fixed names.
# Removed on `down` only when they did not exist before `up`.
FOREIGN_PATHS = (
    "/var/lib/cni",
    "/var/log/containers",
    "/var/log/pods",
    "/run/containerd",
    "/run/netns",
    "/var/lib/kubelet",
    "/etc/kubernetes",
    "/opt/containerd",
    "/var/lib/containerd",
    "/etc/cni/net.d",
    "/opt/cni",
)

# Chains made by the kubelet (KUBE-KUBELET-CANARY, KUBE-IPTABLES-HINT, …), kube-proxy (KUBE-*),
# the CNI plugins (CNI-*) and our fence (SNAKEPIT-*).
CHAIN_PREFIXES = ("KUBE-", "CNI-", "SNAKEPIT-")
# ipsets of kube-router's firewall controller (KUBE-SRC-*, KUBE-DST-*), the NetworkPolicy engine.
IPSET_PREFIXES = ("KUBE-",)
TABLES = ("filter", "nat", "mangle", "raw")
FENCE_CHAIN = "SNAKEPIT-FENCE"


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    values: dict[str, str] = {}
    for name in SYSCTLS:
        try:
            values[name] = _sysctl_path(name).read_text().strip()
        except OSError:
            continue
    return values


def write_sysctl(name: str, value: str) -> None:
    try:
        _sysctl_path(name).write_text(value + "\n")
    except OSError as exc:
        log(f"cannot set {name}={value}: {exc}")


def iptables_binaries() -> list[str]:
    """Every iptables front end present: rules may land in the nft or the legacy backend."""
    return [
        b
        for b in ("iptables", "ip6tables", "iptables-legacy", "ip6tables-legacy")
        if shutil.which(b)
    ]


def iptables_dump(binary: str) -> str:
    save = binary.replace("tables", "tables-save", 1)
    if not shutil.which(save):
        return ""
    return run([save], capture=True, check=False).stdout


def _dump_without_counters(text: str) -> list[str]:
    return sorted(
        line.split(" [", 1)[0] if line.startswith(":") else line
        for line in text.splitlines()
        if line and not line.startswith("#")
    )


@dataclass
class Snapshot:
    """The machine as `up` found it; `down` restores it and compares against it."""

    sysctls: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    iptables: dict[str, list[str]] = field(default_factory=dict)
    links: list[str] = field(default_factory=list)
    ipsets: list[str] = field(default_factory=list)
    taken_at: str = ""


def snapshot(cfg: Config) -> None:
    """Record the machine's state before the cluster touches it (kept until `down` finishes)."""
    path = cfg.snapshot_file
    if path.exists():  # an earlier `up` already saved the original state: keep it
        return
    found = Snapshot(
        sysctls=read_sysctls(),
        paths=[p for p in FOREIGN_PATHS if os.path.lexists(p)],
        iptables={b: _dump_without_counters(iptables_dump(b)) for b in iptables_binaries()},
        links=sorted(links()),
        ipsets=ipsets(),
        taken_at=time.strftime("%F %T"),
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(found), indent=1) + "\n")


def load_snapshot(cfg: Config) -> Snapshot:
    """The saved snapshot, or an empty one when `up` never ran (nothing to compare against)."""
    try:
        return Snapshot(**json.loads(cfg.snapshot_file.read_text()))
    except (OSError, ValueError, TypeError):
        return Snapshot()


def prepare_kernel(cfg: Config) -> None:
    """Settings the node needs: forwarding for pod traffic, bridged packets seen by iptables."""
    write_sysctl("net.ipv4.ip_forward", "1")
    write_sysctl("net.bridge.bridge-nf-call-iptables", "1")


def restore_sysctls(saved: dict[str, str]) -> None:
    current = read_sysctls()
    for name, value in saved.items():
        if current.get(name) != value:
            write_sysctl(name, value)


# ---------------------------------------------------------------- fence
def fence(cfg: Config) -> None:
    """Drop, on the uplink, anything addressed to link-local or cluster ranges or sent by a pod.

    In the mangle table so that kube-proxy's and the CNI plugins' ACCEPT rules (filter/nat) can
    never come first. The host's own traffic to its normal destinations is untouched.
    """
    ipt = ["iptables", "-w", "-t", "mangle"]
    if run([*ipt, "-nL", FENCE_CHAIN], check=False, quiet=True).returncode == 0:
        run([*ipt, "-F", FENCE_CHAIN])
    else:
        run([*ipt, "-N", FENCE_CHAIN])
    dev, net = cfg.uplink, cfg.net
    for rule in (
        ["-d", "169.254.0.0/16"],
        ["-d", net.service_cidr],
        ["-d", net.cluster_cidr],
        ["-s", net.cluster_cidr],
    ):
        run(
            [
                *ipt,
                "-A",
                FENCE_CHAIN,
                "-o",
                dev,
                *rule,
                "-j",
                "DROP",
                "-m",
                "comment",
                "--comment",
                "snakepit local cluster: stay on this machine",
            ]
        )
    if run([*ipt, "-C", "POSTROUTING", "-j", FENCE_CHAIN], check=False, quiet=True).returncode:
        run([*ipt, "-I", "POSTROUTING", "1", "-j", FENCE_CHAIN])


# ---------------------------------------------------------------- iptables clean-up
def _ours(name: str) -> bool:
    return name.startswith(CHAIN_PREFIXES)


def clean_iptables() -> None:
    """Delete every rule that jumps to, and every chain named, KUBE-*, CNI-* or SNAKEPIT-*."""
    for binary in iptables_binaries():
        dump = iptables_dump(binary)
        table = ""
        chains: dict[str, list[str]] = {}
        rules: list[tuple[str, list[str]]] = []
        for line in dump.splitlines():
            if line.startswith("*"):
                table = line[1:]
                chains.setdefault(table, [])
            elif line.startswith(":"):
                name = line[1:].split()[0]
                if _ours(name):
                    chains[table].append(name)
            elif line.startswith("-A "):
                words = shlex.split(line)
                chain = words[1]
                target = words[words.index("-j") + 1] if "-j" in words else ""
                target = target or (words[words.index("-g") + 1] if "-g" in words else "")
                if not _ours(chain) and _ours(target):
                    rules.append((table, words[1:]))
        for table, words in rules:
            run([binary, "-w", "-t", table, "-D", *words], check=False, quiet=True)
        for table, names in chains.items():
            for name in names:
                run([binary, "-w", "-t", table, "-F", name], check=False, quiet=True)
            for name in names:
                run([binary, "-w", "-t", table, "-X", name], check=False, quiet=True)


def iptables_changes(found: Snapshot) -> list[str]:
    """Rules added (+) or removed (-) since the snapshot, per front end; empty when restored.

    Tables that exist but hold no rule and only policy-ACCEPT built-in chains are ignored: the nft
    backend keeps a table once anything touched it, and iptables cannot delete tables.
    """
    changes = []
    for binary, before in found.iptables.items():
        now = _dump_without_counters(iptables_dump(binary))
        for line in sorted(set(now) ^ set(before)):
            if line.startswith("*") or line == "COMMIT":
                continue
            if line.startswith(":") and line.split()[1] == "ACCEPT" and not _ours(line[1:]):
                continue
            changes.append(f"{binary}: {'+' if line in now else '-'} {line}")
    return changes


def leftover_chains() -> list[str]:
    found = []
    for binary in iptables_binaries():
        for line in iptables_dump(binary).splitlines():
            if line.startswith(":") and _ours(line[1:].split()[0]):
                found.append(f"{binary}: {line[1:].split()[0]}")
    return found


# ---------------------------------------------------------------- ipsets
def ipsets() -> list[str]:
    """Names of every ipset on the machine (none when the ipset tool is missing)."""
    if not shutil.which("ipset"):
        return []
    return sorted(run(["ipset", "list", "-n"], capture=True, check=False).stdout.split())


def leftover_ipsets(found: Snapshot) -> list[str]:
    return [n for n in ipsets() if n.startswith(IPSET_PREFIXES) and n not in found.ipsets]


def clean_ipsets(found: Snapshot) -> None:
    """Destroy the engine's sets; only once no iptables rule refers to them (after
    `clean_iptables`), since the kernel refuses to destroy a set in use."""
    for name in leftover_ipsets(found):
        run(["ipset", "destroy", name], check=False, quiet=True)


# ---------------------------------------------------------------- links, mounts, cgroups
def links() -> list[str]:
    return [p.name for p in Path("/sys/class/net").iterdir()]


def cluster_links(cfg: Config) -> list[str]:
    """The CNI bridge and host ends of pod veth pairs (the bridge plugin names them veth*).

    A veth plugged into another bridge is someone else's (a container engine's, such as the
    kind provider's Docker), never ours to delete.
    """
    found = []
    for name in links():
        master = Path("/sys/class/net", name, "master")
        other = master.exists() and master.resolve().name != cfg.net.bridge
        if name == cfg.net.bridge or (name.startswith("veth") and not other):
            found.append(name)
    return found


def delete_links(cfg: Config, keep: list[str]) -> None:
    for name in cluster_links(cfg):
        if name not in keep:
            run(["ip", "link", "delete", name], check=False, quiet=True)


def mounts() -> list[str]:
    """Mount points, decoded from /proc/self/mountinfo (octal escapes such as \\040)."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        raw = line.split()[4]
        points.append(raw.encode().decode("unicode_escape"))
    return points


def cluster_mounts(cfg: Config) -> list[str]:
    state = str(cfg.state_dir)
    prefixes = (state + "/", "/run/netns/cni-", "/run/containerd/", "/var/lib/kubelet/")
    return [m for m in mounts() if m == state or m.startswith(prefixes)]


def unmount_all(cfg: Config) -> None:
    for _ in range(5):
        points = sorted(set(cluster_mounts(cfg)), key=len, reverse=True)
        if not points:
            return
        for point in points:
            if run(["umount", point], check=False, quiet=True).returncode:
                run(["umount", "-l", point], check=False, quiet=True)


def cgroup_dirs() -> list[Path]:
    """Every `kubepods` cgroup (the kubelet's cgroupfs driver), one per v1 hierarchy."""
    root = Path("/sys/fs/cgroup")
    found = []
    for hierarchy in root.iterdir() if root.is_dir() else []:
        if (hierarchy / "kubepods").is_dir():
            found.append(hierarchy / "kubepods")
    return found


def clean_cgroups() -> None:
    """Kill whatever still runs in kubepods, then remove the cgroups deepest first."""
    for _ in range(20):
        pids: set[int] = set()
        for top in cgroup_dirs():
            for procs in top.rglob("cgroup.procs"):
                try:
                    pids.update(int(p) for p in procs.read_text().split())
                except OSError:
                    continue
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)
    for top in cgroup_dirs():
        dirs = sorted(
            (p for p in top.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True
        )
        for d in [*dirs, top]:
            try:
                d.rmdir()
            except OSError as exc:
                log(f"cannot remove cgroup {d}: {exc}")


def clean_conntrack(cfg: Config) -> None:
    if not shutil.which("conntrack"):
        return
    for cidr in (cfg.net.cluster_cidr, cfg.net.service_cidr):
        for flag in ("-s", "-d"):
            run(["conntrack", "-D", flag, cidr], check=False, quiet=True)


def remove_foreign_paths(existed_before: list[str]) -> None:
    for path in FOREIGN_PATHS:
        if path not in existed_before and os.path.lexists(path):
            shutil.rmtree(path, ignore_errors=True)
            if os.path.lexists(path):
                log(f"could not remove {path}")
