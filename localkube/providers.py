"""Cluster providers for the end-to-end suite, chosen by ``SNAKEPIT_E2E_CLUSTER``.

- ``local`` (default): the single-node cluster this package builds on this machine
  (``scripts/local-cluster``); needs root, Go, containerd, buildah and debootstrap.
- ``kind``: ``scripts/local-cluster up --provider kind``: a kind cluster on a running Docker (kind's
  stock node image), or on a Docker started here with a node image built here; the images are
  built with buildah (as for ``local``) and loaded with ``kind load image-archive``.
- ``existing``: the current kubeconfig (``KUBECONFIG`` or ~/.kube/config); the images must already
  be reachable by the cluster under ``$SNAKEPIT_E2E_IMAGE_PREFIX/<name>:dev``.

Every provider answers the same questions (kubeconfig, image names, pull policy, how the host
reaches a Service), so the tests themselves never branch on the provider.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .config import REPO_ROOT, Config

LOCAL_CLUSTER = REPO_ROOT / "scripts" / "local-cluster"


T = TypeVar("T")


class ProviderError(RuntimeError):
    """The cluster could not be provided; the message says why."""


class MissingPrerequisite(ProviderError):
    """This machine lacks something the provider needs (root, a tool); nothing was attempted."""


@dataclass
class KubeCluster:
    """What a test needs to use a cluster, whichever provider made it."""

    provider: str
    kubeconfig: Path
    kubectl: str
    image_prefix: str = "snakepit"
    pull_policy: str = "Never"
    tier: str = "node"
    # The host routes to ClusterIPs directly (local provider) instead of port-forwarding.
    host_reaches_cluster_ips: bool = False
    # A NetworkPolicy engine enforces policies (kube-router on the local cluster; none on kind
    # with the node image built here, whose pod network is static routes without a CNI daemon).
    enforces_network_policies: bool = True
    extra: dict[str, str] = field(default_factory=dict)
    # Adds a tag to an image in the node's runtime: (fully qualified source, new) -> None.
    tagger: Callable[[str, str], None] | None = field(default=None, repr=False)

    def image(self, name: str, tag: str = "dev") -> str:
        """Image reference a pod spec uses, e.g. ``snakepit/worker:dev``."""
        return f"{self.image_prefix}/{name}:{tag}"

    def tag_image(self, name: str, tag: str) -> str:
        """Make the loaded ``<name>:dev`` image available as ``<name>:<tag>`` too; return the new
        reference. Same content, new reference: what a rollout test needs to change a pod
        template's image without a registry. Not possible on an ``existing`` cluster."""
        if self.tagger is None:
            raise NotImplementedError(
                f"the {self.provider} provider cannot tag images; push "
                f"{self.image(name, tag)} yourself"
            )
        self.tagger(f"docker.io/{self.image(name)}", f"docker.io/{self.image(name, tag)}")
        return self.image(name, tag)

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "KUBECONFIG": str(self.kubeconfig)}

    def kubectl_run(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl, f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"kubectl {' '.join(args)} failed ({proc.returncode}):\n"
                f"{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def apply(self, manifest: str, namespace: str | None = None) -> None:
        ns = ["-n", namespace] if namespace else []
        self.kubectl_run(*ns, "apply", "-f", "-", input=manifest)

    @contextmanager
    def service_address(self, namespace: str, service: str, port: int) -> Iterator[str]:
        """``host:port`` at which this machine reaches a Service: its ClusterIP when routable,
        else a ``kubectl port-forward`` to a free local port."""
        if self.host_reaches_cluster_ips:
            ip = self.kubectl_run(
                "-n", namespace, "get", "svc", service, "-o", "jsonpath={.spec.clusterIP}"
            ).stdout.strip()
            yield f"{ip}:{port}"
            return
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            local = sock.getsockname()[1]
        proc = subprocess.Popen(
            [
                self.kubectl,
                f"--kubeconfig={self.kubeconfig}",
                "-n",
                namespace,
                "port-forward",
                f"svc/{service}",
                f"{local}:{port}",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline()  # "Forwarding from 127.0.0.1:N -> P"
            if "Forwarding" not in line:
                raise AssertionError(f"port-forward failed: {line}")
            yield f"127.0.0.1:{local}"
        finally:
            proc.terminate()
            proc.wait(10)


def _kubectl_binary(cfg: Config) -> str:
    if cfg.kubectl_bin.exists():
        return str(cfg.kubectl_bin)
    if found := shutil.which("kubectl"):
        return found
    raise MissingPrerequisite("no kubectl: run `scripts/local-cluster build` or install kubectl")


class Provider:
    name = "base"

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def ensure(self, tier: str) -> KubeCluster:
        raise NotImplementedError

    def teardown(self) -> None:
        """Remove what this provider created during the session (nothing by default)."""


class ScriptProvider(Provider):
    """A provider that runs ``scripts/local-cluster`` in subprocesses: exactly what a developer
    would type. Their stderr goes to one log, whose tail a failure shows."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        # Whether a cluster already ran when this session first asked: then it is left running.
        self.preexisting: bool | None = None
        self.images_loaded = False
        self.log = cfg.cache_dir / "last-e2e-provider.log"

    def check_prerequisites(self) -> None:
        """Raise MissingPrerequisite for what this machine lacks; nothing is attempted before."""

    def script_env(self) -> dict[str, str]:
        return {"SNAKEPIT_CACHE": str(self.cfg.cache_dir)}

    def _script(self, *args: str, timeout: float = 3600) -> str:
        self.check_prerequisites()
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("a") as log:
            log.write(f"\n$ scripts/local-cluster {' '.join(args)}\n")
            log.flush()
            proc = subprocess.run(
                [str(LOCAL_CLUSTER), *args],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                timeout=timeout,
                env={**os.environ, **self.script_env()},
            )
        if proc.returncode != 0:
            tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-40:])
            raise ProviderError(
                f"scripts/local-cluster {' '.join(args)} failed "
                f"({proc.returncode}); log {self.log}:\n{tail}"
            )
        return proc.stdout

    def down(self) -> None:
        raise NotImplementedError

    def teardown(self) -> None:
        if self.preexisting is False and not os.environ.get("SNAKEPIT_E2E_KEEP"):
            self.down()


class LocalProvider(ScriptProvider):
    """The single-node cluster this package runs as plain processes on this machine."""

    name = "local"

    # Debian packages (apt-get install containerd runc containernetworking-plugins iptables
    # conntrack ipset buildah debootstrap) plus openssl; Go only when the binary cache is cold.
    TOOLS = (
        "containerd",
        "containerd-shim-runc-v2",
        "runc",
        "ctr",
        "iptables",
        "conntrack",
        "ipset",  # kube-router, the NetworkPolicy engine
        "buildah",
        "debootstrap",
        "openssl",
        "ip",
        "mount",
    )

    def check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise MissingPrerequisite(
                "the local cluster needs root (kubelet, containerd, iptables)"
            )
        path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
        missing = [t for t in self.TOOLS if not shutil.which(t, path=path)]
        if not Path("/usr/lib/cni/bridge").exists():
            missing.append("containernetworking-plugins (/usr/lib/cni)")
        from .build import COMPONENTS, LOCAL_COMPONENTS, is_built

        built = all(is_built(self.cfg, COMPONENTS[c]) for c in LOCAL_COMPONENTS)
        if not built and not shutil.which("go"):
            missing.append("go (the binary cache is cold)")
        if missing:
            raise MissingPrerequisite("the local cluster needs: " + ", ".join(missing))

    def script_env(self) -> dict[str, str]:
        return {**super().script_env(), "SNAKEPIT_CLUSTER_DIR": str(self.cfg.state_dir)}

    def running_tier(self) -> str | None:
        from .cluster import current_tier  # local import: keeps the plugin import light

        return current_tier(self.cfg)

    def ensure(self, tier: str) -> KubeCluster:
        before = self.running_tier()
        if self.preexisting is None:
            self.preexisting = before is not None
        if not (before == "node" or before == tier):
            out = self._script("up", "--tier", tier).strip().splitlines()
            if not out or not out[-1].startswith("export KUBECONFIG="):
                raise ProviderError(f"unexpected output of `up`: {out[-1:]}")
        running = self.running_tier() or tier
        if running == "node" and not self.images_loaded:
            self._script("images")
            self.images_loaded = True
        return KubeCluster(
            provider=self.name,
            kubeconfig=self.cfg.admin_kubeconfig,
            kubectl=_kubectl_binary(self.cfg),
            tier=running,
            host_reaches_cluster_ips=True,
            tagger=self._tag,
        )

    def _tag(self, source: str, target: str) -> None:
        """Tag in the node's containerd (its content goes away with the cluster on `down`)."""
        from .images import ctr_cmd
        from .run import run

        run(ctr_cmd(self.cfg, "images", "tag", "--force", source, target), quiet=True)

    def down(self) -> None:
        self._script("down")
        self.images_loaded = False


class KindProvider(ScriptProvider):
    """Runs ``scripts/local-cluster up|images|down --provider kind`` in subprocesses.

    On a machine whose Docker answers, kind's stock node image is used; where no engine runs
    (these build machines) ``up`` starts a Docker of its own and builds the node image here.
    ``SNAKEPIT_E2E_KIND_NODES`` (default 1) sets the number of nodes.
    """

    name = "kind"

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        from .kind.settings import KindConfig

        self.kcfg = KindConfig(cache_dir=cfg.cache_dir)
        self.nodes = int(os.environ.get("SNAKEPIT_E2E_KIND_NODES") or 1)

    def check_prerequisites(self) -> None:
        if os.geteuid() != 0:
            raise MissingPrerequisite("the kind provider here needs root (it may start dockerd)")
        from .kind.engine import docker_answers

        if not shutil.which("docker"):
            raise MissingPrerequisite("the kind provider needs docker (apt-get install docker.io)")
        if not docker_answers(None) and not shutil.which("dockerd"):
            raise MissingPrerequisite(
                "the kind provider needs a running Docker, or dockerd to start one "
                "(apt-get install docker.io)"
            )

    def status(self) -> dict[str, object]:
        from .kind.cluster import status

        return status(self.kcfg)

    def ensure(self, tier: str) -> KubeCluster:
        from .kind.cluster import built_image

        running = self.status()
        if self.preexisting is None:
            self.preexisting = bool(running.get("running"))
        if not running.get("running") or running.get("nodes") != self.nodes:
            out = self._script("up", "--provider", "kind", "--nodes", str(self.nodes))
            lines = out.strip().splitlines()
            if not lines or not lines[-1].startswith("export KUBECONFIG="):
                raise ProviderError(f"unexpected output of `up --provider kind`: {lines[-1:]}")
            self.images_loaded = False
            running = self.status()
        if not self.images_loaded:
            self._script("images", "--provider", "kind")
            self.images_loaded = True
        return KubeCluster(
            provider=self.name,
            kubeconfig=self.kcfg.kubeconfig,
            kubectl=_kubectl_binary(self.cfg),
            pull_policy="Never",
            tier="node",
            host_reaches_cluster_ips=bool(running.get("service_route")),
            enforces_network_policies=not built_image(running),
            tagger=self._tag,
        )

    def _tag(self, source: str, target: str) -> None:
        """Tag inside every node's containerd (kind nodes are containers named after them)."""
        from .kind import cluster as kind
        from .kind.engine import running_engine

        engine = running_engine(self.kcfg)
        if engine is None:
            raise ProviderError("no container engine runs")
        for node in kind.node_names(self.kcfg, engine):
            kind.docker_exec(
                engine, node, "ctr", "-n", "k8s.io", "images", "tag", "--force", source, target
            )

    def stop_node(self, node: str) -> None:
        """Stop a node's container (what losing a machine looks like to the cluster)."""
        from .kind import cluster as kind

        kind.stop_node(self.kcfg, node)

    def start_node(self, node: str) -> None:
        from .kind import cluster as kind

        kind.start_node(self.kcfg, node)

    def down(self) -> None:
        self._script("down", "--provider", "kind")
        self.images_loaded = False


class ExistingProvider(Provider):
    name = "existing"

    def ensure(self, tier: str) -> KubeCluster:
        path = Path(
            os.environ.get("KUBECONFIG", "").split(os.pathsep)[0]
            or Path.home() / ".kube" / "config"
        )
        if not path.exists():
            raise ProviderError(f"SNAKEPIT_E2E_CLUSTER=existing but no kubeconfig at {path}")
        prefix = os.environ.get("SNAKEPIT_E2E_IMAGE_PREFIX", "snakepit").rstrip("/")
        return KubeCluster(
            provider=self.name,
            kubeconfig=path,
            kubectl=_kubectl_binary(self.cfg),
            image_prefix=prefix,
            pull_policy="IfNotPresent",
            tier="node",
        )


PROVIDERS: dict[str, type[Provider]] = {
    "local": LocalProvider,
    "kind": KindProvider,
    "existing": ExistingProvider,
}


def make_provider(name: str, cfg: Config) -> Provider:
    if name not in PROVIDERS:
        raise ProviderError(f"SNAKEPIT_E2E_CLUSTER={name!r}: expected one of {sorted(PROVIDERS)}")
    return PROVIDERS[name](cfg)


def wait_until(what: str, probe: Callable[[], T], timeout: float = 120, interval: float = 1.0) -> T:
    """Poll ``probe`` until it returns something truthy; return it or raise AssertionError."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            last = probe()
            if last:
                return last
        except Exception as exc:  # keep polling; report the last failure
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")
