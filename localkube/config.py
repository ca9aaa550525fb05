"""Pinned versions, paths and network ranges of the local cluster.

Everything is derived from a few environment variables so CI and developers can move the cache
and state folders; nothing here touches the machine.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

# Kubernetes 1.34 is the newest release that still runs on cgroup v1 without `failCgroupV1`.
K8S_VERSION = "v1.34.4"
K8S_STAGING_VERSION = "v0.34.4"
ETCD_VERSION = "v3.6.16"
COREDNS_VERSION = "v1.14.7"
HELM_VERSION = "v3.22.0"
KIND_VERSION = "v0.33.0"
# Bumped whenever the pause program in build.py changes.
PAUSE_VERSION = "3.10-snakepit1"
# Bumped whenever localkube/kind/runcwrap.go changes (its source is also part of the recipe key).
RUNCWRAP_VERSION = "1"
# The NetworkPolicy engine: only kube-router's firewall controller runs (iptables + ipset). The
# advisories against v2.1.0 are in its service proxy and BGP router, which stay off (the Go
# module proxy serves no later v2 release); kube-network-policies needs `nft queue`, which this
# kernel lacks (docs/local-cluster.md).
KUBE_ROUTER_VERSION = "v2.1.0"
# The Prometheus the e2e test runs against the cluster (pod discovery): built from its Go module
# because Debian's package has no Kubernetes service discovery (docs/observability.md).
PROMETHEUS_VERSION = "v0.316.0"

REPO_ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(__file__).resolve().parent
MANIFESTS_DIR = PACKAGE_DIR / "manifests"

TIERS = ("control-plane", "node")


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


@dataclass(frozen=True)
class Network:
    """Address ranges of the cluster. None of them may overlap the machine's own networks."""

    service_cidr: str = "10.96.0.0/16"
    kubernetes_service_ip: str = "10.96.0.1"
    dns_service_ip: str = "10.96.0.10"
    cluster_cidr: str = "10.244.0.0/16"
    # The controller-manager allocates the first /24 of cluster_cidr to the only node; the CNI
    # conflist must name the same subnet because containerd 1.6 does not pass the podCIDR to CNI.
    pod_cidr: str = "10.244.0.0/24"
    bridge: str = "cni0"
    cni_network_name: str = "snakepit"
    apiserver_port: int = 6443
    etcd_client_port: int = 2379
    etcd_peer_port: int = 2380
    # CoreDNS runs on the host: on port 53 of the node IP, where the kube-dns Service sends pods'
    # queries (a NetworkPolicy sees the port after kube-proxy's DNAT, and DNS rules name 53, as
    # with a CoreDNS pod), and on this port of 127.0.0.1 for the host itself.
    coredns_port: int = 1053
    dns_node_port: int = 53
    # kube-router's health endpoint (its default; served on every address of the host).
    kube_router_health_port: int = 20244
    provisioner_name: str = "snakepit.dev/local-path"


@dataclass(frozen=True)
class Config:
    """Where the cluster lives. ``SNAKEPIT_CACHE`` survives clusters; ``state_dir`` does not."""

    cache_dir: Path = field(
        default_factory=lambda: _env_path("SNAKEPIT_CACHE", "/var/cache/snakepit")
    )
    state_dir: Path = field(
        default_factory=lambda: _env_path("SNAKEPIT_CLUSTER_DIR", "/var/lib/snakepit-cluster")
    )
    node_name: str = field(
        default_factory=lambda: os.environ.get("SNAKEPIT_NODE_NAME", "snakepit-node")
    )
    net: Network = field(default_factory=Network)

    # ---- cache layout (outside the clone, keyed by version) ----
    @property
    def go_cache(self) -> Path:
        return self.cache_dir / "go" / "build"

    @property
    def go_mod_cache(self) -> Path:
        return self.cache_dir / "go" / "mod"

    def bin_dir(self, component: str, version: str) -> Path:
        return self.cache_dir / f"{component}-{version}" / "bin"

    @property
    def k8s_bin(self) -> Path:
        return self.bin_dir("k8s", K8S_VERSION)

    @property
    def etcd_bin(self) -> Path:
        return self.bin_dir("etcd", ETCD_VERSION) / "etcd"

    @property
    def coredns_bin(self) -> Path:
        return self.bin_dir("coredns", COREDNS_VERSION) / "coredns"

    @property
    def helm_bin(self) -> Path:
        return self.bin_dir("helm", HELM_VERSION) / "helm"

    @property
    def kind_bin(self) -> Path:
        return self.bin_dir("kind", KIND_VERSION) / "kind"

    @property
    def pause_bin(self) -> Path:
        return self.bin_dir("pause", PAUSE_VERSION) / "pause"

    @property
    def kube_router_bin(self) -> Path:
        return self.bin_dir("kube-router", KUBE_ROUTER_VERSION) / "kube-router"

    @property
    def prometheus_bin(self) -> Path:
        return self.bin_dir("prometheus", PROMETHEUS_VERSION) / "prometheus"

    @property
    def kubectl_bin(self) -> Path:
        return self.k8s_bin / "kubectl"

    @property
    def images_cache(self) -> Path:
        return self.cache_dir / "images"

    @property
    def buildah_root(self) -> Path:
        return self.cache_dir / "buildah"

    # ---- per-cluster state (deleted by `down`) ----
    @property
    def pki_dir(self) -> Path:
        return self.state_dir / "pki"

    @property
    def log_dir(self) -> Path:
        return self.state_dir / "logs"

    @property
    def pid_dir(self) -> Path:
        return self.state_dir / "pids"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.state_dir / "admin.kubeconfig"

    @property
    def containerd_dir(self) -> Path:
        return self.state_dir / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_dir / "containerd.sock"

    @property
    def kubelet_root(self) -> Path:
        return self.state_dir / "kubelet"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state_dir / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.state_dir / "cni" / "networks"

    @property
    def volumes_dir(self) -> Path:
        return self.state_dir / "volumes"

    @property
    def tier_file(self) -> Path:
        return self.state_dir / "tier"

    @property
    def snapshot_file(self) -> Path:
        return self.state_dir / "found-state.json"

    @cached_property
    def node_ip(self) -> str:
        """The machine's own uplink address.

        The apiserver must advertise a non-loopback address (it becomes the endpoint of the
        `kubernetes` Service) and the kernel here has no dummy interfaces, so we borrow the uplink's.
        Only the local routing table is consulted; no packet is sent.
        """
        if ip := os.environ.get("SNAKEPIT_NODE_IP"):
            return ip
        addr = subprocess.run(
            ["ip", "-o", "-4", "addr", "show", "dev", self.uplink],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        if "inet" not in addr:
            raise RuntimeError(f"no IPv4 address on {self.uplink}; set SNAKEPIT_NODE_IP")
        return addr[addr.index("inet") + 1].split("/")[0]

    @cached_property
    def uplink(self) -> str:
        """Interface that carries the default route: the fence drops cluster traffic leaving on it."""
        if dev := os.environ.get("SNAKEPIT_UPLINK"):
            return dev
        out = subprocess.run(
            ["ip", "-o", "-4", "route", "show", "default"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.split()
        return out[out.index("dev") + 1] if "dev" in out else "eth0"

    @property
    def server_url(self) -> str:
        return f"https://127.0.0.1:{self.net.apiserver_port}"
