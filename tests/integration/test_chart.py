"""The Helm chart: lint, values schema, CRD drift, and rendered manifests the API server accepts.

Rendering needs only ``helm``; validation with ``kubectl apply --dry-run=server`` needs a real
kube-apiserver (the same one the operator tests use).
"""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from snakepit.metrics.dashboard import dashboard
from snakepit.operator.handlers import CHILD_RESOURCES
from tests.integration.test_operator_kube import (
    CHART,
    CRD,
    TOKENREVIEW_BINDING,
    Kubectl,
    admin_kubeconfig,
    install_crd,
    tool,
)

KUBE_VERSION = "1.34.4"  # any version the chart's kubeVersion admits; the cluster tests use theirs


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([tool("helm"), *args], capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def render(*values: str, namespace: str = "ml", kube_version: str = KUBE_VERSION) -> str:
    return helm(
        "template",
        "snakepit",
        str(CHART),
        "--namespace",
        namespace,
        "--kube-version",
        kube_version,
        *values,
    ).stdout


def docs(*values: str, namespace: str = "ml") -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(render(*values, namespace=namespace)) if d]


def of_kind(rendered: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in rendered if d["kind"] == kind]


# ---------------------------------------------------------------- no cluster needed


def test_chart_crd_is_identical_to_crds_dir() -> None:
    copy = CHART / "crds" / CRD.name
    assert copy.read_bytes() == CRD.read_bytes(), (
        f"{copy} drifted from {CRD}: cp {CRD.relative_to(CHART.parents[1])} {copy.relative_to(CHART.parents[1])}"
    )


def test_helm_lint_is_clean() -> None:
    out = helm("lint", "--strict", str(CHART), "--set", "pools[0].name=demo").stdout
    assert "0 chart(s) failed" in out


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (["--set", "image.pullPolicy=Sometimes"], "pullPolicy"),
        (["--set", "pools[0].name=Bad_Name"], "/pools/0/name"),
        (["--set", "livenessPort=80"], "livenessPort"),
        (["--set", "unknownKey=1"], "unknownKey"),
        (
            ["--set", "watch.allNamespaces=true", "--set", "watch.namespaces[0]=a"],
            "exclude each other",
        ),
    ],
)
def test_bad_values_are_refused_with_a_reason(values: list[str], message: str) -> None:
    proc = helm("template", "x", str(CHART), "--kube-version", KUBE_VERSION, *values, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr


def test_names_yaml_would_read_as_booleans_stay_strings() -> None:
    """A release called "on" in namespace "off" with a pool "y" must not become true/false."""
    rendered = helm(
        "template",
        "on",
        str(CHART),
        "--namespace",
        "off",
        "--kube-version",
        KUBE_VERSION,
        "--set",
        "watch.namespaces={yes,no}",
        "--set",
        "pools[0].name=y",
    ).stdout
    for doc in (d for d in yaml.safe_load_all(rendered) if d):
        meta = doc["metadata"]
        values = [meta["name"], meta.get("namespace", ""), *meta.get("labels", {}).values()]
        assert all(isinstance(v, str) for v in values), (doc["kind"], meta)


def test_operator_deployment_is_one_recreated_hardened_replica_with_liveness() -> None:
    (deployment,) = of_kind(docs(), "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "snakepit/operator:dev"
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"] == [
        "operator",
        "--liveness-port=8080",
        "--metrics-port=9090",
        "--namespace=ml",
    ]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "liveness"}
    assert {"name": "liveness", "containerPort": 8080, "protocol": "TCP"} in container["ports"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SNAKEPIT_ROUTER_IMAGE"] == "snakepit/operator:dev"
    assert env["SNAKEPIT_REDIS_IMAGE"] == "snakepit/redis:dev"
    assert env["SNAKEPIT_WORKER_IMAGE"] == "snakepit/worker:dev"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_operator_metrics_port_and_scrape_annotations() -> None:
    (deployment,) = of_kind(docs(), "Deployment")
    template = deployment["spec"]["template"]
    (container,) = template["spec"]["containers"]
    assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in container["ports"]
    assert template["metadata"]["annotations"]["prometheus.io/port"] == "9090"
    (off,) = of_kind(docs("--set", "metrics.port=0"), "Deployment")
    (container,) = off["spec"]["template"]["spec"]["containers"]
    assert not [a for a in container["args"] if a.startswith("--metrics-port")]
    assert "annotations" not in off["spec"]["template"]["metadata"]


def test_dashboard_configmap_carries_the_generated_dashboard() -> None:
    (configmap,) = of_kind(docs(), "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = json.loads(configmap["data"]["snakepit.json"])
    assert shipped == json.loads(json.dumps(dashboard()))
    assert not of_kind(docs("--set", "grafanaDashboard.enabled=false"), "ConfigMap")


def test_pod_monitors_only_where_the_prometheus_operator_is_installed() -> None:
    assert not of_kind(docs(), "PodMonitor")
    monitors = of_kind(docs("--api-versions", "monitoring.coreos.com/v1/PodMonitor"), "PodMonitor")
    pools, operator = sorted(monitors, key=lambda m: m["metadata"]["name"])[::-1]
    assert pools["spec"]["selector"]["matchLabels"] == {"snakepit.dev/metrics": "true"}
    assert pools["spec"]["namespaceSelector"] == {"any": True}
    (endpoint,) = pools["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics"
    assert {r["targetLabel"] for r in endpoint["relabelings"]} == {"pool", "component"}
    assert operator["metadata"]["name"].endswith("-operator")


def test_watch_modes_choose_the_rbac_scope() -> None:
    default = docs()
    assert [r["metadata"]["namespace"] for r in of_kind(default, "Role")] == ["ml"]
    assert not operator_cluster_roles(default)

    listed = docs("--set", "watch.namespaces={team-a,team-b}")
    assert sorted(r["metadata"]["namespace"] for r in of_kind(listed, "Role")) == [
        "team-a",
        "team-b",
    ]
    assert sorted(b["metadata"]["namespace"] for b in of_kind(listed, "RoleBinding")) == [
        "team-a",
        "team-b",
    ]
    (operator,) = of_kind(listed, "Deployment")
    args = operator["spec"]["template"]["spec"]["containers"][0]["args"]
    assert "--namespace=team-a" in args and "--namespace=team-b" in args

    cluster = docs("--set", "watch.allNamespaces=true")
    assert len(operator_cluster_roles(cluster)) == 1
    assert len(of_kind(cluster, "ClusterRoleBinding")) == 3  # the operator's, TokenReview's two
    assert not of_kind(cluster, "Role")
    (operator,) = of_kind(cluster, "Deployment")
    assert "--all-namespaces" in operator["spec"]["template"]["spec"]["containers"][0]["args"]


def operator_cluster_roles(rendered: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The operator's own ClusterRole, not those extending the built-in view/edit roles nor the
    TokenReview ones (every mode has those)."""
    return [
        r
        for r in of_kind(rendered, "ClusterRole")
        if not any(
            k.startswith("rbac.authorization.k8s.io/aggregate-to") for k in r["metadata"]["labels"]
        )
        and not r["metadata"]["name"].startswith(TOKENREVIEW_BINDING)
    ]


def test_pools_are_granted_through_the_built_in_view_and_edit_roles() -> None:
    roles = {r["metadata"]["name"]: r for r in of_kind(docs(), "ClusterRole")}
    view, edit = roles["snakepit-view"], roles["snakepit-edit"]
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert view["rules"][0]["verbs"] == ["get", "list", "watch"]
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert "rbac.authorization.k8s.io/aggregate-to-view" not in edit["metadata"]["labels"]
    assert {"create", "patch", "delete"} <= set(edit["rules"][0]["verbs"])
    unaggregated = docs(
        "--set", "rbac.aggregateToEdit=false", "--set", "rbac.aggregateToView=false"
    )
    assert all(r["metadata"]["name"].startswith(TOKENREVIEW_BINDING)
               for r in of_kind(unaggregated, "ClusterRole"))  # fmt: skip
    assert not of_kind(docs("--set", "rbac.create=false"), "ClusterRole")


def _granted(rules: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(g, r) for rule in rules for g in rule["apiGroups"] for r in rule["resources"]}


def test_rbac_grants_exactly_what_the_operator_uses() -> None:
    (role,) = of_kind(docs(), "Role")
    children = {(group, plural) for group, _, plural in CHILD_RESOURCES}
    expected = children | {
        ("snakepit.dev", "snakepitpools"),
        ("snakepit.dev", "snakepitpools/status"),
        ("snakepit.dev", "snakepitpools/finalizers"),
        ("", "secrets"),
        ("", "events"),
        ("discovery.k8s.io", "endpointslices"),
    }
    assert _granted(role["rules"]) == expected
    verbs = {
        (g, r): set(rule["verbs"])
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    secret_rules = {
        tuple(rule.get("resourceNames", ())): set(rule["verbs"])
        for rule in role["rules"]
        if "secrets" in rule["resources"]
    }
    # Secrets are created, and only the two fixed-name Secrets of operator-issued certificates
    # are ever read or changed (a patch answers with the Secret: a read in disguise).
    assert secret_rules == {
        (): {"create"},
        ("snakepit-ca", "snakepit-certs"): {"get", "patch"},
    }, secret_rules
    assert verbs[("discovery.k8s.io", "endpointslices")] == {"get", "list", "watch"}
    assert verbs[("snakepit.dev", "snakepitpools")] == {"get", "list", "watch"}
    assert all("*" not in rule["verbs"] and "*" not in rule["resources"] for rule in role["rules"])
    (cluster_role,) = operator_cluster_roles(docs("--set", "watch.allNamespaces=true"))
    assert _granted(cluster_role["rules"]) == expected | {
        ("apiextensions.k8s.io", "customresourcedefinitions")
    }


def test_token_reviews_are_granted_through_one_binding_the_operator_may_only_fill() -> None:
    """Routers review tokens through the chart's binding; the operator may change that binding's
    subjects (get/patch/update by name, bind on its role by name) and nothing else of RBAC."""
    for values in ([], ["--set", "watch.allNamespaces=true"], ["--set", "watch.namespaces={a,b}"]):
        rendered = docs(*values)
        roles = {r["metadata"]["name"]: r for r in of_kind(rendered, "ClusterRole")}
        bindings = {b["metadata"]["name"]: b for b in of_kind(rendered, "ClusterRoleBinding")}
        assert roles[TOKENREVIEW_BINDING]["rules"] == [
            {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
             "verbs": ["create"]}
        ]  # fmt: skip
        reviewers = bindings[TOKENREVIEW_BINDING]
        assert reviewers["roleRef"]["name"] == TOKENREVIEW_BINDING
        assert not reviewers.get("subjects")  # the operator's to fill
        binder = f"{TOKENREVIEW_BINDING}-binder"
        assert roles[binder]["rules"] == [
            {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterrolebindings"],
             "resourceNames": [TOKENREVIEW_BINDING], "verbs": ["get", "patch", "update"]},
            {"apiGroups": ["rbac.authorization.k8s.io"], "resources": ["clusterroles"],
             "resourceNames": [TOKENREVIEW_BINDING], "verbs": ["bind"]},
        ]  # fmt: skip
        assert bindings[binder]["subjects"] == [
            {"kind": "ServiceAccount", "name": "snakepit", "namespace": "ml"}
        ]
        (operator,) = of_kind(rendered, "Deployment")
        env = {
            e["name"]: e.get("value")
            for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]
        }
        assert env["SNAKEPIT_TOKENREVIEW_BINDING"] == TOKENREVIEW_BINDING
    (operator,) = of_kind(docs("--set", "rbac.create=false"), "Deployment")
    env = {
        e["name"]: e.get("value")
        for e in operator["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert env["SNAKEPIT_TOKENREVIEW_BINDING"] == ""


def test_pools_in_values_and_the_helm_test_hook() -> None:
    rendered = docs(
        "--set",
        "pools[0].name=demo",
        "--set",
        "pools[0].namespace=apps",
        "--set",
        "pools[0].spec.replicas=3",
        "--set",
        "pools[0].spec.router.port=9000",
    )
    (pool,) = of_kind(rendered, "SnakepitPool")
    assert pool["metadata"] == {
        "name": "demo",
        "namespace": "apps",
        "labels": pool["metadata"]["labels"],
    }
    assert pool["spec"] == {"replicas": 3, "router": {"port": 9000}}
    (test,) = of_kind(rendered, "Pod")
    assert test["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = test["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["TARGET"] == "demo-router.apps.svc:9000"
    assert "workers_ready" in container["command"][-1]
    assert not of_kind(docs(), "Pod"), "no pool declared, no test to run"
    named = docs("--set", "test.pool=external", "--set", "test.namespace=prod")
    (test,) = of_kind(named, "Pod")
    assert {"name": "TARGET", "value": "external-router.prod.svc:50051"} in test["spec"][
        "containers"
    ][0]["env"]


def _test_pod_of(*pool_spec: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The helm test pod for a pool ``demo`` declared with these spec values: (volumes by
    name, the container's env by name)."""
    values = [a for kv in pool_spec for a in ("--set", f"pools[0].spec.{kv}")]
    (test,) = of_kind(docs("--set", "pools[0].name=demo", *values), "Pod")
    (container,) = test["spec"]["containers"]
    return (
        {v["name"]: v for v in test["spec"]["volumes"]},
        {e["name"]: e.get("value") for e in container["env"]},
    )


def test_the_helm_test_pod_carries_a_token_and_the_pool_ca_unless_the_pool_opts_out() -> None:
    """Pools are secure by default: the test pod calls with a projected token of a
    ServiceAccount of the pool's namespace (the default callers) and trusts the pool's CA."""
    (test,) = of_kind(docs("--set", "test.pool=demo", "--set", "test.namespace=apps"), "Pod")
    assert test["spec"]["serviceAccountName"] == "default"
    volumes, env = _test_pod_of()
    token = volumes["token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "snakepit"
    assert volumes["ca"]["secret"]["secretName"] == "snakepit-certs"
    assert volumes["ca"]["secret"]["items"] == [{"key": "demo.ca.crt", "path": "ca.crt"}]
    assert env["SNAKEPIT_TLS_CA"] == "/etc/snakepit-ca/ca.crt"
    volumes, _ = _test_pod_of("tls.secretName=demo-tls", "auth.audience=ml-pools")
    assert volumes["ca"]["secret"]["secretName"] == "demo-tls"
    token = volumes["token"]["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "ml-pools"
    volumes, env = _test_pod_of("tls.enabled=false", "auth.enabled=false")
    assert set(volumes) == {"tmp"} and "SNAKEPIT_TLS_CA" not in env


# ---------------------------------------------------------------- against the API server


@pytest.fixture(scope="module")
def admin(request: pytest.FixtureRequest) -> Iterator[Kubectl]:
    kubectl = Kubectl(admin_kubeconfig(request))
    install_crd(kubectl)
    yield kubectl


@pytest.fixture
def namespaces(admin: Kubectl) -> Iterator[list[str]]:
    suffix = uuid.uuid4().hex[:6]
    names = [f"chart-{suffix}-a", f"chart-{suffix}-b"]
    for name in names:
        admin.run("create", "namespace", name)
    yield names
    for name in names:
        admin.run("delete", "namespace", name, "--wait=false", check=False)


@pytest.mark.kube
@pytest.mark.parametrize(
    "mode",
    ["release-namespace", "listed-namespaces", "all-namespaces", "with-pools"],
)
def test_rendered_chart_is_accepted_by_the_api_server(
    admin: Kubectl, namespaces: list[str], mode: str
) -> None:
    home, other = namespaces
    values = {
        "release-namespace": [],
        "listed-namespaces": ["--set", f"watch.namespaces={{{home},{other}}}"],
        "all-namespaces": ["--set", "watch.allNamespaces=true"],
        "with-pools": [
            "--set",
            "pools[0].name=demo",
            "--set",
            f"pools[1].name=ext,pools[1].namespace={other}",
            "--set",
            "pools[1].spec.sessionStore.managed=false",
            "--set",
            "pools[1].spec.sessionStore.url=redis://r:6379/0",
        ],
    }[mode]
    manifest = render(*values, namespace=home, kube_version=admin.server_version())
    proc = admin.run("apply", "--dry-run=server", "-f", "-", stdin=manifest, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "created (server dry run)" in proc.stdout


@pytest.mark.kube
def test_roles_name_no_cluster_scoped_resource(admin: Kubectl) -> None:
    cluster_scoped = set(
        admin.run("api-resources", "--namespaced=false", "-o", "name").stdout.split()
    )
    for values in ([], ["--set", "watch.namespaces={a,b}"]):
        for role in of_kind(docs(*values), "Role"):
            for group, resource in _granted(role["rules"]):
                base = resource.split("/")[0]
                qualified = f"{base}.{group}" if group else base
                assert qualified not in cluster_scoped, f"Role grants cluster-scoped {qualified}"


@pytest.mark.kube
def test_notes_render_for_an_install(admin: Kubectl, namespaces: list[str]) -> None:
    proc = helm(
        "install",
        "notes",
        str(CHART),
        "--dry-run=server",
        "-n",
        namespaces[0],
        f"--kubeconfig={admin.kubeconfig}",
        "--set",
        "pools[0].name=demo",
    )
    notes = proc.stdout.split("NOTES:", 1)[1]
    assert f"It serves SnakepitPools in: {namespaces[0]}." in notes
    assert "kubectl scale spp/demo" in notes
    assert "helm test notes" in notes
