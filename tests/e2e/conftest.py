"""End-to-end tests on a real Kubernetes cluster (see localkube and docs/local-cluster.md).

The cluster fixtures live in the plugin ``tests.fixtures.kube`` so that other test
directories can use them too; the root conftest loads it. This file only makes sure the plugin is
registered when tests/e2e is run on its own with a root conftest that does not load it yet.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

if "tests.fixtures.kube" not in sys.modules:
    from tests.fixtures.kube import (  # noqa: F401  (fixtures, re-exported)
        kube_control_plane,
        kube_namespace,
        kube_node,
        kube_provider,
        pytest_collection_modifyitems,
        pytest_configure,
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test of a pool's namespace carries its routers' last log lines: what the router
    saw of the workers (state changes, HAProxy's server events) is what a flaky failure in CI
    needs, and the namespace is gone once the module ends."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    funcargs = getattr(item, "funcargs", {})
    cluster, ns = funcargs.get("kube_node"), funcargs.get("ns")
    if report.when != "call" or not report.failed or cluster is None or not isinstance(ns, str):
        return
    logs = cluster.kubectl_run(
        "-n", ns, "logs", "-l", "app.kubernetes.io/component=router",
        "--tail=150", "--timestamps", "--prefix", check=False,
    )  # fmt: skip
    report.sections.append(("router logs (last 150 lines of each)", logs.stdout + logs.stderr))
