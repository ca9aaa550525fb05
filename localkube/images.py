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

import contextlib
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import tomllib
from collections.abc import Iterable
from pathlib import Path

from . import build, oci, procs
from .components import PAUSE_IMAGE
from .config import REPO_ROOT, Config
from .run import log, output, run

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = os.environ.get("SNAKEPIT_DEBIAN_MIRROR", "http://deb.debian.org/debian")
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates")
BASE_REVISION = 2  # bump when the base recipe changes
# Trimmed from the debootstrap tree: documentation and translations no container reads.
BASE_TRIM = (
    "usr/share/doc",
    "usr/share/man",
    "usr/share/info",
    "usr/share/locale",
    "var/cache/apt/archives",
    "var/lib/apt/lists",
    "var/log",
)
BASE_IMAGE = "localhost/snakepit/base:dev"

# name -> Dockerfile (relative to the repository root, which is the build context)
PROJECT_IMAGES = {
    "worker": "worker_image/Dockerfile",
    "operator": "operator/Dockerfile",
    "redis": "redis_image/Dockerfile",
}
# Files the Python images copy from the context; their content is part of the cache key.
CONTEXT_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "src")
# Wheels for Debian bookworm's CPython (3.11.2; environment markers such as redis's
# `python_full_version < "3.11.3"` depend on the patch level) and glibc 2.36.
BASE_PYTHON = "3.11.2"
# `pip download` evaluates environment markers with the host's interpreter, not --python-version,
# so requirements that only apply to the base's older patch release are named here.
MARKER_ONLY_REQUIREMENTS = ("async-timeout>=4.0.3",)
WHEEL_PLATFORMS = (
    "manylinux_2_36_x86_64",
    "manylinux_2_35_x86_64",
    "manylinux_2_34_x86_64",
    "manylinux_2_31_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
    "manylinux2010_x86_64",
    "linux_x86_64",
)


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
    return procs.mentioning((str(cfg.containerd_socket), str(cfg.containerd_dir)))


def kill_strays(cfg: Config) -> None:
    for name, pid in stray_processes(cfg).items():
        log(f"killing leftover {name}")
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# ---------------------------------------------------------------- buildah side
def buildah_cmd(cfg: Config, *args: str) -> list[str]:
    """buildah with its storage in the cache, so images survive clusters and stay off /var/lib."""
    root = cfg.buildah_root
    return [
        "buildah",
        "--root",
        str(root / "storage"),
        "--runroot",
        str(root / "run"),
        "--storage-driver",
        "overlay",
        *args,
    ]


def _tree_digest(paths: Iterable[Path]) -> str:
    h = hashlib.sha256()
    for top in paths:
        if not top.exists():
            h.update(f"missing:{top.name}".encode())
            continue
        files = (
            [top]
            if top.is_file()
            else sorted(
                p
                for p in top.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            )
        )
        for f in files:
            h.update(str(f.relative_to(REPO_ROOT)).encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def base_key() -> str:
    material = json.dumps([BASE_REVISION, DEBIAN_SUITE, DEBIAN_MIRROR, BASE_PACKAGES, BASE_TRIM])
    return hashlib.sha256(material.encode()).hexdigest()[:12]


def debootstrap_tarball(
    tarball: Path, packages: Iterable[str], trim: Iterable[str], stale: str
) -> None:
    """A minimal Debian root filesystem as a tarball: the contents of the ``trim`` folders and
    the downloaded packages removed, older tarballs of the same recipe (glob ``stale`` next to
    it) replaced. Made in a work folder next to it, so a failed run leaves no tarball."""
    work = tarball.with_suffix(".work")
    shutil.rmtree(work, ignore_errors=True)
    run(
        [
            "debootstrap",
            "--variant=minbase",
            f"--include={','.join(packages)}",
            DEBIAN_SUITE,
            work,
            DEBIAN_MIRROR,
        ],
        quiet=True,
    )
    for junk in trim:
        for p in (work / junk).glob("*"):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    for p in (work / "var/cache/apt/archives").glob("*.deb"):
        p.unlink()
    tmp = tarball.with_suffix(".tmp")
    run(["tar", "--numeric-owner", "-C", work, "-cf", tmp, "."])
    for old in tarball.parent.glob(stale):
        old.unlink()
    tmp.replace(tarball)
    shutil.rmtree(work, ignore_errors=True)


def _buildah_has(cfg: Config, ref: str) -> bool:
    return (
        run(buildah_cmd(cfg, "inspect", "--type", "image", ref), check=False, quiet=True).returncode
        == 0
    )


def ensure_base(cfg: Config) -> float:
    """Make the debootstrap base image unless it exists for the current recipe key."""
    key = base_key()
    keyed = f"localhost/snakepit/base:{key}"
    if _buildah_has(cfg, keyed):
        run(buildah_cmd(cfg, "tag", keyed, BASE_IMAGE), quiet=True)
        return 0.0
    if not shutil.which("debootstrap") or not shutil.which("buildah"):
        raise RuntimeError(
            "debootstrap and buildah are needed to build images "
            "(apt-get install debootstrap buildah)"
        )
    begin = time.monotonic()
    rootfs_tar = cfg.images_cache / f"base-{DEBIAN_SUITE}-{key}.tar"
    if not rootfs_tar.exists():
        log(f"debootstrap {DEBIAN_SUITE} ({', '.join(BASE_PACKAGES)}) from {DEBIAN_MIRROR}")
        debootstrap_tarball(
            rootfs_tar, BASE_PACKAGES, BASE_TRIM, stale=f"base-{DEBIAN_SUITE}-*.tar"
        )
    ctr = output(buildah_cmd(cfg, "from", "scratch")).strip()
    try:
        run(buildah_cmd(cfg, "add", ctr, str(rootfs_tar), "/"), quiet=True)
        run(
            buildah_cmd(
                cfg,
                "config",
                "--env",
                "LANG=C.UTF-8",
                "--env",
                "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--cmd",
                "/bin/bash",
                ctr,
            ),
            quiet=True,
        )
        run(buildah_cmd(cfg, "commit", "--rm", ctr, keyed), quiet=True)
    except Exception:
        run(buildah_cmd(cfg, "rm", ctr), check=False, quiet=True)
        raise
    run(buildah_cmd(cfg, "tag", keyed, BASE_IMAGE), quiet=True)
    return time.monotonic() - begin


def python_requirements() -> list[str]:
    """The project's runtime and operator dependencies, plus what its build backend needs."""
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    reqs = list(project["project"].get("dependencies", []))
    reqs += project["project"].get("optional-dependencies", {}).get("operator", [])
    reqs += project.get("build-system", {}).get("requires", [])
    return sorted({*reqs, *MARKER_ONLY_REQUIREMENTS})


def ensure_wheelhouse(cfg: Config) -> Path:
    """Wheels of every dependency, downloaded by the host's pip (which knows this machine's
    proxy and CA). Builds install from it with ``--no-index``: no image build needs the network
    for Python packages, and reruns download nothing."""
    reqs = python_requirements()
    key = hashlib.sha256(json.dumps([reqs, BASE_PYTHON, WHEEL_PLATFORMS]).encode()).hexdigest()[:12]
    house = cfg.cache_dir / "wheelhouse" / key
    if (house / ".complete").exists():
        return house
    log(f"downloading {len(reqs)} requirements into the wheelhouse {house}")
    house.mkdir(parents=True, exist_ok=True)
    platforms = [arg for plat in WHEEL_PLATFORMS for arg in ("--platform", plat)]
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--dest",
            house,
            "--only-binary=:all:",
            "--python-version",
            BASE_PYTHON,
            "--implementation",
            "cp",
            "--abi",
            "cp311",
            *platforms,
            *reqs,
        ],
        env={"PIP_FIND_LINKS": ""},
    )
    (house / ".complete").write_text("\n".join(reqs) + "\n")
    for old in house.parent.iterdir():
        if old != house:
            shutil.rmtree(old, ignore_errors=True)
    return house


def _pip_conf(cfg: Config) -> Path:
    conf = cfg.cache_dir / "wheelhouse" / "pip.conf"
    conf.write_text("[global]\nno-index = true\nfind-links = /wheels\n")
    return conf


def image_key(name: str) -> str:
    dockerfile = REPO_ROOT / PROJECT_IMAGES[name]
    inputs = (
        [dockerfile] if name == "redis" else [dockerfile, *(REPO_ROOT / p for p in CONTEXT_INPUTS)]
    )
    return hashlib.sha256((base_key() + _tree_digest(inputs)).encode()).hexdigest()[:16]


def archive_path(cfg: Config, name: str) -> Path:
    return cfg.images_cache / f"{name}-{image_key(name)}.tar"


def build_image(cfg: Config, name: str) -> tuple[Path, float]:
    """Build one project image into a docker archive in the cache, unless it is there already.

    Returns the archive and the seconds spent. The key is computed once, here: the sources may
    change while we build, and what gets loaded must be what was built.
    """
    archive = archive_path(cfg, name)
    if archive.exists():
        return archive, 0.0
    ensure_base(cfg)
    begin = time.monotonic()
    local = f"localhost/snakepit/{name}:dev"
    log(f"building {image_ref(name)} from {PROJECT_IMAGES[name]}")
    house = ensure_wheelhouse(cfg)
    # pip inside the build reads /etc/pip.conf: install only from the mounted wheelhouse.
    mounts = ["-v", f"{house}:/wheels:ro", "-v", f"{_pip_conf(cfg)}:/etc/pip.conf:ro"]
    run(
        buildah_cmd(
            cfg,
            "bud",
            "--isolation",
            "chroot",
            "--layers",
            "--force-rm",
            *mounts,
            "--build-arg",
            f"BASE_IMAGE={BASE_IMAGE}",
            "-f",
            str(REPO_ROOT / PROJECT_IMAGES[name]),
            "-t",
            local,
            str(REPO_ROOT),
        ),
        quiet=True,
    )
    for old in cfg.images_cache.glob(f"{name}-*.tar"):
        old.unlink()
    tmp = archive.with_suffix(".tmp")
    tmp.unlink(missing_ok=True)
    run(buildah_cmd(cfg, "push", local, f"docker-archive:{tmp}:{image_ref(name)}"), quiet=True)
    tmp.replace(archive)
    seconds = time.monotonic() - begin
    log(f"built {image_ref(name)} in {seconds:.0f}s ({archive.stat().st_size >> 20} MiB)")
    return archive, seconds


def build_images(
    cfg: Config, names: Iterable[str] = tuple(PROJECT_IMAGES)
) -> tuple[dict[str, Path], dict[str, float]]:
    """Build (or find cached) archives; return {name: archive} and {step: seconds}."""
    timings: dict[str, float] = {}
    archives: dict[str, Path] = {}
    with build.cache_lock(cfg):
        cfg.images_cache.mkdir(parents=True, exist_ok=True)
        # Working containers a crashed build left behind (they keep overlay mounts).
        run(buildah_cmd(cfg, "rm", "--all"), check=False, quiet=True)
        timings["base"] = ensure_base(cfg)
        started = time.time()
        for name in names:
            archives[name], timings[name] = build_image(cfg, name)
        if any(timings[name] for name in names):
            prune_older_than(cfg, started)
    (cfg.images_cache / "last-build-timings.json").write_text(json.dumps(timings, indent=1))
    return archives, timings


def prune_older_than(cfg: Config, started: float) -> None:
    """Remove untagged images left by earlier builds (~300 MB of layers a build).

    The untagged images of this build stay: with ``--layers`` they are the cache that makes the
    next build of unchanged dependencies fast.
    """
    listing = json.loads(output(buildah_cmd(cfg, "images", "--json")) or "[]")
    stale = [
        image["id"]
        for image in listing
        if not image.get("names") and int(image.get("created", 0)) < started
    ]
    if stale:
        run(buildah_cmd(cfg, "rmi", *stale), check=False, quiet=True)
        log(f"pruned {len(stale)} untagged images of earlier builds")


def load_images(cfg: Config, archives: dict[str, Path]) -> float:
    """Import archives into the node's containerd under docker.io/snakepit/<name>:dev.

    An archive already imported into this cluster's containerd is skipped (its file name carries
    the content key), so a test session that calls `images` again pays nothing.
    """
    begin = time.monotonic()
    record = cfg.state_dir / "loaded-images.json"
    try:
        loaded: dict[str, str] = json.loads(record.read_text())
    except (OSError, ValueError):
        loaded = {}
    present = set(containerd_images(cfg))
    for name, archive in archives.items():
        ref = f"docker.io/{image_ref(name)}"
        if loaded.get(name) == archive.name and ref in present:
            continue
        import_archive(cfg, archive, ref)
        loaded[name] = archive.name
        record.write_text(json.dumps(loaded, indent=1) + "\n")
    return time.monotonic() - begin
