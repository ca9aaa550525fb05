"""Command lines and configuration files of every cluster component.

Only data lives here (argv lists and config text); starting, waiting and stopping is in
``cluster.py``. Choices that matter are explained where they are made.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from . import config as C
from .config import Config
from .pki import kubeconfig_path
from .run import write_file

PAUSE_IMAGE = "localhost/snakepit/pause:3.10"
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def component_env(cfg: Config) -> dict[str, str]:
    """containerd finds runc and its shim, the kubelet finds iptables/mount, from here."""
    return {"PATH": f"{cfg.k8s_bin}:{SYSTEM_PATH}", "HOME": "/root"}


# ---------------------------------------------------------------- control plane
def etcd(cfg: Config) -> list[str]:
    n = cfg.net
    client, peer = f"http://127.0.0.1:{n.etcd_client_port}", f"http://127.0.0.1:{n.etcd_peer_port}"
    return [
        str(cfg.etcd_bin),
        "--name=snakepit",
        f"--data-dir={cfg.state_dir / 'etcd'}",
        f"--listen-client-urls={client}",
        f"--advertise-client-urls={client}",
        f"--listen-peer-urls={peer}",
        f"--initial-advertise-peer-urls={peer}",
        f"--initial-cluster=snakepit={peer}",
        "--initial-cluster-state=new",
        # A throw-away test cluster: durability is not worth the fsync latency on a small VM.
        "--unsafe-no-fsync=true",
        "--log-level=warn",
    ]


def apiserver(cfg: Config) -> list[str]:
    pki, n = cfg.pki_dir, cfg.net
    return [
        str(cfg.k8s_bin / "kube-apiserver"),
        # Must be non-loopback: it becomes the `kubernetes` Service's endpoint for pods.
        f"--advertise-address={cfg.node_ip}",
        f"--secure-port={n.apiserver_port}",
        f"--etcd-servers=http://127.0.0.1:{n.etcd_client_port}",
        f"--tls-cert-file={pki / 'apiserver.crt'}",
        f"--tls-private-key-file={pki / 'apiserver.key'}",
        f"--client-ca-file={pki / 'ca.crt'}",
        f"--kubelet-client-certificate={pki / 'apiserver-kubelet-client.crt'}",
        f"--kubelet-client-key={pki / 'apiserver-kubelet-client.key'}",
        f"--kubelet-certificate-authority={pki / 'ca.crt'}",
        "--kubelet-preferred-address-types=InternalIP",
        f"--service-account-key-file={pki / 'sa.pub'}",
        f"--service-account-signing-key-file={pki / 'sa.key'}",
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
        f"--service-cluster-ip-range={n.service_cidr}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        "--allow-privileged=true",
        "--profiling=false",
        "--v=1",
    ]


def controller_manager(cfg: Config) -> list[str]:
    pki, n = cfg.pki_dir, cfg.net
    kc = kubeconfig_path(cfg, "controller-manager")
    return [
        str(cfg.k8s_bin / "kube-controller-manager"),
        f"--kubeconfig={kc}",
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",  # one instance; skips the lease wait at start
        "--use-service-account-credentials=true",
        f"--root-ca-file={pki / 'ca.crt'}",
        f"--service-account-private-key-file={pki / 'sa.key'}",
        f"--cluster-signing-cert-file={pki / 'ca.crt'}",
        f"--cluster-signing-key-file={pki / 'ca.key'}",
        # The single node gets pod_cidr, the subnet the CNI conflist names.
        "--allocate-node-cidrs=true",
        f"--cluster-cidr={n.cluster_cidr}",
        "--node-cidr-mask-size=24",
        f"--service-cluster-ip-range={n.service_cidr}",
        "--profiling=false",
        "--v=1",
    ]


def scheduler(cfg: Config) -> list[str]:
    kc = kubeconfig_path(cfg, "scheduler")
    return [
        str(cfg.k8s_bin / "kube-scheduler"),
        f"--kubeconfig={kc}",
        f"--authentication-kubeconfig={kc}",
        f"--authorization-kubeconfig={kc}",
        "--bind-address=127.0.0.1",
        "--leader-elect=false",
        "--profiling=false",
        "--v=1",
    ]


# ---------------------------------------------------------------- node
def containerd_config(cfg: Config) -> Path:
    d = cfg.containerd_dir
    text = f"""# Written by localkube (snakepit local cluster). containerd 1.6, config version 2.
version = 2
root = "{d / "root"}"
state = "{d / "state"}"
oom_score = 0
disabled_plugins = [
  "io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs",
]

[grpc]
  address = "{cfg.containerd_socket}"

[ttrpc]
  address = "{cfg.containerd_socket}.ttrpc"

[metrics]
  address = ""

[plugins."io.containerd.internal.v1.opt"]
  path = "{d / "opt"}"

[plugins."io.containerd.grpc.v1.cri"]
  # The pause image is built here and imported before the kubelet starts; never pulled.
  sandbox_image = "{PAUSE_IMAGE}"
  # The VM lacks CAP_SYS_RESOURCE: negative oom_score_adj values cannot be written, and without
  # this every pod sandbox fails to start.
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "{cfg.cni_conf_dir}"
    max_conf_num = 1
"""
    return write_file(d / "config.toml", text)


def cni_conflist(cfg: Config) -> Path:
    """One conflist only: containerd 1.6 loads the first file of its conf dir."""
    n = cfg.net
    conf = {
        "cniVersion": "0.4.0",
        "name": n.cni_network_name,
        "plugins": [
            {
                "type": "bridge",
                "bridge": n.bridge,
                "isGateway": True,
                # Pods never talk to the outside (the fence drops it); kube-proxy masquerades
                # Service traffic itself, so no per-pod NAT chains are needed.
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": n.pod_cidr}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                    "dataDir": str(cfg.cni_ipam_dir),
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    return write_file(cfg.cni_conf_dir / "10-snakepit.conflist", json.dumps(conf, indent=2))


def containerd(cfg: Config) -> list[str]:
    return ["/usr/bin/containerd", f"--config={containerd_config(cfg)}", "--log-level=warn"]


def kubelet_config(cfg: Config) -> Path:
    pki, n = cfg.pki_dir, cfg.net
    conf = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": cfg.node_ip,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "Webhook"},
        "tlsCertFile": str(pki / "kubelet-serving.crt"),
        "tlsPrivateKeyFile": str(pki / "kubelet-serving.key"),
        "containerRuntimeEndpoint": f"unix://{cfg.containerd_socket}",
        "cgroupDriver": "cgroupfs",  # no systemd on this machine
        "failCgroupV1": False,  # cgroups are v1 here
        "clusterDNS": [n.dns_service_ip],
        "clusterDomain": "cluster.local",
        # Empty: pods with dnsPolicy Default get no upstream resolver, so nothing leaves the host.
        "resolvConf": "",
        "podLogsDir": str(cfg.state_dir / "pod-logs"),
        "healthzBindAddress": "127.0.0.1",
        "readOnlyPort": 0,
        "failSwapOn": False,
        "rotateCertificates": False,
        "serverTLSBootstrap": False,
        # Images are imported, never pulled: image GC must not delete them.
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
            "nodefs.inodesFree": "1%",
        },
        # Node Ready a few seconds sooner than the 10 s default.
        "nodeStatusUpdateFrequency": "4s",
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "staticPodPath": "",
        "protectKernelDefaults": False,  # it rewrites a few sysctls; `down` restores them
        "serializeImagePulls": False,
        "maxPods": 110,
    }
    return write_file(cfg.state_dir / "kubelet-config.yaml", json.dumps(conf, indent=2))


def kubelet(cfg: Config) -> list[str]:
    return [
        str(cfg.k8s_bin / "kubelet"),
        f"--config={kubelet_config(cfg)}",
        f"--kubeconfig={kubeconfig_path(cfg, 'kubelet')}",
        f"--root-dir={cfg.kubelet_root}",
        f"--node-ip={cfg.node_ip}",
        f"--hostname-override={cfg.node_name}",
        "--v=1",
    ]


def kube_proxy_config(cfg: Config) -> Path:
    n = cfg.net
    conf = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig_path(cfg, "kube-proxy"))},
        "mode": "iptables",  # no IPVS in this kernel
        "clusterCIDR": n.cluster_cidr,
        "hostnameOverride": cfg.node_name,
        "bindAddress": "0.0.0.0",
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        # Zeroes mean "leave the kernel's conntrack settings alone".
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
            "udpTimeout": "0s",
            "udpStreamTimeout": "0s",
        },
        # localhostNodePorts would flip net.ipv4.conf.all.route_localnet.
        "iptables": {
            "localhostNodePorts": False,
            "masqueradeAll": False,
            "syncPeriod": "30s",
            "minSyncPeriod": "0s",
        },
    }
    return write_file(cfg.state_dir / "kube-proxy-config.yaml", json.dumps(conf, indent=2))


def kube_proxy(cfg: Config) -> list[str]:
    return [str(cfg.k8s_bin / "kube-proxy"), f"--config={kube_proxy_config(cfg)}", "--v=1"]


def corefile(cfg: Config) -> Path:
    """Two listeners with one zone: node IP port 53 for pods (via the kube-dns Service), and
    127.0.0.1 on ``coredns_port`` for the host. Health and readiness are served once."""
    n = cfg.net
    zone = f"""    errors
    kubernetes cluster.local in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig_path(cfg, "coredns")} snakepit-local
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
        ttl 5
    }}
    cache 5
    loadbalance
"""
    text = f""".:{n.dns_node_port} {{
    bind {cfg.node_ip}
    health 127.0.0.1:18080
    ready 127.0.0.1:18181
{zone}}}
.:{n.coredns_port} {{
    bind 127.0.0.1
{zone}}}
"""
    # No `forward` plugin: names outside the cluster are never sent to another resolver.
    return write_file(cfg.state_dir / "Corefile", text)


def coredns(cfg: Config) -> list[str]:
    return [str(cfg.coredns_bin), "-conf", str(corefile(cfg))]


def kube_router(cfg: Config) -> list[str]:
    """The NetworkPolicy engine: kube-router's firewall controller alone, as a host process.

    It writes iptables chains (KUBE-ROUTER-*, KUBE-POD-FW-*, KUBE-NWPLCY-*) and ipsets (KUBE-SRC-*,
    KUBE-DST-*) that match pod traffic on the CNI bridge (br_netfilter is on) and to the host.
    Its BGP router and service proxy, where its published advisories are, stay off; kube-proxy
    keeps serving Services.
    """
    return [
        str(cfg.kube_router_bin),
        f"--kubeconfig={kubeconfig_path(cfg, 'kube-router')}",
        f"--hostname-override={cfg.node_name}",
        "--run-firewall=true",
        "--run-router=false",
        "--run-service-proxy=false",
        "--run-loadbalancer=false",
        "--enable-ipv4=true",
        "--enable-ipv6=false",
        f"--service-cluster-ip-range={cfg.net.service_cidr}",
        f"--health-port={cfg.net.kube_router_health_port}",
        "--metrics-port=0",
        "--v=1",
    ]


def provisioner(cfg: Config) -> list[str]:
    # --state-dir also makes the process recognisable as this cluster's from its argv.
    return [
        sys.executable,
        "-m",
        "localkube.provisioner",
        "--state-dir",
        str(cfg.state_dir),
    ]


def provisioner_env(cfg: Config) -> dict[str, str]:
    return {
        **component_env(cfg),
        "PYTHONPATH": str(C.REPO_ROOT),
        "SNAKEPIT_CACHE": str(cfg.cache_dir),
        "SNAKEPIT_CLUSTER_DIR": str(cfg.state_dir),
        "SNAKEPIT_NODE_NAME": cfg.node_name,
    }
