"""The operator's pure builders: what a user of a SnakepitPool relies on in the objects it gets."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from snakepit.operator.builders import build_children, build_store_secret, child_key, new_password
from snakepit.operator.builders.common import STORE_SECRET_ANNOTATION
from snakepit.operator.builders.store import REDIS_SCRIPT
from snakepit.operator.config import OperatorConfig
from snakepit.operator.spec import Pool, parse_pool

CONFIG = OperatorConfig(
    worker_image="example/worker:1",
    router_image="example/operator:1",
    redis_image="example/redis:1",
    image_pull_secrets=("registry-cred",),
)


# A pool that opted out of TLS and auth: the tests of plain wiring below (store URL, env order,
# probe and Service ports) read it without the secured additions, which test_operator_tls.py and
# test_operator_secure_default.py check on the default (secured) pool.
PLAIN: dict[str, Any] = {"tls": {"enabled": False}, "auth": {"enabled": False}}


def make_pool(spec: dict[str, Any] | None = None, name: str = "demo") -> Pool:
    return parse_pool(
        {
            "apiVersion": "snakepit.dev/v1alpha1",
            "kind": "SnakepitPool",
            "metadata": {"name": name, "namespace": "ml", "uid": "uid-123", "generation": 3},
            "spec": spec or {},
        }
    )


def children(
    spec: dict[str, Any] | None = None, secret_uid: str | None = "sec-1"
) -> dict[str, Any]:
    built = build_children(make_pool(spec), CONFIG, secret_uid)
    keyed = {f"{o['kind']}/{o['metadata']['name']}": o for o in built}
    assert len(keyed) == len(built), "two children share a kind and name"
    return keyed


def pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod_spec(obj)["containers"]
    return dict(only)


def env(obj: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e for e in container(obj)["env"]}


def arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


# ---------------------------------------------------------------- the set of children


def test_managed_pool_owns_every_child_it_needs() -> None:
    assert sorted(children()) == sorted(
        [
            "ServiceAccount/demo-router",
            "Role/demo-router",
            "RoleBinding/demo-router",
            "Service/demo-redis",
            "StatefulSet/demo-redis",
            "Service/demo-workers",
            "Service/demo-router",
            "Service/demo-metrics",
            "Deployment/demo-workers",
            "Deployment/demo-router",
            "PodDisruptionBudget/demo-workers",
            "PodDisruptionBudget/demo-router",
            "NetworkPolicy/demo-workers",
            "NetworkPolicy/demo-router",
            "NetworkPolicy/demo-redis",
        ]
    )


def test_external_store_has_no_redis_and_policy_can_be_disabled() -> None:
    built = children(
        {
            "sessionStore": {"managed": False, "url": "redis://cache.example:6379/2"},
            "networkPolicy": {"enabled": False},
        }
    )
    assert not [k for k in built if "redis" in k]
    assert not [k for k in built if k.startswith("NetworkPolicy/")]


def test_every_child_is_owned_by_the_pool_and_labelled() -> None:
    for obj in build_children(make_pool(), CONFIG, "sec-1"):
        meta = obj["metadata"]
        assert meta["namespace"] == "ml"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "snakepit.dev/v1alpha1",
                "kind": "SnakepitPool",
                "name": "demo",
                "uid": "uid-123",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ], child_key(obj)
        labels = meta["labels"]
        assert labels["snakepit.dev/pool"] == "demo"
        assert labels["app.kubernetes.io/name"] == "snakepit"
        assert labels["app.kubernetes.io/instance"] == "demo"
        assert labels["app.kubernetes.io/managed-by"] == "snakepit-operator"
        assert labels["app.kubernetes.io/component"] in (
            "worker",
            "router",
            "session-store",
            "metrics",
        )


def test_builders_are_deterministic() -> None:
    assert build_children(make_pool(), CONFIG, "s") == build_children(make_pool(), CONFIG, "s")


# ---------------------------------------------------------------- workers


def test_worker_deployment_runs_the_adapter_with_the_pool_wiring() -> None:
    workers = children({**PLAIN, "adapter": "mypkg.models:Model", "workerConcurrency": 8})[
        "Deployment/demo-workers"
    ]
    c = container(workers)
    assert c["image"] == "example/worker:1"
    assert c["command"] == ["snakepit"]
    args = c["args"]
    assert args[0] == "worker"
    assert arg(args, "--adapter") == "mypkg.models:Model"
    assert arg(args, "--port") == "50052"
    assert arg(args, "--concurrency") == "8"
    assert arg(args, "--store") == "redis://snakepit@demo-redis:6379/0"
    assert arg(args, "--router") == "demo-router:50051"
    assert arg(args, "--drain-timeout") == "25"
    assert c["ports"][0] == {"name": "grpc", "containerPort": 50052, "protocol": "TCP"}


def test_worker_env_wires_pod_name_and_password_secret() -> None:
    e = env(children()["Deployment/demo-workers"])
    assert e["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert e["SNAKEPIT_STORE_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "demo-redis-auth", "key": "password"}
    }
    assert "value" not in e["SNAKEPIT_STORE_PASSWORD"]


def test_user_env_is_appended_and_replaces_ours_by_name() -> None:
    workers = children(
        {
            **PLAIN,
            "env": [
                {"name": "MODEL", "value": "small"},
                {"name": "POD_NAME", "value": "fixed"},
            ],
            "envFrom": [{"configMapRef": {"name": "cfg"}}],
        }
    )["Deployment/demo-workers"]
    names = [v["name"] for v in container(workers)["env"]]
    assert names == ["POD_NAME", "POD_NAMESPACE", "SNAKEPIT_STORE_PASSWORD", "MODEL"]
    assert env(workers)["POD_NAME"] == {"name": "POD_NAME", "value": "fixed"}
    assert container(workers)["envFrom"] == [{"configMapRef": {"name": "cfg"}}]


def test_resources_pass_through_unchanged() -> None:
    resources = {"requests": {"cpu": "500m", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    router_resources = {"requests": {"cpu": "100m"}}
    store_resources = {"limits": {"memory": "512Mi"}}
    built = children(
        {
            "resources": resources,
            "router": {"resources": router_resources},
            "sessionStore": {"resources": store_resources},
        }
    )
    assert container(built["Deployment/demo-workers"])["resources"] == resources
    assert container(built["Deployment/demo-router"])["resources"] == router_resources
    assert container(built["StatefulSet/demo-redis"])["resources"] == store_resources


def test_rolling_update_never_drops_capacity_and_lets_workers_drain() -> None:
    built = children({"drainTimeoutSeconds": 40})
    for name in ("Deployment/demo-workers", "Deployment/demo-router"):
        assert built[name]["spec"]["strategy"] == {
            "type": "RollingUpdate",
            "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1},
        }
    workers = built["Deployment/demo-workers"]
    assert arg(container(workers)["args"], "--drain-timeout") == "40"
    linger = float(arg(container(workers)["args"], "--drain-linger"))
    assert pod_spec(workers)["terminationGracePeriodSeconds"] > 40 + linger


def test_grpc_probes_on_workers_and_router() -> None:
    built = children(PLAIN)  # with TLS they use the health port: test_operator_tls.py
    for name, port in (("Deployment/demo-workers", 50052), ("Deployment/demo-router", 50051)):
        c = container(built[name])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"] == {"port": port}, (name, probe)


def test_every_pod_is_hardened() -> None:
    for name, obj in children().items():
        if obj["kind"] not in ("Deployment", "StatefulSet"):
            continue
        pod = pod_spec(obj)
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] == 10001, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        sc = container(obj)["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False, name
        assert sc["readOnlyRootFilesystem"] is True, name
        assert sc["capabilities"] == {"drop": ["ALL"]}, name
        (tmp,) = [v for v in pod["volumes"] if v["name"] == "tmp"]
        assert tmp["emptyDir"]["sizeLimit"], name  # /tmp cannot fill the node's disk
        assert {"name": "tmp", "mountPath": "/tmp"} in container(obj)["volumeMounts"], name
        resources = container(obj)["resources"]  # requests and a memory limit by default
        assert resources["requests"]["memory"] and resources["limits"]["memory"], name


def test_workers_get_no_api_token_router_gets_its_own_identity() -> None:
    built = children()
    assert pod_spec(built["Deployment/demo-workers"])["automountServiceAccountToken"] is False
    router = pod_spec(built["Deployment/demo-router"])
    assert router["serviceAccountName"] == "demo-router"
    assert router["automountServiceAccountToken"] is True


def test_pod_template_overrides_reach_worker_pods_without_breaking_selection() -> None:
    workers = children(
        {
            "podTemplate": {
                "metadata": {"labels": {"team": "ml"}, "annotations": {"a": "b"}},
                "nodeSelector": {"gpu": "true"},
                "tolerations": [{"key": "gpu", "operator": "Exists"}],
                "affinity": {"nodeAffinity": {}},
                "serviceAccountName": "model-reader",
                "priorityClassName": "high",
                "imagePullSecrets": [{"name": "private"}],
            }
        }
    )["Deployment/demo-workers"]
    template = workers["spec"]["template"]
    assert template["metadata"]["labels"]["team"] == "ml"
    assert template["metadata"]["labels"]["snakepit.dev/pool"] == "demo"
    assert template["metadata"]["annotations"]["a"] == "b"
    pod = template["spec"]
    assert pod["nodeSelector"] == {"gpu": "true"}
    assert pod["tolerations"] == [{"key": "gpu", "operator": "Exists"}]
    assert pod["affinity"] == {"nodeAffinity": {}}
    assert pod["serviceAccountName"] == "model-reader"
    assert pod["priorityClassName"] == "high"
    assert pod["imagePullSecrets"] == [{"name": "private"}, {"name": "registry-cred"}]
    selector = workers["spec"]["selector"]["matchLabels"]
    assert selector.items() <= template["metadata"]["labels"].items()


def test_worker_service_is_headless_and_publishes_ready_pods_only() -> None:
    svc = children()["Service/demo-workers"]
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is False
    assert svc["spec"]["ports"] == [
        {"name": "grpc", "port": 50052, "targetPort": "grpc", "protocol": "TCP"}
    ]
    workers = children()["Deployment/demo-workers"]
    assert svc["spec"]["selector"] == workers["spec"]["selector"]["matchLabels"]


# ---------------------------------------------------------------- router


def test_router_runs_the_operator_image_and_discovers_the_worker_service() -> None:
    router = children({**PLAIN, "workerConcurrency": 2, "session": {"maxSessions": 50}})[
        "Deployment/demo-router"
    ]
    c = container(router)
    assert c["image"] == "example/operator:1"
    args = c["args"]
    assert args[0] == "router"
    assert arg(args, "--workers-service") == "demo-workers"
    assert arg(args, "--worker-concurrency") == "2"
    assert arg(args, "--max-sessions") == "50"
    e = env(router)
    assert e["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}
    assert e["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert e["POD_IP"]["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert e["SNAKEPIT_STORE_URL"] == {
        "name": "SNAKEPIT_STORE_URL",
        "value": "redis://snakepit@demo-redis:6379/0",
    }
    assert e["SNAKEPIT_STORE_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "demo-redis-auth"


def test_router_service_type_port_and_annotations_come_from_the_spec() -> None:
    svc = children(
        {
            **PLAIN,
            "router": {
                "serviceType": "NodePort",
                "port": 9000,
                "nodePort": 30900,
                "serviceAnnotations": {"lb": "internal"},
            },
        }
    )["Service/demo-router"]
    assert svc["spec"]["type"] == "NodePort"
    assert svc["spec"]["ports"] == [
        {"name": "grpc", "port": 9000, "targetPort": "grpc", "protocol": "TCP", "nodePort": 30900}
    ]
    assert svc["metadata"]["annotations"] == {"lb": "internal"}
    workers = children({**PLAIN, "router": {"port": 9000}})["Deployment/demo-workers"]
    assert arg(container(workers)["args"], "--router") == "demo-router:9000"
    # With TLS (the default) workers call the router's internal port, whatever the public one.
    workers = children({"router": {"port": 9000}})["Deployment/demo-workers"]
    assert arg(container(workers)["args"], "--router") == "demo-router:50053"


def test_router_role_grants_endpointslice_reads_only() -> None:
    built = children()
    assert built["Role/demo-router"]["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = built["RoleBinding/demo-router"]
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": "demo-router",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "demo-router", "namespace": "ml"}
    ]


# ---------------------------------------------------------------- session store


def test_managed_redis_statefulset_keeps_data_and_hides_the_password() -> None:
    sts = children({"sessionStore": {"storage": {"size": "5Gi", "storageClassName": "fast"}}})[
        "StatefulSet/demo-redis"
    ]
    c = container(sts)
    assert c["image"] == "example/redis:1"
    assert "appendonly yes" in c["command"][-1]
    assert all("$REDIS_PASSWORD" not in part for part in c["command"][:-1])
    assert env(sts)["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "demo-redis-auth",
        "key": "password",
    }
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["resources"] == {"requests": {"storage": "5Gi"}}
    assert claim["spec"]["storageClassName"] == "fast"
    assert sts["spec"]["persistentVolumeClaimRetentionPolicy"]["whenDeleted"] == "Delete"
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]


def test_store_image_from_spec_wins_over_operator_default() -> None:
    sts = children({"sessionStore": {"image": "mirror/redis:7"}})["StatefulSet/demo-redis"]
    assert container(sts)["image"] == "mirror/redis:7"


def test_external_store_wires_url_and_optional_password_secret() -> None:
    built = children(
        {
            "sessionStore": {
                "managed": False,
                "url": "rediss://cache.example:6380/1",
                "passwordSecretRef": {"name": "cache-cred", "key": "token"},
            }
        }
    )
    workers = built["Deployment/demo-workers"]
    assert arg(container(workers)["args"], "--store") == "rediss://cache.example:6380/1"
    assert env(workers)["SNAKEPIT_STORE_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
        "name": "cache-cred",
        "key": "token",
    }
    assert env(built["Deployment/demo-router"])["SNAKEPIT_STORE_URL"]["value"] == (
        "rediss://cache.example:6380/1"
    )
    no_password = children({"sessionStore": {"managed": False, "url": "redis://c:6379/0"}})
    assert "SNAKEPIT_STORE_PASSWORD" not in env(no_password["Deployment/demo-workers"])


def test_store_secret_uid_rolls_every_pod_that_holds_the_password() -> None:
    first = children(secret_uid="uid-a")
    second = children(secret_uid="uid-b")
    for name in ("Deployment/demo-workers", "Deployment/demo-router", "StatefulSet/demo-redis"):
        annotations = first[name]["spec"]["template"]["metadata"]["annotations"]
        assert annotations[STORE_SECRET_ANNOTATION] == "uid-a"
        assert first[name] != second[name]


def test_store_secret_carries_the_given_password_and_is_immutable() -> None:
    secret = build_store_secret(make_pool(), "s3cret-pw")
    assert secret["kind"] == "Secret"
    assert secret["metadata"]["name"] == "demo-redis-auth"
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-123"
    assert secret["immutable"] is True
    assert base64.b64decode(secret["data"]["password"]) == b"s3cret-pw"


def test_new_passwords_are_long_random_and_url_safe() -> None:
    passwords = {new_password() for _ in range(50)}
    assert len(passwords) == 50
    for pw in passwords:
        assert len(pw) >= 40
        assert pw.replace("-", "").replace("_", "").isalnum()


def test_redis_script_writes_the_password_to_a_private_file_not_argv() -> None:
    assert "umask 077" in REDIS_SCRIPT
    assert "exec redis-server /tmp/redis.conf" in REDIS_SCRIPT


# ---------------------------------------------------------------- disruption and network


def test_disruption_budgets_allow_one_pod_down_at_a_time() -> None:
    built = children()
    for name, component in (("demo-workers", "worker"), ("demo-router", "router")):
        pdb = built[f"PodDisruptionBudget/{name}"]
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["selector"]["matchLabels"] == {
            "snakepit.dev/pool": "demo",
            "app.kubernetes.io/component": component,
        }
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_network_policies_admit_only_the_pools_own_pods() -> None:
    built = children(
        {"networkPolicy": {"directClients": [{"podSelector": {"matchLabels": {"app": "x"}}}]}}
    )
    workers = built["NetworkPolicy/demo-workers"]["spec"]
    assert workers["podSelector"] == {
        "matchLabels": {"snakepit.dev/pool": "demo", "app.kubernetes.io/component": "worker"}
    }
    assert workers["policyTypes"] == ["Ingress", "Egress"]
    rule, _metrics = workers["ingress"]
    assert rule["from"] == [
        {"podSelector": {"matchLabels": {"snakepit.dev/pool": "demo"}}},
        {"podSelector": {"matchLabels": {"app": "x"}}},
    ]
    assert rule["ports"] == [{"protocol": "TCP", "port": 50052}]
    redis = built["NetworkPolicy/demo-redis"]["spec"]
    assert redis["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "session-store"
    assert redis["ingress"] == [
        {
            "from": [{"podSelector": {"matchLabels": {"snakepit.dev/pool": "demo"}}}],
            "ports": [{"protocol": "TCP", "port": 6379}],
        }
    ]


@pytest.mark.parametrize("replicas", [0, 1, 7])
def test_replicas_reach_the_worker_deployment(replicas: int) -> None:
    built = children({"replicas": replicas, "router": {"replicas": 3}})
    assert built["Deployment/demo-workers"]["spec"]["replicas"] == replicas
    assert built["Deployment/demo-router"]["spec"]["replicas"] == 3


# ---------------------------------------------------------------- spec.auth (issue 12)
AUTH = {
    "auth": {
        "serviceAccounts": [
            {"namespace": "apps", "name": "caller"},
            {"namespace": "ci", "name": "*"},
        ],
        "tokensSecret": "demo-tokens",
        "admins": ["ops"],
        "directMode": ["batch"],
    }
}


def test_with_auth_off_nothing_changes() -> None:
    built = children(PLAIN)
    router = built["Deployment/demo-router"]
    assert "--ticket-key" not in container(router)["args"]
    assert [v["name"] for v in pod_spec(router)["volumes"]] == ["tmp"]
    assert "SNAKEPIT_TICKET_PUBLIC_KEY" not in env(built["Deployment/demo-workers"])


def test_spec_auth_turns_authentication_on_in_routers_and_tickets_in_workers() -> None:
    built = children(AUTH)
    router = container(built["Deployment/demo-router"])
    args = router["args"]
    assert arg(args, "--auth-tokens") == "/etc/snakepit/tokens/tokens"
    assert arg(args, "--ticket-key") == "/etc/snakepit/ticket/key.pem"
    assert arg(args, "--ticket-audience") == "ml.demo"
    assert arg(args, "--token-audience") == "snakepit"
    accounts = [args[i + 1] for i, a in enumerate(args) if a == "--allow-service-account"]
    assert accounts == ["apps/caller", "ci/*"]
    assert arg(args, "--admin") == "ops" and arg(args, "--allow-direct") == "batch"
    volumes = {v["name"]: v for v in pod_spec(built["Deployment/demo-router"])["volumes"]}
    assert volumes["ticket-key"]["secret"]["secretName"] == "demo-ticket-key"
    assert volumes["ticket-key"]["secret"]["items"] == [{"key": "key.pem", "path": "key.pem"}]
    assert volumes["auth-tokens"]["secret"]["secretName"] == "demo-tokens"
    assert all(m["readOnly"] for m in router["volumeMounts"] if m["name"] != "tmp")
    # Secret files are root's: without an fsGroup the router's non-root user needs "other"
    # read, or it cannot read its own key and tokens (it then fails at start).
    router_pod = pod_spec(built["Deployment/demo-router"])
    assert "fsGroup" not in router_pod["securityContext"]
    assert volumes["ticket-key"]["secret"]["defaultMode"] & 0o004
    assert volumes["auth-tokens"]["secret"]["defaultMode"] & 0o004

    workers = built["Deployment/demo-workers"]
    worker_env = env(workers)
    assert worker_env["SNAKEPIT_TICKET_PUBLIC_KEY"]["valueFrom"]["secretKeyRef"] == {
        "name": "demo-ticket-key",
        "key": "public",
    }
    assert worker_env["SNAKEPIT_TICKET_AUDIENCE"]["value"] == "ml.demo"
    # The private key is never in a worker pod.
    assert "ticket-key" not in [v["name"] for v in pod_spec(workers)["volumes"]]


def test_ticket_secret_holds_a_matching_key_pair() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from snakepit.operator.builders.auth import build_ticket_secret
    from snakepit.security.tickets import TicketIssuer, TicketVerifier, load_public_key

    secret = build_ticket_secret(make_pool(AUTH))
    assert secret["immutable"] is True and secret["metadata"]["name"] == "demo-ticket-key"
    private = serialization.load_pem_private_key(
        base64.b64decode(secret["data"]["key.pem"]), password=None
    )
    assert isinstance(private, Ed25519PrivateKey)
    public = load_public_key(base64.b64decode(secret["data"]["public"]).decode())
    ticket = TicketIssuer(private, audience="ml.demo").issue("alice")
    assert TicketVerifier(public, audience="ml.demo").verify(ticket).name == "alice"


def test_spec_auth_service_accounts_need_namespace_and_name() -> None:
    from snakepit.operator.spec import SpecError

    with pytest.raises(SpecError, match="namespace and a name"):
        make_pool({"auth": {"serviceAccounts": [{"name": "caller"}]}})
