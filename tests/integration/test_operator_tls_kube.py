"""spec.tls against a real kube-apiserver and the real operator process (the control-plane tier
of test_operator_kube.py: no pod runs, so this proves what the API server stores, not TLS
between pods). The CRD refuses TLS without a Secret, the operator mounts the Secret into every
pod and wires the TLS flags, and an explicit opt-out shows in status and as a Warning event."""

from __future__ import annotations

import json
from typing import Any

import pytest

from snakepit.operator.reconciler import TLS_DISABLED_MESSAGE

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


def test_tls_without_a_secret_is_refused_by_the_api_server(op: OperatorEnv) -> None:
    body = {
        "apiVersion": POOLS[0],
        "kind": POOLS[1],
        "metadata": {"name": "bad-tls"},
        "spec": {"tls": {"enabled": True}},
    }
    proc = op.admin.run(
        "apply", "-n", op.namespace, "--dry-run=server", "-f", "-",
        stdin=json.dumps(body), check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "spec.tls.secretName" in proc.stderr, proc.stderr
    assert "needs spec.tls.secretName" in proc.stderr, proc.stderr


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
