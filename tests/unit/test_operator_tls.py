"""spec.tls in the operator's builders: the Secret mounted where the processes read it, TLS
flags, the router's internal port, plaintext health probes, Redis over TLS, and the status and
Warning event of an explicit opt-out."""

from __future__ import annotations

from typing import Any

from snakepit.operator.builders.store import REDIS_SCRIPT
from snakepit.operator.builders.tls import HEALTH_PORT, INTERNAL_PORT, certificate_names
from snakepit.operator.reconciler import TLS_DISABLED_MESSAGE
from snakepit.operator.status import tls_status
from snakepit.security.tls import POOL_NAME

from .test_operator_builders import arg, children, container, make_pool, pod_spec
from .test_operator_reconciler import setup

TLS = {"tls": {"enabled": True, "secretName": "demo-tls"}}


def mounted(obj: dict[str, Any]) -> dict[str, str]:
    volumes = {v["name"]: v for v in pod_spec(obj)["volumes"]}
    return {
        m["mountPath"]: volumes.get(m["name"], {}).get("secret", {}).get("secretName", "")
        for m in container(obj)["volumeMounts"]
    }


def test_without_tls_nothing_changes() -> None:
    built = children({"tls": {"enabled": False}})
    for name in ("Deployment/demo-router", "Deployment/demo-workers", "StatefulSet/demo-redis"):
        assert "/etc/snakepit/tls" not in mounted(built[name])
    assert "--pool-tls-dir" not in container(built["Deployment/demo-router"])["args"]
    assert container(built["Deployment/demo-workers"])["readinessProbe"]["grpc"]["port"] == 50052
    assert [p["name"] for p in built["Service/demo-router"]["spec"]["ports"]] == ["grpc"]
    assert "port 0" not in REDIS_SCRIPT.split("else")[1]


def test_every_pod_mounts_the_secret_and_uses_it() -> None:
    built = children(TLS)
    router, workers = built["Deployment/demo-router"], built["Deployment/demo-workers"]
    redis = built["StatefulSet/demo-redis"]
    for obj in (router, workers, redis):
        assert mounted(obj)["/etc/snakepit/tls"] == "demo-tls"
    router_args, worker_args = container(router)["args"], container(workers)["args"]
    assert arg(router_args, "--tls-cert") == "/etc/snakepit/tls/tls.crt"
    assert arg(router_args, "--tls-key") == "/etc/snakepit/tls/tls.key"
    assert arg(router_args, "--pool-tls-dir") == arg(worker_args, "--pool-tls-dir")
    assert arg(router_args, "--internal-port") == str(INTERNAL_PORT)
    # Workers call the router on its mutual-TLS port, through the Service.
    assert arg(worker_args, "--router") == f"demo-router:{INTERNAL_PORT}"
    ports = {p["name"]: p["port"] for p in built["Service/demo-router"]["spec"]["ports"]}
    assert ports == {"grpc": 50051, "internal": INTERNAL_PORT}
    # The kubelet's gRPC probes speak no TLS: they use the plaintext health-only port.
    for obj in (router, workers):
        assert arg(container(obj)["args"], "--health-port") == str(HEALTH_PORT)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container(obj)[probe]["grpc"]["port"] == HEALTH_PORT


def test_the_managed_redis_speaks_tls_only_and_clients_check_it() -> None:
    built = children(TLS)
    redis = container(built["StatefulSet/demo-redis"])
    assert {"name": "REDIS_TLS_DIR", "value": "/etc/snakepit/tls"} in redis["env"]
    assert (
        "--tls --cacert /etc/snakepit/tls/ca.crt" in redis["readinessProbe"]["exec"]["command"][2]
    )
    for line in ("echo 'port 0'", "echo 'tls-port 6379'", "tls-auth-clients optional"):
        assert line in REDIS_SCRIPT
    url = "rediss://snakepit@demo-redis:6379/0?ssl_ca_certs=/etc/snakepit/tls/ca.crt"
    assert arg(container(built["Deployment/demo-workers"])["args"], "--store") == url
    router_env = {e["name"]: e for e in container(built["Deployment/demo-router"])["env"]}
    assert router_env["SNAKEPIT_STORE_URL"]["value"] == url


def test_pool_pods_may_reach_the_internal_port_and_only_they() -> None:
    policy = children(TLS)["NetworkPolicy/demo-router"]["spec"]
    internal = [
        r for r in policy["ingress"] if {"protocol": "TCP", "port": INTERNAL_PORT} in r["ports"]
    ]
    assert len(internal) == 1 and internal[0]["from"] == [
        {"podSelector": {"matchLabels": {"snakepit.dev/pool": "demo"}}}
    ]
    worker_egress = children(TLS)["NetworkPolicy/demo-workers"]["spec"]["egress"]
    assert any(
        {"protocol": "TCP", "port": INTERNAL_PORT} in r.get("ports", []) for r in worker_egress
    )


def test_the_certificate_must_name_the_pool_and_its_services() -> None:
    names = certificate_names(make_pool(TLS))
    assert names[0] == POOL_NAME
    assert {"demo-router.ml.svc", "demo-redis.ml.svc.cluster.local", "127.0.0.1"} <= set(names)


def test_tls_status_names_the_secret_and_shows_an_opt_out() -> None:
    issued = make_pool({"tls": {"enabled": True}})  # no Secret: the operator issues one
    assert issued.spec.tls.operator_issued and issued.spec.tls.certificate_lifetime == 7 * 86400
    assert tls_status(issued) == "Issued by the operator (Secret snakepit-certs)"
    assert make_pool({"tls": {"secretName": "s"}}).spec.tls.enabled  # a Secret means TLS
    assert not make_pool({"tls": {"secretName": "s"}}).spec.tls.operator_issued
    assert tls_status(make_pool(TLS)) == "Secret demo-tls"
    assert tls_status(make_pool()) == "Issued by the operator (Secret snakepit-certs)"
    assert (
        tls_status(make_pool({"tls": {"enabled": False}})) == "Disabled (spec.tls.enabled: false)"
    )


async def test_an_explicit_opt_out_is_a_warning_event() -> None:
    kube, reconciler, _ = setup({"tls": {"enabled": False}})
    await reconciler.reconcile(("ml", "demo"))
    assert ("Warning", "TLSDisabled", TLS_DISABLED_MESSAGE) in kube.events
    assert kube.objects[("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")]["status"][
        "tls"
    ] == ("Disabled (spec.tls.enabled: false)")
    quiet, reconciler, _ = setup()
    await reconciler.reconcile(("ml", "demo"))
    assert not [e for e in quiet.events if e[1] == "TLSDisabled"]


def test_the_pods_arguments_are_what_the_commands_accept() -> None:
    from snakepit.cli import build_parser

    built = children(TLS)
    for name in ("Deployment/demo-router", "Deployment/demo-workers"):
        args = build_parser().parse_args(container(built[name])["args"])
        assert args.pool_tls_dir == "/etc/snakepit/tls"
        assert args.health_port == HEALTH_PORT
