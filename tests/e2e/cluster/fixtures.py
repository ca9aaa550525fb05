"""pytest plugin: real Kubernetes clusters as session-scoped fixtures, for any test directory.

Load it once from ``tests/conftest.py``::

    pytest_plugins = [..., "tests.e2e.cluster.fixtures"]

Fixtures
    ``kube_control_plane``  a cluster with at least the control plane (API server, controllers:
                            garbage collector, Deployment/StatefulSet/EndpointSlice …); no pod runs
                            unless the node tier is up. Starts in ~10 s on a warm cache.
    ``kube_node``           the node tier: pods run, Services and cluster DNS work, the default
                            StorageClass provisions volumes, the project images are loaded.
    ``kube_namespace``      a fresh namespace for one test, deleted afterwards.
    ``kube_provider``       the provider object (see providers.py).

Both tiers live for the whole session: requesting ``kube_node`` after ``kube_control_plane`` grows
the same cluster in place, and a node cluster satisfies ``kube_control_plane``. The cluster is
torn down at the end of the session if this session started it (``SNAKEPIT_E2E_KEEP=1`` keeps it).

Failure policy: with ``SNAKEPIT_E2E_CLUSTER`` set (CI sets it) any problem providing the cluster
is a test error. Without it, a machine that lacks a prerequisite (not root, no containerd, …)
skips these tests with the reason; every other failure is still an error.
Tests that use the fixtures are marked ``kube`` / ``node`` automatically.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest

from .config import Config
from .providers import KubeCluster, MissingPrerequisite, Provider, ProviderError, make_provider

ENV_PROVIDER = "SNAKEPIT_E2E_CLUSTER"


def _explicit() -> bool:
    return bool(os.environ.get(ENV_PROVIDER))


def _provide(provider: Provider, tier: str) -> KubeCluster:
    try:
        return provider.ensure(tier)
    except MissingPrerequisite as exc:
        if _explicit():
            pytest.fail(f"{ENV_PROVIDER}={provider.name}: {exc}", pytrace=False)
        pytest.skip(f"no local Kubernetes: {exc} (set {ENV_PROVIDER} to make this an error)")
    except ProviderError as exc:
        pytest.fail(f"cluster provider {provider.name!r} failed: {exc}", pytrace=False)


@pytest.fixture(scope="session")
def kube_provider() -> Iterator[Provider]:
    try:
        provider = make_provider(os.environ.get(ENV_PROVIDER) or "local", Config())
    except ProviderError as exc:
        pytest.fail(str(exc), pytrace=False)
    yield provider
    provider.teardown()


@pytest.fixture(scope="session")
def kube_control_plane(kube_provider: Provider) -> KubeCluster:
    """A running API server and controller manager; the kubeconfig is ``.kubeconfig``."""
    return _provide(kube_provider, "control-plane")


@pytest.fixture(scope="session")
def kube_node(kube_provider: Provider) -> KubeCluster:
    """A node that runs pods, with ``snakepit/{worker,operator,redis}:dev`` loaded."""
    return _provide(kube_provider, "node")


@pytest.fixture
def kube_namespace(
    kube_control_plane: KubeCluster, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A namespace of its own for one test; deleted (without waiting) when the test ends."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:6]}"
    kube_control_plane.kubectl_run("create", "namespace", name)
    yield name
    kube_control_plane.kubectl_run("delete", "namespace", name, "--wait=false", check=False)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "cluster_teardown: tears the session's cluster down (and brings it back); runs last",
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark cluster users, and move tests that tear the cluster down to the end of the session
    (after them every other test would get a freshly re-created cluster, new certificates and
    all)."""
    items.sort(key=lambda item: item.get_closest_marker("cluster_teardown") is not None)
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "kube_node" in names:
            item.add_marker(pytest.mark.node)
        if "kube_node" in names or "kube_control_plane" in names or "kube_namespace" in names:
            item.add_marker(pytest.mark.kube)
