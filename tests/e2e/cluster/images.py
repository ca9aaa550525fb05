"""Images without a registry: debootstrap → buildah → archive → ``ctr images import``.

1. A Debian bookworm root filesystem made by debootstrap (python3, python3-venv, ca-certificates)
   becomes the local base image ``localhost/snakepit/base:dev`` (cached by a key of its recipe).
2. The project's standard Dockerfiles are built by ``buildah bud --build-arg BASE_IMAGE=<base>``
   with the repository root as context, and written as docker archives named
   ``snakepit/<name>:dev`` into the cache (keyed by the Dockerfile and the files it copies).
3. ``ctr -n k8s.io images import`` loads an archive into the node's containerd. containerd stores
   the name normalised, ``docker.io/snakepit/worker:dev``, which is exactly what the kubelet asks
   for when a pod says ``image: snakepit/worker:dev``; so pod specs use the short tag and
   ``imagePullPolicy: Never`` (or IfNotPresent).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import time
from collections.abc import Iterable
from pathlib import Path

from . import build, oci
from .components import PAUSE_IMAGE
from .config import REPO_ROOT, Config
from .run import log, output, run

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("SNAKEPIT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_REVISION = 1  # bump when the base recipe changes
BASE_IMAGE = "localhost/snakepit/base:dev"

# name -> Dockerfile (relative to the repository root, which is the build context)
PROJECT_IMAGES = {
    "worker": "worker_image/Dockerfile",
    "operator": "operator/Dockerfile",
    "redis": "redis_image/Dockerfile",
}
# Files the Python images copy from the context; their content is part of the cache key.
CONTEXT_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "src")


def image_ref(name: str, prefix: str = "snakepit") -> str:
    return f"{prefix}/{name}:dev"


# ---------------------------------------------------------------- containerd side
def ctr_cmd(cfg: Config, *args: str) -> list[str]:
    return ["ctr", "--address", str(cfg.containerd_socket), "--namespace", "k8s.io", *args]


def containerd_images(cfg: Config) -> list[str]:
    out = output(ctr_cmd(cfg, "images", "list", "--quiet"))
    return out.split()


def import_archive(cfg: Config, archive: Path, expect: str) -> None:
    """Import ``archive`` and make sure containerd knows it by ``expect`` (fully qualified)."""
    out = output(ctr_cmd(cfg, "images", "import", "--no-unpack=false", str(archive)))
    names = containerd_images(cfg)
    if expect not in names:
        imported = [line.split()[1] for line in out.splitlines() if line.startswith("unpacking ")]
        if not imported:
            raise RuntimeError(f"importing {archive} gave no image name:\n{out}")
        run(ctr_cmd(cfg, "images", "tag", "--force", imported[0], expect), quiet=True)


def load_pause(cfg: Config) -> None:
    archive = cfg.images_cache / f"pause-{build.COMPONENTS['pause'].version}.tar"
    if not archive.exists():
        oci.single_binary_image(cfg.pause_bin, archive, PAUSE_IMAGE, "/pause")
    import_archive(cfg, archive, PAUSE_IMAGE)


def stray_processes(cfg: Config) -> dict[str, int]:
    """Processes outside our PID files that still belong to the cluster (containerd shims)."""
    marks = (str(cfg.containerd_socket), str(cfg.containerd_dir))
    found: dict[str, int] = {}
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmdline for m in marks):
            found[f"{cmdline.split()[0]}:{proc.name}"] = int(proc.name)
    return found


def kill_strays(cfg: Config) -> None:
    for name, pid in stray_processes(cfg).items():
        log(f"killing leftover {name}")
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---------------------------------------------------------------- buildah side
def buildah_cmd(cfg: Config, *args: str) -> list[str]:
    """buildah with its storage in the cache, so images survive clusters and stay off /var/lib."""
    root = cfg.buildah_root
    return ["buildah", "--root", str(root / "storage"), "--runroot", str(root / "run"),
            "--storage-driver", "overlay", *args]


def _tree_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for top in paths:
        if not top.exists():
            h.update(f"missing:{top.name}".encode())
            continue
        files = [top] if top.is_file() else sorted(
            p for p in top.rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
        for f in files:
            h.update(str(f.relative_to(REPO_ROOT)).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def base_key() -> str:
    material = json.dumps([BASE_REVISION, DEBIAN_SUITE, DEBIAN_MIRROR, BASE_PACKAGES])
    return hashlib.sha256(material.encode()).hexdigest()[:12]


def _buildah_has(cfg: Config, ref: str) -> bool:
    return run(buildah_cmd(cfg, "inspect", "--type", "image", ref), check=False,
               quiet=True).returncode == 0


def ensure_base(cfg: Config) -> float:
    """Make the debootstrap base image unless it exists for the current recipe key."""
    key = base_key()
    keyed = f"localhost/snakepit/base:{key}"
    if _buildah_has(cfg, keyed):
        run(buildah_cmd(cfg, "tag", keyed, BASE_IMAGE), quiet=True)
        return 0.0
    if not shutil.which("debootstrap") or not shutil.which("buildah"):
        raise RuntimeError("debootstrap and buildah are needed to build images "
                           "(apt-get install debootstrap buildah)")
    begin = time.monotonic()
    rootfs_tar = cfg.images_cache / f"base-{DEBIAN_SUITE}-{key}.tar"
    if not rootfs_tar.exists():
        work = cfg.images_cache / f"base-{key}.rootfs"
        shutil.rmtree(work, ignore_errors=True)
        log(f"debootstrap {DEBIAN_SUITE} ({', '.join(BASE_PACKAGES)}) from {DEBIAN_MIRROR}")
        run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}",
             DEBIAN_SUITE, work, DEBIAN_MIRROR], quiet=True)
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists", "var/log"):
            for p in (work / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tmp = rootfs_tar.with_suffix(".tmp")
        run(["tar", "--numeric-owner", "-C", work, "-cf", tmp, "."])
        os.replace(tmp, rootfs_tar)
        shutil.rmtree(work, ignore_errors=True)
    ctr = output(buildah_cmd(cfg, "from", "scratch")).strip()
    try:
        run(buildah_cmd(cfg, "add", ctr, str(rootfs_tar), "/"), quiet=True)
        run(buildah_cmd(cfg, "config", "--env", "LANG=C.UTF-8", "--env",
                        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "--cmd", "/bin/bash", ctr), quiet=True)
        run(buildah_cmd(cfg, "commit", "--rm", ctr, keyed), quiet=True)
    except Exception:
        run(buildah_cmd(cfg, "rm", ctr), check=False, quiet=True)
        raise
    run(buildah_cmd(cfg, "tag", keyed, BASE_IMAGE), quiet=True)
    return time.monotonic() - begin


def image_key(name: str) -> str:
    dockerfile = REPO_ROOT / PROJECT_IMAGES[name]
    inputs = [dockerfile] if name == "redis" else [dockerfile, *(REPO_ROOT / p for p in CONTEXT_INPUTS)]
    return hashlib.sha256((base_key() + _tree_digest(inputs)).encode()).hexdigest()[:16]


def archive_path(cfg: Config, name: str) -> Path:
    return cfg.images_cache / f"{name}-{image_key(name)}.tar"


def build_image(cfg: Config, name: str) -> float:
    """Build one project image into a docker archive in the cache, unless it is there already."""
    archive = archive_path(cfg, name)
    if archive.exists():
        return 0.0
    ensure_base(cfg)
    begin = time.monotonic()
    local = f"localhost/snakepit/{name}:dev"
    log(f"building {image_ref(name)} from {PROJECT_IMAGES[name]}")
    run(buildah_cmd(cfg, "bud", "--isolation", "chroot", "--layers",
                    "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
                    "-f", str(REPO_ROOT / PROJECT_IMAGES[name]), "-t", local, str(REPO_ROOT)),
        quiet=True)
    for old in cfg.images_cache.glob(f"{name}-*.tar"):
        old.unlink()
    tmp = archive.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    run(buildah_cmd(cfg, "push", local, f"docker-archive:{tmp}:{image_ref(name)}"), quiet=True)
    os.replace(tmp, archive)
    seconds = time.monotonic() - begin
    log(f"built {image_ref(name)} in {seconds:.0f}s ({archive.stat().st_size >> 20} MiB)")
    return seconds


def build_images(cfg: Config, names: Iterable[str] = tuple(PROJECT_IMAGES)) -> dict[str, float]:
    timings: dict[str, float] = {}
    with build.cache_lock(cfg):
        cfg.images_cache.mkdir(parents=True, exist_ok=True)
        timings["base"] = ensure_base(cfg)
        for name in names:
            timings[name] = build_image(cfg, name)
    (cfg.images_cache / "last-build-timings.json").write_text(json.dumps(timings, indent=1))
    return timings


def load_images(cfg: Config, names: Iterable[str] = tuple(PROJECT_IMAGES)) -> float:
    begin = time.monotonic()
    for name in names:
        import_archive(cfg, archive_path(cfg, name), f"docker.io/{image_ref(name)}")
    return time.monotonic() - begin
