"""Build the pinned binaries into the cache, once per version.

Kubernetes' own go.mod replaces its staging modules (k8s.io/api, …) with local folders, so
``go install k8s.io/kubernetes/cmd/…@vX`` is refused. We write a tiny wrapper module that requires
``k8s.io/kubernetes`` and replaces every staging module with its published ``v0.Y.Z`` twin, then
``go build`` the commands from it. etcd's server module has the same shape. CoreDNS, helm, kind
and kube-router install with a plain ``go install``. A stamp file per component records the recipe and the build
time; a rerun whose stamp matches builds nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import config as C
from .config import Config
from .run import log, output, run, write_file

K8S_COMMANDS = (
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kubelet",
    "kube-proxy",
    "kubectl",
)

# Static program used as the pod sandbox ("pause") image: it idles until a signal and reaps
# zombies, which is all the real pause binary does.
PAUSE_MAIN = """package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s == syscall.SIGCHLD {
			for {
				var ws syscall.WaitStatus
				pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
				if pid <= 0 || err != nil {
					break
				}
			}
			continue
		}
		os.Exit(0)
	}
}
"""


@dataclass(frozen=True)
class Component:
    name: str
    version: str
    binaries: tuple[str, ...]

    def dir(self, cfg: Config) -> Path:
        return cfg.cache_dir / f"{self.name}-{self.version}"

    def stamp(self, cfg: Config) -> Path:
        return self.dir(cfg) / "STAMP.json"


COMPONENTS = {
    "k8s": Component("k8s", C.K8S_VERSION, K8S_COMMANDS),
    "etcd": Component("etcd", C.ETCD_VERSION, ("etcd",)),
    "coredns": Component("coredns", C.COREDNS_VERSION, ("coredns",)),
    "helm": Component("helm", C.HELM_VERSION, ("helm",)),
    "kind": Component("kind", C.KIND_VERSION, ("kind",)),
    "pause": Component("pause", C.PAUSE_VERSION, ("pause",)),
    "kube-router": Component("kube-router", C.KUBE_ROUTER_VERSION, ("kube-router",)),
    # Not part of the cluster: the real Prometheus of the e2e metrics test (pod discovery).
    "prometheus": Component("prometheus", C.PROMETHEUS_VERSION, ("prometheus",)),
    # Only the kind provider's node image needs these two; `ensure_all` leaves them out.
    "kubeadm": Component("kubeadm", C.K8S_VERSION, ("kubeadm",)),
    "runcwrap": Component("runcwrap", C.RUNCWRAP_VERSION, ("runcwrap",)),
}
# What the local provider needs (and `scripts/local-cluster build` builds).
LOCAL_COMPONENTS = ("k8s", "etcd", "coredns", "helm", "kind", "pause", "kube-router", "prometheus")
RUNCWRAP_SOURCE = C.PACKAGE_DIR / "kind" / "runcwrap.go"

LDFLAGS = "-s -w"
# Prometheus with only the service discovery the tests use (its plugins/plugin_*.go files carry
# `!remove_all_sd || enable_<name>_sd`): the cloud SDKs (AWS, Azure, GCE, …) are most of its
# compile time. Without the `builtinassets` tag the web UI is not embedded either (the tests use
# the HTTP API only).
PROMETHEUS_TAGS = "remove_all_sd,enable_kubernetes_sd"


def go_env(cfg: Config) -> dict[str, str]:
    """Caches under the cache dir so CI reruns are warm; static, reproducible, small binaries."""
    return {
        "GOCACHE": str(cfg.go_cache),
        "GOMODCACHE": str(cfg.go_mod_cache),
        "GOFLAGS": "-trimpath -buildvcs=false",
        "CGO_ENABLED": "0",
        # etcd's go.mod asks for a newer patch toolchain; never download toolchains.
        "GOTOOLCHAIN": "local",
    }


# Bump when the way binaries are built changes (flags, wrapper module); versions are keyed apart.
RECIPE_REVISION = 1


def recipe_key(component: Component) -> str:
    """Changes whenever what we would build changes: version, flags, binaries, pause source."""
    material = json.dumps(
        [
            RECIPE_REVISION,
            component.name,
            component.version,
            component.binaries,
            LDFLAGS,
            PAUSE_MAIN if component.name == "pause" else "",
        ]
        + ([PROMETHEUS_TAGS] if component.name == "prometheus" else [])
        # Only the wrapper's recipe names its source (the other keys stay as they were).
        + ([RUNCWRAP_SOURCE.read_text()] if component.name == "runcwrap" else [])
    )
    return (
        f"{component.name}-{component.version}-{hashlib.sha256(material.encode()).hexdigest()[:12]}"
    )


def is_built(cfg: Config, component: Component) -> bool:
    stamp = component.stamp(cfg)
    if not stamp.exists():
        return False
    try:
        data = json.loads(stamp.read_text())
    except ValueError:
        return False
    bin_dir = component.dir(cfg) / "bin"
    return data.get("recipe") == recipe_key(component) and all(
        (bin_dir / b).is_file() for b in component.binaries
    )


@contextmanager
def cache_lock(cfg: Config) -> Iterator[None]:
    """Serialise builds: two test sessions (or CI steps) must not write the same cache at once."""
    cfg.cache_dir.mkdir(parents=True, exist_ok=True)
    with (cfg.cache_dir / ".build.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _version_ldflags(version: str) -> str:
    major, minor = version.lstrip("v").split(".")[:2]
    parts = [LDFLAGS]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        parts += [
            f"-X {pkg}.gitVersion={version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(parts)


def _module_gomod(cfg: Config, module: str, version: str) -> str:
    output(["go", "mod", "download", f"{module}@{version}"], env=go_env(cfg), cwd=Path("/"))
    escaped = re.sub(r"[A-Z]", lambda m: "!" + m.group(0).lower(), module)
    return (cfg.go_mod_cache / "cache" / "download" / escaped / "@v" / f"{version}.mod").read_text()


def _replaced_modules(gomod: str) -> list[str]:
    """Module paths that ``gomod`` replaces with a local folder (``=> ./…`` or ``=> ../…``)."""
    return sorted(set(re.findall(r"^\s*(?:replace\s+)?(\S+)\s+=>\s+\.\.?/", gomod, re.MULTILINE)))


def _write_wrapper(
    src: Path, module: str, version: str, replacements: dict[str, str], godebug: str | None
) -> None:
    lines = ["module snakepit.local/build", "", "go 1.24.0", ""]
    if godebug:
        lines += [f"godebug {godebug}", ""]
    lines += [f"require {module} {version}", "", "replace ("]
    lines += [f"\t{mod} => {mod} {ver}" for mod, ver in sorted(replacements.items())]
    lines += [")", ""]
    write_file(src / "go.mod", "\n".join(lines))


def _build_kubernetes(cfg: Config, out: Path, commands: tuple[str, ...] = K8S_COMMANDS) -> None:
    gomod = _module_gomod(cfg, "k8s.io/kubernetes", C.K8S_VERSION)
    staging = [m for m in _replaced_modules(gomod) if m.startswith("k8s.io/")]
    godebug = re.search(r"^godebug\s+(\S+)", gomod, re.MULTILINE)
    src = out.parent / "src"
    _write_wrapper(
        src,
        "k8s.io/kubernetes",
        C.K8S_VERSION,
        {m: C.K8S_STAGING_VERSION for m in staging},
        godebug.group(1) if godebug else None,
    )
    pkgs = [f"k8s.io/kubernetes/cmd/{c}" for c in commands]
    run(
        [
            "go",
            "build",
            "-mod=mod",
            "-o",
            f"{out}/",
            f"-ldflags={_version_ldflags(C.K8S_VERSION)}",
            *pkgs,
        ],
        env=go_env(cfg),
        cwd=src,
    )


def _build_etcd(cfg: Config, out: Path) -> None:
    module = "go.etcd.io/etcd/server/v3"
    gomod = _module_gomod(cfg, module, C.ETCD_VERSION)
    siblings = [m for m in _replaced_modules(gomod) if m.startswith("go.etcd.io/etcd/")]
    src = out.parent / "src"
    _write_wrapper(src, module, C.ETCD_VERSION, {m: C.ETCD_VERSION for m in siblings}, None)
    ldflags = f"{LDFLAGS} -X go.etcd.io/etcd/api/v3/version.GitSHA=snakepit"
    run(
        ["go", "build", "-mod=mod", "-o", str(out / "etcd"), f"-ldflags={ldflags}", module],
        env=go_env(cfg),
        cwd=src,
    )


def _go_install(cfg: Config, out: Path, pkg: str, tags: str = "") -> None:
    run(
        ["go", "install", f"-ldflags={LDFLAGS}", *([f"-tags={tags}"] if tags else []), pkg],
        env={**go_env(cfg), "GOBIN": str(out)},
        cwd=Path("/"),
    )


def _build_pause(cfg: Config, out: Path) -> None:
    src = out.parent / "src"
    write_file(src / "go.mod", "module snakepit.local/pause\n\ngo 1.24.0\n")
    write_file(src / "main.go", PAUSE_MAIN)
    run(
        ["go", "build", "-o", str(out / "pause"), f"-ldflags={LDFLAGS}", "."],
        env=go_env(cfg),
        cwd=src,
    )


def _build_runcwrap(cfg: Config, out: Path) -> None:
    src = out.parent / "src"
    write_file(src / "go.mod", "module snakepit.local/runcwrap\n\ngo 1.24.0\n")
    write_file(src / "main.go", RUNCWRAP_SOURCE.read_text())
    run(
        ["go", "build", "-o", str(out / "runcwrap"), f"-ldflags={LDFLAGS}", "."],
        env=go_env(cfg),
        cwd=src,
    )


def _build(cfg: Config, component: Component, out: Path) -> None:
    match component.name:
        case "k8s":
            _build_kubernetes(cfg, out)
        case "kubeadm":
            _build_kubernetes(cfg, out, ("kubeadm",))
        case "runcwrap":
            _build_runcwrap(cfg, out)
        case "etcd":
            _build_etcd(cfg, out)
        case "coredns":
            _go_install(cfg, out, f"github.com/coredns/coredns@{component.version}")
        case "helm":
            _go_install(cfg, out, f"helm.sh/helm/v3/cmd/helm@{component.version}")
        case "kind":
            _go_install(cfg, out, f"sigs.k8s.io/kind@{component.version}")
        case "pause":
            _build_pause(cfg, out)
        case "kube-router":
            pkg = "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"
            _go_install(cfg, out, f"{pkg}@{component.version}")
        case "prometheus":
            pkg = "github.com/prometheus/prometheus/cmd/prometheus"
            _go_install(cfg, out, f"{pkg}@{component.version}", PROMETHEUS_TAGS)
        case _:
            raise ValueError(component.name)


def ensure_component(cfg: Config, name: str) -> float:
    """Build one component unless its stamp matches; return the seconds spent building."""
    component = COMPONENTS[name]
    if is_built(cfg, component):
        return 0.0
    with cache_lock(cfg):
        if is_built(cfg, component):  # someone else built it while we waited
            return 0.0
        if not shutil.which("go"):
            raise RuntimeError(
                "the Go toolchain (go >= 1.24) is needed to build the cluster binaries"
            )
        out = component.dir(cfg) / "bin"
        tmp = component.dir(cfg) / "bin.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        log(f"building {name} {component.version} (first time only; Kubernetes takes long)")
        start = time.monotonic()
        _build(cfg, component, tmp)
        seconds = round(time.monotonic() - start, 1)
        shutil.rmtree(out, ignore_errors=True)
        tmp.replace(out)
        write_file(
            component.stamp(cfg),
            json.dumps(
                {
                    "component": name,
                    "version": component.version,
                    "recipe": recipe_key(component),
                    "build_seconds": seconds,
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "go": output(["go", "version"]).strip(),
                },
                indent=2,
            )
            + "\n",
        )
        log(f"built {name} in {seconds}s")
        return seconds


def ensure_all(cfg: Config, names: tuple[str, ...] = LOCAL_COMPONENTS) -> dict[str, float]:
    return {name: ensure_component(cfg, name) for name in names}


def build_report(cfg: Config) -> dict[str, object]:
    report: dict[str, object] = {}
    for name, component in COMPONENTS.items():
        stamp = component.stamp(cfg)
        report[name] = json.loads(stamp.read_text()) if stamp.exists() else None
    return report
