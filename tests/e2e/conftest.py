"""End-to-end tests on a real Kubernetes cluster (see localkube and docs/local-cluster.md).

The cluster fixtures live in the plugin ``tests.fixtures.kube`` so that other test
directories can use them too; the root conftest loads it. This file only makes sure the plugin is
registered when tests/e2e is run on its own with a root conftest that does not load it yet.
"""

from __future__ import annotations

import sys

if "tests.fixtures.kube" not in sys.modules:
    from tests.fixtures.kube import (  # noqa: F401  (fixtures, re-exported)
        kube_control_plane,
        kube_namespace,
        kube_node,
        kube_provider,
        pytest_collection_modifyitems,
        pytest_configure,
    )
