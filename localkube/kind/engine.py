"""The container engine kind drives: a Docker that already runs, or one started here by hand.

On a user's machine ``docker info`` answers and that engine is used as it is (never stopped).
On the build machines no engine runs; Debian's ``docker.io`` is started by hand with its own
data root (in the cache, so the node image survives clusters), exec root, socket and cgroup
parent, and with everything that would touch the host's network configuration switched off:

- ``--iptables=false --ip-masq=false --ip-forward=false``: no ``DOCKER*`` chains, no NAT, no
  ``FORWARD`` policy change, ``net.ipv4.ip_forward`` left as it is (so no container packet can
  be routed off this machine);
- ``--bridge=none``: no ``docker0``; the kind network is a bridge of its own, made by ``up``;
- the userland proxy (on by default) serves published ports, which is how the host reaches a
  node's API server on ``127.0.0.1``;
- ``--default-runtime`` is ``runcwrap`` (``localkube/kind/runcwrap.go``): runc with
  ``CAP_SYS_RESOURCE`` taken out of the spec, which this VM's kernel denies to every process
  (plain runc fails privileged containers with ``unable to apply caps``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .. import build, procs
from ..run import log, wait_for
from .settings import KindConfig

RUNTIME_NAME = "snakepit-runc"


@dataclass(frozen=True)
class Engine:
    """How to reach the engine: ``DOCKER_HOST`` (empty: the client's default) and whether this
    tool started it (and so stops it on ``down``)."""

    docker_host: str
    owned: bool

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.docker_host:
            env["DOCKER_HOST"] = self.docker_host
        return env


def docker_answers(docker_host: str | None, timeout: float = 10) -> bool:
    env = dict(os.environ)
    if docker_host is not None:
        env["DOCKER_HOST"] = docker_host
    if not shutil.which("docker"):
        return False
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


def own_engine_host(kcfg: KindConfig) -> str:
    return f"unix://{kcfg.docker_socket}"


def running_engine(kcfg: KindConfig) -> Engine | None:
    """The engine in use: ours if it runs, else the user's (default client settings), else None."""
    if procs.read_pid(kcfg.cfg, "dockerd") is not None:
        return Engine(own_engine_host(kcfg), owned=True)
    if docker_answers(None):
        return Engine(os.environ.get("DOCKER_HOST", ""), owned=False)
    return None


def dockerd_argv(kcfg: KindConfig, runcwrap: Path) -> list[str]:
    return [
        "dockerd",
        f"--data-root={kcfg.docker_data_root}",
        f"--exec-root={kcfg.docker_exec_root}",
        f"--host={own_engine_host(kcfg)}",
        f"--pidfile={kcfg.docker_exec_root / 'dockerd.pid'}",
        "--iptables=false",
        "--ip6tables=false",
        "--ip-masq=false",
        "--ip-forward=false",
        "--bridge=none",
        f"--cgroup-parent={kcfg.cgroup_parent}",
        f"--add-runtime={RUNTIME_NAME}={runcwrap}",
        f"--default-runtime={RUNTIME_NAME}",
        # Nothing is ever pulled; keep the engine from looking for mirrors or plugins online.
        "--log-level=warn",
    ]


def ensure_engine(kcfg: KindConfig) -> Engine:
    """Use a running engine, or start our own ``dockerd``; raise when neither is possible."""
    if found := running_engine(kcfg):
        return found
    if not shutil.which("dockerd"):
        raise RuntimeError(
            "no container engine answers (`docker info`) and dockerd is not installed: "
            "apt-get install docker.io (it is started by hand, not as a service)"
        )
    runcwrap = kcfg.cfg.bin_dir("runcwrap", build.COMPONENTS["runcwrap"].version) / "runcwrap"
    build.ensure_component(kcfg.cfg, "runcwrap")
    kcfg.docker_data_root.mkdir(parents=True, exist_ok=True)
    kcfg.docker_exec_root.mkdir(parents=True, exist_ok=True)
    log("starting dockerd (own data root, socket and exec root; no iptables, no NAT)")
    procs.start(kcfg.cfg, "dockerd", dockerd_argv(kcfg, runcwrap), {"PATH": _path()})
    engine = Engine(own_engine_host(kcfg), owned=True)
    procs.wait_ready(kcfg.cfg, "dockerd", lambda: docker_answers(engine.docker_host, 5), 60)
    return engine


def _path() -> str:
    return "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def stray_processes(kcfg: KindConfig) -> dict[str, int]:
    """Processes of our engine outside its PID file: containerd, shims, docker-proxy."""
    return procs.mentioning((str(kcfg.docker_exec_root), str(kcfg.docker_data_root)))


def stop_engine(kcfg: KindConfig) -> None:
    """Stop our dockerd (never a user's), then whatever of it outlived it."""
    if procs.stop(kcfg.cfg, "dockerd", timeout=30):
        log("stopped dockerd")
    for _ in range(3):
        strays = stray_processes(kcfg)
        if not strays:
            break
        for name, pid in strays.items():
            log(f"killing leftover {name}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            wait_for("engine leftovers to exit", lambda: not stray_processes(kcfg), 10, 0.2)
