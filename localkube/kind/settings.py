"""Names, paths and address ranges of the kind provider (nothing here touches the machine)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from ..config import Config


def _env_path(name: str, default: str) -> Path:
    return Path(os.environ.get(name) or default)


@dataclass(frozen=True)
class KindConfig:
    """Where the kind cluster's pieces live. The engine's data root is in the cache (the node
    image survives clusters); everything else of a cluster goes away on ``down``."""

    cache_dir: Path = field(
        default_factory=lambda: _env_path("SNAKEPIT_CACHE", "/var/cache/snakepit")
    )
    state_dir: Path = field(
        default_factory=lambda: _env_path("SNAKEPIT_KIND_DIR", "/var/lib/snakepit-kind")
    )
    name: str = field(
        default_factory=lambda: os.environ.get("SNAKEPIT_E2E_KIND_NAME", "snakepit-e2e")
    )
    # Our own engine's network for the nodes (only when this tool started the engine).
    network: str = "kind"
    bridge: str = "snakepit-kind0"
    node_subnet: str = "172.31.240.0/24"
    # Ranges of their own (not the local provider's 10.244/10.96): nothing on the host can mistake
    # one cluster's addresses for the other's.
    pod_subnet: str = "10.245.0.0/16"
    service_subnet: str = "10.97.0.0/16"
    cgroup_parent: str = "snakepit-docker"

    @property
    def cfg(self) -> Config:
        """The shared cache plus this provider's state dir (PID files, logs, snapshot)."""
        return Config(cache_dir=self.cache_dir, state_dir=self.state_dir)

    @property
    def docker_data_root(self) -> Path:
        return self.cache_dir / "docker"

    @property
    def docker_exec_root(self) -> Path:
        # Short: containerd's and the shims' sockets live below it.
        return Path(os.environ.get("SNAKEPIT_DOCKER_EXEC_ROOT") or "/run/snakepit-docker")

    @property
    def docker_socket(self) -> Path:
        return self.docker_exec_root / "docker.sock"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def info_file(self) -> Path:
        """What `up` made: engine, image, nodes (read by `status`, the fixtures and `down`)."""
        return self.state_dir / "cluster.json"

    @property
    def snapshot_file(self) -> Path:
        return self.state_dir / "found-state.json"

    @property
    def volumes_dir(self) -> str:
        """Inside every node: one directory per provisioned volume."""
        return "/var/local-volumes"
