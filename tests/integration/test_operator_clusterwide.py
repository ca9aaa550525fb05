"""The operator installed cluster-wide (``watch.allNamespaces``): ClusterRole RBAC from the chart,
``--all-namespaces``, pools in several namespaces. See test_operator_kube.py for the setup."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.integration.test_operator_kube import (
    POOLS,
    Kubectl,
    OperatorEnv,
    api_client,
    helm_template,
    install_crd,
    service_account_kubeconfig,
    wait_for,
)
from tests.integration.test_operator_kube import admin_kubeconfig as find_admin_kubeconfig

pytestmark = pytest.mark.kube


@pytest.fixture(scope="module")
def cluster_op(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[OperatorEnv, list[str]]]:
    admin = Kubectl(find_admin_kubeconfig(request))
    suffix = uuid.uuid4().hex[:6]
    home, team_a, team_b = (f"spp-cw-{suffix}", f"spp-cw-{suffix}-a", f"spp-cw-{suffix}-b")
    for ns in (home, team_a, team_b):
        admin.run("create", "namespace", ns)
    install_crd(admin)
    rbac = helm_template(
        home,
        admin.server_version(),
        "--set", "watch.allNamespaces=true",
        "--show-only", "templates/serviceaccount.yaml",
        "--show-only", "templates/rbac.yaml",
    )  # fmt: skip
    admin.run("apply", "-f", "-", stdin=rbac)
    work = tmp_path_factory.mktemp("clusterwide")
    env = OperatorEnv(
        admin=admin,
        api=api_client(admin.kubeconfig),
        namespace=home,
        sa_kubeconfig=service_account_kubeconfig(admin, home, "snakepit", work / "sa.kubeconfig"),
        log_path=work / "operator.log",
        scope=["--all-namespaces"],
    )
    env.start()
    try:
        yield env, [team_a, team_b]
    finally:
        env.stop()
        admin.run("delete", "-f", "-", stdin=rbac, check=False)
        for ns in (home, team_a, team_b):
            admin.run("delete", "namespace", ns, "--wait=false", check=False)


def test_pools_in_any_namespace_are_reconciled(cluster_op: tuple[OperatorEnv, list[str]]) -> None:
    env, namespaces = cluster_op
    for ns in namespaces:
        env.admin.run(
            "create", "-n", ns, "-f", "-",
            stdin=f'{{"apiVersion": "{POOLS[0]}", "kind": "{POOLS[1]}", '
            f'"metadata": {{"name": "team"}}, "spec": {{"replicas": 1}}}}',
        )  # fmt: skip
    for ns in namespaces:
        wait_for(
            f"pool team in {ns} reconciled",
            lambda n=ns: (
                env.admin.json("get", "spp", "team", "-n", n)
                .get("status", {})
                .get("observedGeneration")
                == 1
            ),
        )
        workers = env.admin.json("get", "deployment", "team-workers", "-n", ns)
        assert workers["spec"]["replicas"] == 1
    # RBAC refusals only: a namespace that another test is deleting also answers 403 ("being
    # terminated") to a cluster-wide operator that still sees a pool in it.
    log = env.log_path.read_text().lower()
    refused = [ln for ln in log.splitlines() if "forbidden" in ln and "being terminated" not in ln]
    assert not refused, refused[-5:]
