"""Operator-issued certificates (spec.tls without secretName): the pure builders, and what a
reconcile pass does with them against the in-memory API of test_operator_reconciler.py (the
real API server: tests/integration/test_operator_tls_kube.py)."""

from __future__ import annotations

import base64
import datetime
from typing import Any

import pytest
from cryptography import x509

from snakepit.operator.builders.certs import (
    CA_SECRET,
    RENEW_FRACTION,
    build_ca_secret,
    build_certificate_secret,
    ca_from_secret,
    certificate_status,
    issue_certificate,
    new_namespace_ca,
    renewal_due,
)
from snakepit.operator.builders.tls import certificate_names
from snakepit.operator.spec import SpecError
from snakepit.security.tls import POOL_NAME

from .test_operator_builders import children, make_pool
from .test_operator_reconciler import setup
from .test_operator_tls import mounted

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
ISSUED = {"tls": {"enabled": True, "certificateLifetime": "90m"}}
SECRET = ("v1", "Secret", "ml", "demo-tls")
POOL = ("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")


def _cert(secret: dict[str, Any], key: str = "tls.crt") -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(secret["data"][key]))


def test_the_lifetime_is_a_duration_with_a_floor() -> None:
    assert make_pool(ISSUED).spec.tls.certificate_lifetime == 90 * 60
    assert make_pool({"tls": {"certificateLifetime": "2d"}}).spec.tls.certificate_lifetime == (
        2 * 86400
    )
    with pytest.raises(SpecError, match="not a duration"):
        make_pool({"tls": {"enabled": True, "certificateLifetime": "1 week"}})
    with pytest.raises(SpecError, match="at least 60s"):
        make_pool({"tls": {"enabled": True, "certificateLifetime": "30s"}})


def test_the_leaf_names_the_pool_chains_to_the_namespace_ca_and_has_the_mounted_shape() -> None:
    pool = make_pool(ISSUED)
    ca = new_namespace_ca("ml")
    cert = issue_certificate(pool, ca, NOW)
    secret = build_certificate_secret(pool, ca, cert)
    assert secret["type"] == "kubernetes.io/tls"
    assert set(secret["data"]) == {"tls.crt", "tls.key", "ca.crt"}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == pool.uid
    leaf, root = _cert(secret), _cert(secret, "ca.crt")
    leaf.verify_directly_issued_by(root)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert POOL_NAME in sans.get_values_for_type(x509.DNSName)
    assert "demo-router.ml.svc.cluster.local" in sans.get_values_for_type(x509.DNSName)
    assert len(sans) == len(certificate_names(pool))
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(minutes=90) <= life <= datetime.timedelta(minutes=96)  # backdated
    assert cert.renew_after == NOW + datetime.timedelta(minutes=90 * RENEW_FRACTION)


def test_the_namespace_ca_belongs_to_no_pool_and_round_trips() -> None:
    ca = new_namespace_ca("ml")
    secret = build_ca_secret("ml", ca)
    assert secret["metadata"]["name"] == CA_SECRET and "ownerReferences" not in secret["metadata"]
    assert secret["immutable"] is True
    assert ca_from_secret(secret).cert == ca.cert
    with pytest.raises(ValueError, match="lacks"):
        ca_from_secret({"data": {}})


def test_renewal_is_due_when_unrecorded_late_or_the_lifetime_changed() -> None:
    pool = make_pool(ISSUED)
    status = certificate_status(pool, issue_certificate(pool, new_namespace_ca("ml"), NOW))
    assert renewal_due(pool, None, NOW)
    assert not renewal_due(pool, status, NOW + datetime.timedelta(minutes=59))
    assert renewal_due(pool, status, NOW + datetime.timedelta(minutes=60))
    longer = make_pool({"tls": {"enabled": True, "certificateLifetime": "3h"}})
    assert renewal_due(longer, status, NOW)


def test_pods_mount_the_issued_secret() -> None:
    built = children(ISSUED)
    for name in ("Deployment/demo-router", "Deployment/demo-workers", "StatefulSet/demo-redis"):
        assert mounted(built[name])["/etc/snakepit/tls"] == "demo-tls"


async def test_passes_issue_once_renew_when_due_restore_a_deleted_secret_and_keep_the_ca() -> None:
    kube, reconciler, _ = setup(ISSUED)
    now = [NOW]
    reconciler.wall = lambda: now[0]
    result = await reconciler.reconcile(("ml", "demo"))
    assert result is not None and not result.problems
    assert "Secret/snakepit-ca" in kube.created and "Secret/demo-tls" in kube.applied
    first = kube.objects[SECRET]
    status = kube.objects[POOL]["status"]
    assert status["tls"] == "Issued by the operator (Secret demo-tls)"
    assert status["certificate"]["renewAfter"] == "2030-01-01T01:00:00Z"
    assert result.requeue_after == 3600

    # Not yet due: the Secret is offered with create only (409), nothing replaced.
    kube.applied.clear()
    now[0] = NOW + datetime.timedelta(minutes=30)
    result = await reconciler.reconcile(("ml", "demo"))
    assert result is not None and result.requeue_after == 1800
    assert "Secret/demo-tls" not in kube.applied and kube.objects[SECRET] == first

    # Due: a new leaf from the same CA replaces the Secret in place.
    now[0] = NOW + datetime.timedelta(minutes=61)
    await reconciler.reconcile(("ml", "demo"))
    renewed = kube.objects[SECRET]
    assert "Secret/demo-tls" in kube.applied
    assert _cert(renewed).serial_number != _cert(first).serial_number
    assert renewed["data"]["ca.crt"] == first["data"]["ca.crt"]
    assert kube.objects[POOL]["status"]["certificate"]["renewAfter"] == "2030-01-01T02:01:00Z"

    # Deleted by someone: back on the next pass, still from the same CA.
    del kube.objects[SECRET]
    await reconciler.reconcile(("ml", "demo"))
    assert kube.objects[SECRET]["data"]["ca.crt"] == first["data"]["ca.crt"]

    # The only Secret ever read is the CA, by name, and only when issuing.
    assert {g for g in kube.gets if g.startswith("Secret/")} == {"Secret/snakepit-ca"}
    assert kube.created.count("Secret/snakepit-ca") == 1


async def test_a_second_operator_reuses_the_namespace_ca() -> None:
    kube, reconciler, _ = setup(ISSUED)
    await reconciler.reconcile(("ml", "demo"))
    ca_cert = kube.objects[("v1", "Secret", "ml", CA_SECRET)]["data"]["ca.crt"]
    _, fresh, _ = setup(ISSUED)
    fresh.kube = kube  # a restarted operator: nothing in memory, the same API
    kube.objects[POOL].pop("status")
    await fresh.reconcile(("ml", "demo"))
    assert kube.objects[SECRET]["data"]["ca.crt"] == ca_cert
    assert kube.created.count("Secret/snakepit-ca") == 1


async def test_an_unusable_ca_secret_is_a_problem_not_a_crash() -> None:
    kube, reconciler, _ = setup(ISSUED)
    kube.put({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": CA_SECRET,
              "namespace": "ml"}, "data": {}})  # fmt: skip
    with pytest.raises(Exception, match="snakepit-ca lacks"):
        await reconciler.reconcile(("ml", "demo"))
