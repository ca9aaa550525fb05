"""A kind node image made on this machine, without a registry and without ``kind build``.

``kind build node-image`` always pulls its base image and the etcd, CoreDNS, pause, kindnetd and
storage images, so it cannot work here. What kind needs of a node image is small (read from kind's
own source, ``pkg/cluster``): systemd as PID 1 behind an entrypoint that prepares the container,
containerd with the CRI plugin on ``/run/containerd/containerd.sock``, ``kubeadm``/``kubelet``/
``kubectl`` on the PATH with a kubelet unit that runs what kubeadm writes, ``/kind/version``, an
optional ``/kind/manifests/default-storage.yaml``, and every image kubeadm will run already in
containerd's ``k8s.io`` namespace under the exact name kubeadm asks for.

So the image is:

1. a Debian bookworm root filesystem from debootstrap with systemd, Debian's containerd 1.6 and
   runc, the CNI plugins, iptables/nftables, conntrack and iproute2 (cached as a tarball by a key
   of its recipe);
2. this project's own node files (``localkube/kind/node/``): entrypoint, containerd config (CRI,
   systemd cgroups, ``restrict_oom_score_adj``, runc behind ``runcwrap``), kubelet unit, storage
   class; units that would write kernel-global settings from inside the container
   (``systemd-sysctl``, ``systemd-binfmt``, ``systemd-modules-load``) masked;
3. the binaries built here (``localkube/build.py``): kubeadm, kubelet, kubectl, runcwrap;
4. the control-plane images, each written by hand as an OCI archive (``oci.py``) around a binary
   built here, and imported (not unpacked: the CRI plugin unpacks on first use) into the image's
   ``/var/lib/containerd`` by a containerd run on the host against that folder. The names are
   the ones ``kubeadm config images list`` prints for v1.34.4 (checked at build time), so kubeadm
   and kind need no image settings. Two of them hold a different version than their tag says:
   etcd (tag ``3.6.5-0``, binary v3.6.16) and CoreDNS (tag ``v1.12.1``, binary v1.14.7) — the
   versions this project builds for the local provider.

The result is a tarball in the cache (``kind-node-v1.34.4-<key>.tar``; ``build --provider kind``
needs no engine), ``docker import``ed as ``snakepit/kind-node:v1.34.4-<key>`` by ``up`` when the
engine lacks it. The key covers every input, so an unchanged recipe builds nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .. import build, oci
from .. import config as C
from ..config import Config
from ..images import DEBIAN_MIRROR, DEBIAN_SUITE, debootstrap_tarball
from ..procs import log_tail, start, stop, wait_ready
from ..run import log, output, run
from .engine import Engine
from .settings import KindConfig

NODE_REVISION = 1  # bump when the way the image is put together changes
NODE_FILES = C.PACKAGE_DIR / "kind" / "node"
NODE_PACKAGES = (
    "systemd",
    "containerd",
    "runc",
    "containernetworking-plugins",
    "iptables",
    "nftables",
    "conntrack",
    "iproute2",
    "ethtool",
    "util-linux",
    "mount",
    "kmod",
    "libseccomp2",
    "ca-certificates",
    "procps",
    "socat",
    "bash",
)
# kube-proxy (iptables mode) runs iptables-restore and conntrack inside its own container.
PROXY_PACKAGES = ("iptables", "conntrack")
TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/log")
# Units that would reach outside the container (kernel-global sysctls, binfmt, modules) or
# need a terminal.
MASKED_UNITS = (
    "systemd-sysctl.service",
    "systemd-binfmt.service",
    "systemd-modules-load.service",
    "getty.target",
    "getty@.service",
    "console-getty.service",
    "e2scrub_reap.service",
    "e2scrub_all.timer",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "fstrim.timer",
)
REPOSITORY = "snakepit/kind-node"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def _files_digest() -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in NODE_FILES.rglob("*") if p.is_file()):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def rootfs_key(packages: tuple[str, ...]) -> str:
    return _digest(NODE_REVISION, DEBIAN_SUITE, DEBIAN_MIRROR, packages, TRIM)


def ensure_rootfs(cfg: Config, name: str, packages: tuple[str, ...]) -> tuple[Path, float]:
    """A debootstrap root filesystem as a tarball in the cache (made once per recipe)."""
    key = rootfs_key(packages)
    tarball = cfg.images_cache / f"kind-{name}-rootfs-{key}.tar"
    if tarball.exists():
        return tarball, 0.0
    if not shutil.which("debootstrap"):
        raise RuntimeError("debootstrap is needed to build the kind node image")
    begin = time.monotonic()
    log(f"debootstrap {DEBIAN_SUITE} for the kind {name} image ({len(packages)} packages)")
    debootstrap_tarball(tarball, packages, TRIM, stale=f"kind-{name}-rootfs-*.tar")
    return tarball, time.monotonic() - begin


def kubeadm_images(cfg: Config) -> dict[str, str]:
    """{short name: full reference} of the images kubeadm v1.34.4 runs, from kubeadm itself."""
    kubeadm = cfg.bin_dir("kubeadm", C.K8S_VERSION) / "kubeadm"
    refs = output(
        [kubeadm, "config", "images", "list", f"--kubernetes-version={C.K8S_VERSION}"]
    ).split()
    return {ref.rsplit("/", 1)[1].split(":")[0]: ref for ref in refs}


def _binaries(cfg: Config) -> dict[str, Path]:
    k8s = cfg.k8s_bin
    return {
        "kube-apiserver": k8s / "kube-apiserver",
        "kube-controller-manager": k8s / "kube-controller-manager",
        "kube-scheduler": k8s / "kube-scheduler",
        "kube-proxy": k8s / "kube-proxy",
        "kubelet": k8s / "kubelet",
        "kubectl": k8s / "kubectl",
        "kubeadm": cfg.bin_dir("kubeadm", C.K8S_VERSION) / "kubeadm",
        "etcd": cfg.etcd_bin,
        "coredns": cfg.coredns_bin,
        "pause": cfg.pause_bin,
        "runcwrap": cfg.bin_dir("runcwrap", C.RUNCWRAP_VERSION) / "runcwrap",
    }


NODE_COMPONENTS = ("k8s", "kubeadm", "etcd", "coredns", "pause", "runcwrap")


def image_key(cfg: Config) -> str:
    recipes = [build.recipe_key(build.COMPONENTS[c]) for c in NODE_COMPONENTS]
    return _digest(
        NODE_REVISION,
        rootfs_key(NODE_PACKAGES),
        rootfs_key(PROXY_PACKAGES),
        _files_digest(),
        recipes,
        MASKED_UNITS,
    )


def image_ref(cfg: Config) -> str:
    return f"{REPOSITORY}:{C.K8S_VERSION}-{image_key(cfg)}"


def _docker(engine: Engine, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["docker", *args], capture_output=True, text=True, env=engine.env, check=False, **kw
    )  # type: ignore[call-overload]


def has_image(engine: Engine, ref: str) -> bool:
    return _docker(engine, "image", "inspect", ref).returncode == 0


def _control_plane_archives(cfg: Config, work: Path, proxy_rootfs: Path) -> dict[str, Path]:
    """OCI archives of the images kubeadm runs, named as kubeadm asks."""
    refs = kubeadm_images(cfg)
    bins = _binaries(cfg)
    where = {
        "kube-apiserver": "/usr/local/bin/kube-apiserver",
        "kube-controller-manager": "/usr/local/bin/kube-controller-manager",
        "kube-scheduler": "/usr/local/bin/kube-scheduler",
        "etcd": "/usr/local/bin/etcd",
        "coredns": "/coredns",
        "pause": "/pause",
        "kube-proxy": "/usr/local/bin/kube-proxy",
    }
    if sorted(refs) != sorted(where):
        raise RuntimeError(f"kubeadm {C.K8S_VERSION} asks for other images than expected: {refs}")
    archives = {}
    for name, ref in refs.items():
        layer = oci.binary_layer(bins[name], work / f"{name}.layer.tar", where[name])
        layers = [proxy_rootfs, layer] if name == "kube-proxy" else [layer]
        entry = [where[name]]
        archives[ref] = oci.layered_image(
            layers, work / f"{name}.oci.tar", ref, entrypoint=entry, env=[PATH_ENV]
        )
        layer.unlink()
    return archives


def _install(src: Path, dest: Path, mode: int = 0o644) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    dest.chmod(mode)


def _compose_rootfs(cfg: Config, root: Path) -> None:
    bins = _binaries(cfg)
    for name in ("kubeadm", "kubelet", "kubectl"):
        _install(bins[name], root / "usr/bin" / name, 0o755)
    _install(bins["runcwrap"], root / "usr/local/bin/runcwrap", 0o755)
    _install(NODE_FILES / "entrypoint", root / "usr/local/bin/entrypoint", 0o755)
    _install(NODE_FILES / "containerd.toml", root / "etc/containerd/config.toml")
    systemd = root / "etc/systemd/system"
    _install(NODE_FILES / "kubelet.service", systemd / "kubelet.service")
    _install(NODE_FILES / "kubelet.slice", systemd / "kubelet.slice")
    _install(NODE_FILES / "kubelet.default", root / "etc/default/kubelet")
    _install(NODE_FILES / "default-storage.yaml", root / "kind/manifests/default-storage.yaml")
    wants = systemd / "multi-user.target.wants"
    wants.mkdir(parents=True, exist_ok=True)
    (wants / "kubelet.service").unlink(missing_ok=True)
    (wants / "kubelet.service").symlink_to("/etc/systemd/system/kubelet.service")
    for unit in MASKED_UNITS:
        target = systemd / unit
        target.unlink(missing_ok=True)
        target.symlink_to("/dev/null")
    for folder in (
        "etc/systemd/system/getty.target.wants",
        "etc/systemd/system/timers.target.wants",
    ):
        shutil.rmtree(root / folder, ignore_errors=True)
    (wants / "e2scrub_reap.service").unlink(missing_ok=True)
    # No sysctl file at all: every one of them names kernel-global settings.
    for folder in ("etc/sysctl.d", "usr/lib/sysctl.d"):
        for f in (root / folder).glob("*.conf"):
            f.unlink()
    journald = root / "etc/systemd/journald.conf.d/snakepit.conf"
    journald.parent.mkdir(parents=True, exist_ok=True)
    journald.write_text("[Journal]\n# The kernel log is the host's.\nReadKMsg=no\n")
    init = root / "sbin/init"
    init.unlink(missing_ok=True)
    init.symlink_to("/lib/systemd/systemd")
    (root / "etc/kubernetes/manifests").mkdir(parents=True, exist_ok=True)
    (root / "kind/version").write_text(C.K8S_VERSION + "\n")
    (root / "etc/machine-id").write_text("")


def _preload_images(cfg: Config, root: Path, archives: dict[str, Path]) -> None:
    """Import the archives into the image's own /var/lib/containerd with a containerd run here
    (content only: no snapshot is unpacked, so nothing depends on the host's overlay mounts)."""
    state = Path("/run/snakepit-nodeimage")
    shutil.rmtree(state, ignore_errors=True)
    sock = state / "containerd.sock"
    conf = state / "config.toml"
    state.mkdir(parents=True)
    # PID and log files of this containerd live here too, never in a cluster's state dir.
    cfg = Config(cache_dir=cfg.cache_dir, state_dir=state)
    conf.write_text(
        "version = 2\n"
        f'root = "{root / "var/lib/containerd"}"\n'
        f'state = "{state / "state"}"\n'
        'disabled_plugins = ["io.containerd.grpc.v1.cri"]\n'
        f'[grpc]\n  address = "{sock}"\n'
    )
    name = "nodeimage-containerd"
    start(cfg, name, ["containerd", "--config", conf], {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    try:
        ctr = ["ctr", "--address", str(sock), "--namespace", "k8s.io"]
        wait_ready(
            cfg,
            name,
            lambda: run([*ctr, "version"], quiet=True, check=False).returncode == 0,
            30,
        )
        for ref, archive in archives.items():
            run([*ctr, "images", "import", "--no-unpack", archive], quiet=True)
            if ref not in output([*ctr, "images", "list", "--quiet"]).split():
                raise RuntimeError(f"importing {archive} did not give {ref}")
            # Never garbage-collected by the kubelet (kind pins its images the same way).
            run([*ctr, "images", "label", ref, "io.cri-containerd.pinned=pinned"], quiet=True)
    except Exception:
        log(f"containerd for the image import, last lines:\n{log_tail(cfg, name)}")
        raise
    finally:
        stop(cfg, name)
        shutil.rmtree(state, ignore_errors=True)


def node_tarball(cfg: Config) -> Path:
    return cfg.images_cache / f"kind-node-{C.K8S_VERSION}-{image_key(cfg)}.tar"


def missing(cfg: Config) -> list[str]:
    """What ``build --provider kind`` would still have to build: binaries, then the node image
    (empty when the cache is warm)."""
    names = dict.fromkeys((*build.LOCAL_COMPONENTS, *NODE_COMPONENTS))
    absent = [n for n in names if not build.is_built(cfg, build.COMPONENTS[n])]
    if absent or not node_tarball(cfg).exists():
        absent.append("node image")
    return absent


def build_node_tarball(cfg: Config) -> tuple[Path, dict[str, float]]:
    """The node image's root filesystem as a tarball in the cache (no engine needed); built
    once per key."""
    timings: dict[str, float] = {}
    begin = time.monotonic()
    timings["binaries"] = sum(build.ensure_all(cfg, NODE_COMPONENTS).values())
    tarball = node_tarball(cfg)
    if tarball.exists():
        return tarball, {"total": 0.0}
    with build.cache_lock(cfg):
        if tarball.exists():
            return tarball, {"total": 0.0}
        cfg.images_cache.mkdir(parents=True, exist_ok=True)
        # Both debootstraps at once: they wait on the mirror and dpkg more than on the CPU.
        t = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            node_job = pool.submit(ensure_rootfs, cfg, "node", NODE_PACKAGES)
            proxy_job = pool.submit(ensure_rootfs, cfg, "proxy", PROXY_PACKAGES)
            node_rootfs, proxy_rootfs = node_job.result()[0], proxy_job.result()[0]
        timings["rootfs"] = time.monotonic() - t
        t = time.monotonic()
        work = cfg.images_cache / "kind-node.work"
        shutil.rmtree(work, ignore_errors=True)
        root = work / "rootfs"
        root.mkdir(parents=True)
        run(["tar", "--numeric-owner", "-C", root, "-xf", node_rootfs])
        _compose_rootfs(cfg, root)
        archives = _control_plane_archives(cfg, work, proxy_rootfs)
        _preload_images(cfg, root, archives)
        tmp = tarball.with_suffix(".tmp")
        run(["tar", "--numeric-owner", "--xattrs", "-C", root, "-cf", tmp, "."])
        for old in cfg.images_cache.glob("kind-node-v*.tar"):
            old.unlink()
        tmp.replace(tarball)
        shutil.rmtree(work, ignore_errors=True)
        timings["compose"] = time.monotonic() - t
    timings["total"] = time.monotonic() - begin
    (cfg.images_cache / "kind-node-build.json").write_text(
        json.dumps({"tarball": tarball.name, "timings": timings}, indent=1) + "\n"
    )
    log(f"built {tarball.name}: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return tarball, timings


def ensure_node_image(kcfg: KindConfig, engine: Engine) -> tuple[str, dict[str, float]]:
    """The node image in the engine (built and imported unless there); its ref and timings."""
    cfg = kcfg.cfg
    ref = image_ref(cfg)
    tarball, timings = build_node_tarball(cfg)
    if has_image(engine, ref):
        return ref, timings
    t = time.monotonic()
    log(f"importing {ref} into the engine")
    rootfs_ref = f"{ref}-rootfs"
    with tarball.open("rb") as fh:
        imported = subprocess.run(
            ["docker", "import", "-", rootfs_ref],
            stdin=fh,
            capture_output=True,
            text=True,
            env=engine.env,
            check=False,
        )
    if imported.returncode != 0:
        raise RuntimeError(f"docker import of the node image failed: {imported.stderr}")
    # `docker import --change` cannot set STOPSIGNAL: one build step, no context, no registry.
    # systemd as PID 1 shuts down cleanly on SIGRTMIN+3 (SIGTERM would make it re-execute).
    dockerfile = (
        f"FROM {rootfs_ref}\n"
        "ENV container=docker\n"
        "STOPSIGNAL SIGRTMIN+3\n"
        'ENTRYPOINT ["/usr/local/bin/entrypoint", "/sbin/init"]\n'
    )
    built = _docker(engine, "build", "--network=none", "-t", ref, "-", input=dockerfile)
    if built.returncode != 0:
        raise RuntimeError(f"docker build of the node image failed: {built.stderr}")
    _docker(engine, "rmi", rootfs_ref)
    timings["import"] = time.monotonic() - t
    _prune_old_images(engine, ref)
    return ref, timings


def _prune_old_images(engine: Engine, keep: str) -> None:
    listing = _docker(engine, "images", REPOSITORY, "--format", "{{.Repository}}:{{.Tag}}")
    old = [r for r in listing.stdout.split() if r != keep]
    if old:
        _docker(engine, "rmi", *old)
