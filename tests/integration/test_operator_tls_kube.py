"""spec.tls against a real kube-apiserver and the real operator process (the control-plane tier
of test_operator_kube.py: no pod runs, so this proves what the API server stores, not TLS
between pods). Without a Secret the operator issues the certificate from the namespace's CA,
renews it, restores it when deleted, and reads no Secret but the CA (its RBAC, rendered from the
chart, allows nothing else); with one it mounts that Secret into every pod and wires the TLS
flags; an explicit opt-out shows in status and as a Warning event."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography import x509

from snakepit.operator.reconciler import TLS_DISABLED_MESSAGE
from snakepit.security.tls import POOL_NAME

from .test_operator_kube import POOLS, OperatorEnv, events_of, op, wait_for

pytestmark = pytest.mark.kube  # its `op` fixture asks for the cluster at run time

__all__ = ["op"]  # the module-scoped operator fixture, shared with test_operator_kube.py


def _container(env: OperatorEnv, kind: str, name: str) -> dict[str, Any]:
    api_version = "apps/v1"
    obj = wait_for(f"{kind} {name}", lambda: env.get(api_version, kind, name))
    spec = obj["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {**container, "volumes": volumes}


def test_a_lifetime_that_is_not_a_duration_is_refused_by_the_api_server(op: OperatorEnv) -> None:
    body = {
        "apiVersion": POOLS[0],
        "kind": POOLS[1],
        "metadata": {"name": "bad-tls"},
        "spec": {"tls": {"enabled": True, "certificateLifetime": "one week"}},
    }
    proc = op.admin.run(
        "apply", "-n", op.namespace, "--dry-run=server", "-f", "-",
        stdin=json.dumps(body), check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "spec.tls.certificateLifetime" in proc.stderr, proc.stderr


def _leaf(env: OperatorEnv, pool: str) -> tuple[x509.Certificate, str]:
    """A pool's leaf in the shared Secret snakepit-certs, and its ca.crt (base64)."""

    def present() -> dict[str, str] | None:
        secret = env.get("v1", "Secret", "snakepit-certs")
        data = (secret or {}).get("data") or {}
        return data if f"{pool}.tls.crt" in data else None

    data = wait_for(f"{pool}'s certificate", present)
    cert = x509.load_pem_x509_certificate(base64.b64decode(data[f"{pool}.tls.crt"]))
    return cert, data[f"{pool}.ca.crt"]


def _can_i(env: OperatorEnv, *what: str) -> bool:
    account = f"system:serviceaccount:{env.namespace}:snakepit"
    proc = env.admin.run("auth", "can-i", *what, "-n", env.namespace, "--as", account, check=False)
    return proc.stdout.strip() == "yes"


def test_the_operator_issues_renews_and_restores_certificates(op: OperatorEnv) -> None:
    spec = {"replicas": 1, "router": {"replicas": 1},
            "tls": {"enabled": True, "certificateLifetime": "60s"}}  # fmt: skip
    op.create_pool("issued", spec)
    leaf, ca_pem = _leaf(op, "issued")
    cas = op.get("v1", "Secret", "snakepit-ca")
    assert cas is not None and cas["data"]["issued.crt"] == ca_pem
    assert not cas["metadata"].get("ownerReferences")  # outlives every pool
    ca = x509.load_pem_x509_certificate(base64.b64decode(ca_pem))
    leaf.verify_directly_issued_by(ca)
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert {POOL_NAME, f"issued-router.{op.namespace}.svc"} <= set(
        names.get_values_for_type(x509.DNSName)
    )
    for kind, name in (("Deployment", "issued-router"), ("Deployment", "issued-workers"),
                       ("StatefulSet", "issued-redis")):  # fmt: skip
        volume = _container(op, kind, name)["volumes"]["tls"]["secret"]
        assert volume["secretName"] == "snakepit-certs"
        assert {i["key"] for i in volume["items"]} == {
            "issued.tls.crt", "issued.tls.key", "issued.ca.crt"
        }  # fmt: skip
    pool = wait_for(
        "status.certificate",
        lambda: (p := op.pool("issued")).get("status", {}).get("certificate") and p,
    )
    assert pool["status"]["tls"] == "Issued by the operator (Secret snakepit-certs)"

    # Renewed after 2/3 of its life (40 s), in place, by the same CA.
    renewed = wait_for(
        "a renewed certificate",
        lambda: (c := _leaf(op, "issued"))[0].serial_number != leaf.serial_number and c,
        timeout=120,
        interval=1,
    )
    assert renewed[1] == ca_pem
    renewed[0].verify_directly_issued_by(ca)
    assert renewed[0].not_valid_after_utc > leaf.not_valid_after_utc

    # Its keys removed: back on a later pass (no watch on Secrets: resync or renewal timer).
    op.admin.run(
        "patch", "secret", "snakepit-certs", "-n", op.namespace, "--type=json", "-p",
        json.dumps([{"op": "remove", "path": "/data/issued.tls.crt"}]),
    )  # fmt: skip
    assert _leaf(op, "issued")[1] == ca_pem

    # A second pool of the namespace: its own CA, so its certificate is worth nothing here.
    op.create_pool("issued-two", {"replicas": 0, "tls": {"enabled": True}})
    two, two_ca = _leaf(op, "issued-two")
    assert two_ca != ca_pem
    with pytest.raises(ValueError):
        two.verify_directly_issued_by(ca)

    # The operator may read the two fixed-name Secrets and no other.
    assert _can_i(op, "get", "secrets/snakepit-ca")
    assert _can_i(op, "patch", "secrets/snakepit-certs")
    assert not _can_i(op, "get", "secrets/issued-redis-auth")
    assert not _can_i(op, "patch", "secrets/issued-redis-auth")
    assert not _can_i(op, "list", "secrets")

    # A deleted pool's keys leave both shared Secrets (they have no owner to follow); the
    # other pool's stay.
    op.admin.run("delete", "spp", "issued-two", "-n", op.namespace, "--wait=false")

    def pruned() -> bool:
        keys = {k for name in ("snakepit-ca", "snakepit-certs")
                for k in ((op.get("v1", "Secret", name) or {}).get("data") or {})}  # fmt: skip
        return not any(k.startswith("issued-two.") for k in keys) and "issued.crt" in keys

    wait_for("issued-two's keys pruned", pruned, timeout=60, interval=1)
    assert _leaf(op, "issued")[1] == ca_pem
    op.admin.run("delete", "spp", "issued", "-n", op.namespace, "--wait=false")


def test_a_pool_with_a_tls_secret_mounts_it_everywhere(op: OperatorEnv) -> None:
    op.create_pool(
        "sealed", {"replicas": 1, "router": {"replicas": 1}, "tls": {"secretName": "sealed-tls"}}
    )
    for kind, name in (("Deployment", "sealed-router"), ("Deployment", "sealed-workers"),
                       ("StatefulSet", "sealed-redis")):  # fmt: skip
        container = _container(op, kind, name)
        assert container["volumes"]["tls"]["secret"]["secretName"] == "sealed-tls"
        assert {"name": "tls", "mountPath": "/etc/snakepit/tls", "readOnly": True} in container[
            "volumeMounts"
        ]
    router = _container(op, "Deployment", "sealed-router")
    assert "--pool-tls-dir" in router["args"] and "--tls-cert" in router["args"]
    assert router["readinessProbe"]["grpc"]["port"] == 50054
    service = wait_for("router Service", lambda: op.get("v1", "Service", "sealed-router"))
    assert {p["name"] for p in service["spec"]["ports"]} == {"grpc", "internal"}
    pool = wait_for(
        "status.tls", lambda: (p := op.pool("sealed")).get("status", {}).get("tls") and p
    )
    assert pool["status"]["tls"] == "Secret sealed-tls"
    op.admin.run("delete", "spp", "sealed", "-n", op.namespace, "--wait=false")


def test_an_explicit_opt_out_is_shown_in_status_and_as_a_warning(op: OperatorEnv) -> None:
    op.create_pool("open", {"replicas": 0, "tls": {"enabled": False}})
    wait_for("TLSDisabled event", lambda: ("Warning", "TLSDisabled") in events_of(op, "open"))
    assert op.pool("open")["status"]["tls"] == "Disabled (spec.tls.enabled: false)"
    messages = op.admin.json(
        "get", "events", "-n", op.namespace, "--field-selector",
        "involvedObject.name=open,reason=TLSDisabled",
    )["items"]  # fmt: skip
    assert messages[0]["message"] == TLS_DISABLED_MESSAGE
    op.admin.run("delete", "spp", "open", "-n", op.namespace, "--wait=false")
