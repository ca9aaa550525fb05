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
    current_certificate,
    forget_pool_patch,
    issue_certificate,
    leaf_data,
    namespace_secret,
    new_pool_ca,
)
from snakepit.operator.builders.tls import CERTS_SECRET, certificate_names
from snakepit.operator.controller import Controller
from snakepit.operator.kube import ApiError
from snakepit.operator.spec import SpecError
from snakepit.security.tls import POOL_NAME

from .test_operator_builders import children, make_pool, pod_spec
from .test_operator_reconciler import FakeKube, pool_body, setup

NOW = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
ISSUED = {"tls": {"enabled": True, "certificateLifetime": "90m"}}
CERTS = ("v1", "Secret", "ml", CERTS_SECRET)
CAS = ("v1", "Secret", "ml", CA_SECRET)
POOL = ("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")


def _pem(data: dict[str, Any], key: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(base64.b64decode(data[key]))


def test_the_lifetime_is_a_duration_with_a_floor() -> None:
    assert make_pool(ISSUED).spec.tls.certificate_lifetime == 90 * 60
    two_days = make_pool({"tls": {"certificateLifetime": "2d"}})
    assert two_days.spec.tls.certificate_lifetime == 2 * 86400
    with pytest.raises(SpecError, match="not a duration"):
        make_pool({"tls": {"enabled": True, "certificateLifetime": "1 week"}})
    with pytest.raises(SpecError, match="at least 60s"):
        make_pool({"tls": {"enabled": True, "certificateLifetime": "30s"}})


def test_the_leaf_names_the_pool_and_chains_to_the_pools_ca() -> None:
    pool = make_pool(ISSUED)
    ca = new_pool_ca(pool)
    cert = issue_certificate(pool, ca, NOW)
    data = leaf_data(pool, ca, cert)
    assert set(data) == {"demo.tls.crt", "demo.tls.key", "demo.ca.crt"}
    leaf = _pem(data, "demo.tls.crt")
    leaf.verify_directly_issued_by(_pem(data, "demo.ca.crt"))
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert POOL_NAME in sans.get_values_for_type(x509.DNSName)
    assert "demo-router.ml.svc.cluster.local" in sans.get_values_for_type(x509.DNSName)
    assert len(sans) == len(certificate_names(pool))
    life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert datetime.timedelta(minutes=90) <= life <= datetime.timedelta(minutes=96)  # backdated
    assert cert.renew_after == NOW + datetime.timedelta(minutes=90 * RENEW_FRACTION)


def test_a_leaf_stays_until_its_renewal_time_unless_its_ca_or_lifetime_changed() -> None:
    pool = make_pool(ISSUED)
    ca = new_pool_ca(pool)
    start = datetime.datetime.now(datetime.UTC)  # the leaf's own validity starts now
    secret = namespace_secret(
        "ml", CERTS_SECRET, leaf_data(pool, ca, issue_certificate(pool, ca, start))
    )
    kept = current_certificate(pool, ca, secret, start + datetime.timedelta(minutes=30))
    assert kept is not None and kept.issued is None
    assert abs(kept.renew_after - (start + datetime.timedelta(minutes=60))) < datetime.timedelta(
        seconds=2
    )
    assert current_certificate(pool, ca, secret, start + datetime.timedelta(minutes=61)) is None
    assert current_certificate(pool, new_pool_ca(pool), secret, start) is None  # CA replaced
    longer = make_pool({"tls": {"enabled": True, "certificateLifetime": "3h"}})
    assert current_certificate(longer, ca, secret, start) is None
    assert current_certificate(pool, ca, None, start) is None
    other = make_pool(ISSUED, name="other")
    assert current_certificate(other, ca, secret, start) is None  # another pool's keys


def test_pods_mount_only_their_pools_keys_under_the_usual_names() -> None:
    built = children(ISSUED)
    for name in ("Deployment/demo-router", "Deployment/demo-workers", "StatefulSet/demo-redis"):
        (volume,) = [v for v in pod_spec(built[name])["volumes"] if v["name"] == "tls"]
        assert volume["secret"]["secretName"] == CERTS_SECRET
        assert volume["secret"]["items"] == [
            {"key": "demo.tls.crt", "path": "tls.crt"},
            {"key": "demo.tls.key", "path": "tls.key"},
            {"key": "demo.ca.crt", "path": "ca.crt"},
        ]


async def test_passes_issue_once_renew_when_due_and_restore_a_deleted_leaf() -> None:
    kube, reconciler, _ = setup(ISSUED)
    start = datetime.datetime.now(datetime.UTC)
    now = [start]
    reconciler.wall = lambda: now[0]
    result = await reconciler.reconcile(("ml", "demo"))
    assert result is not None and not result.problems
    assert {"Secret/snakepit-ca", "Secret/snakepit-certs"} <= set(kube.created)
    first = dict(kube.objects[CERTS]["data"])
    status = kube.objects[POOL]["status"]
    assert status["tls"] == "Issued by the operator (Secret snakepit-certs)"
    assert status["certificate"]["secretName"] == CERTS_SECRET
    assert result.requeue_after is not None and 3590 < result.requeue_after <= 3600

    # Not yet due: nothing written.
    now[0] = start + datetime.timedelta(minutes=30)
    result = await reconciler.reconcile(("ml", "demo"))
    assert result is not None and result.requeue_after is not None
    assert 1790 < result.requeue_after <= 1800
    assert kube.patched == [] and kube.objects[CERTS]["data"] == first

    # Due: a new leaf from the same CA, merged in place.
    now[0] = start + datetime.timedelta(minutes=61)
    await reconciler.reconcile(("ml", "demo"))
    renewed = kube.objects[CERTS]["data"]
    assert kube.patched == ["Secret/snakepit-certs"]
    assert _pem(renewed, "demo.tls.crt").serial_number != _pem(first, "demo.tls.crt").serial_number
    assert renewed["demo.ca.crt"] == first["demo.ca.crt"]

    # Its keys deleted by someone: back on the next pass, from the same CA.
    for key in ("demo.tls.crt", "demo.tls.key", "demo.ca.crt"):
        del kube.objects[CERTS]["data"][key]
    await reconciler.reconcile(("ml", "demo"))
    assert kube.objects[CERTS]["data"]["demo.ca.crt"] == first["demo.ca.crt"]

    # The only Secrets ever read are the two with fixed names.
    assert {g for g in kube.gets if g.startswith("Secret/")} == {
        "Secret/snakepit-ca",
        "Secret/snakepit-certs",
    }


async def test_each_pool_of_a_namespace_has_its_own_ca_in_the_shared_secrets() -> None:
    kube, reconciler, _ = setup(ISSUED)
    kube.put(pool_body(ISSUED) | {"metadata": {**pool_body()["metadata"], "name": "other"}})
    await reconciler.reconcile(("ml", "demo"))
    await reconciler.reconcile(("ml", "other"))
    certs, cas = kube.objects[CERTS]["data"], kube.objects[CAS]["data"]
    assert {"demo.crt", "demo.key", "other.crt", "other.key"} == set(cas)
    assert certs["demo.ca.crt"] != certs["other.ca.crt"]
    with pytest.raises(ValueError):  # a leaf of one pool does not chain to another's CA
        _pem(certs, "demo.tls.crt").verify_directly_issued_by(_pem(certs, "other.ca.crt"))
    assert kube.created.count("Secret/snakepit-ca") == 1


async def test_a_restarted_operator_keeps_the_pools_ca() -> None:
    kube, reconciler, _ = setup(ISSUED)
    await reconciler.reconcile(("ml", "demo"))
    ca = kube.objects[CAS]["data"]["demo.crt"]
    _, fresh, _ = setup(ISSUED)
    fresh.kube = kube  # type: ignore[assignment]
    fresh.wall = lambda: datetime.datetime.now(datetime.UTC) + datetime.timedelta(hours=2)
    await fresh.reconcile(("ml", "demo"))  # due: renews, with the CA already there
    assert kube.objects[CERTS]["data"]["demo.ca.crt"] == ca


async def test_a_ca_written_concurrently_wins_and_is_used() -> None:
    """The CA is added conditionally: if another writer got there first, its CA is used."""

    class Racing(FakeKube):
        raced = False

        async def patch(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            if not self.raced and args[3] == CA_SECRET:
                self.raced = True  # someone adds this pool's CA right between get and patch
                stored = self.objects[CAS]
                winner = new_pool_ca(make_pool(ISSUED))
                stored["data"]["demo.crt"] = base64.b64encode(winner.cert_pem).decode()
                stored["data"]["demo.key"] = base64.b64encode(winner.key_pem).decode()
                stored["metadata"]["resourceVersion"] = "raced"
            return await super().patch(*args, **kwargs)

    kube = Racing()
    kube.put(pool_body(ISSUED))
    kube.put(namespace_secret("ml", CA_SECRET, {}))
    _, reconciler, _ = setup(ISSUED)
    reconciler.kube = kube  # type: ignore[assignment]
    await reconciler.reconcile(("ml", "demo"))
    assert kube.raced
    assert kube.objects[CERTS]["data"]["demo.ca.crt"] == kube.objects[CAS]["data"]["demo.crt"]


def test_forgetting_a_pool_drops_only_its_keys_conditionally() -> None:
    ca = namespace_secret("ml", CA_SECRET, {"demo.crt": "a", "demo.key": "b", "demo2.crt": "c"})
    ca["metadata"]["resourceVersion"] = "7"
    assert forget_pool_patch(CA_SECRET, ca, "demo") == {
        "metadata": {"resourceVersion": "7"},
        "data": {"demo.crt": None, "demo.key": None},
    }
    certs = namespace_secret(
        "ml", CERTS_SECRET, {"demo.tls.crt": "a", "demo.tls.key": "b", "demo.ca.crt": "c"}
    )
    patch = forget_pool_patch(CERTS_SECRET, certs, "demo")
    assert patch is not None and set(patch["data"]) == {
        "demo.tls.crt",
        "demo.tls.key",
        "demo.ca.crt",
    }
    assert forget_pool_patch(CA_SECRET, ca, "other") is None  # nothing of it there
    assert forget_pool_patch(CERTS_SECRET, None, "demo") is None  # no Secret at all


async def test_a_deleted_pools_keys_leave_the_shared_secrets_and_the_others_stay() -> None:
    kube, reconciler, _ = setup(ISSUED)
    kube.put(pool_body(ISSUED) | {"metadata": {**pool_body()["metadata"], "name": "other"}})
    controller = Controller(reconciler, reconciler.children)
    await reconciler.reconcile(("ml", "demo"))
    await reconciler.reconcile(("ml", "other"))
    other = {k: v for k, v in kube.objects[CERTS]["data"].items() if k.startswith("other.")}
    going = kube.objects[POOL]
    going["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    await reconciler.reconcile(("ml", "demo"))  # going, pods may still mount it: kept
    assert "demo.tls.crt" in kube.objects[CERTS]["data"]
    del kube.objects[POOL]
    controller.on_pool_event("DELETED", going)
    assert len(controller.queue) == 1  # a pass to drop its keys
    await reconciler.reconcile(("ml", "demo"))
    assert set(kube.objects[CAS]["data"]) == {"other.crt", "other.key"}
    assert kube.objects[CERTS]["data"] == other
    kube.patched.clear()
    await reconciler.reconcile(("ml", "demo"))  # again: nothing left to patch
    assert kube.patched == []


async def test_forgetting_a_pool_never_drops_a_ca_added_after_the_read() -> None:
    """A new pool of the same name adds its CA between the read and the patch: 409, and the
    retried pass (the pool exists again) keeps it."""

    class Racing(FakeKube):
        raced = False

        async def patch(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
            if not self.raced and args[3] == CA_SECRET:
                self.raced = True
                self.objects[CAS]["metadata"]["resourceVersion"] = "raced"
            return await super().patch(*args, **kwargs)

    kube = Racing()
    kube.put(pool_body(ISSUED))
    _, reconciler, _ = setup(ISSUED)
    reconciler.kube = kube  # type: ignore[assignment]
    await reconciler.reconcile(("ml", "demo"))
    ca = kube.objects[CAS]["data"]["demo.crt"]
    del kube.objects[POOL]
    with pytest.raises(ApiError) as refused:
        await reconciler.reconcile(("ml", "demo"))
    assert refused.value.status == 409
    assert kube.objects[CAS]["data"]["demo.crt"] == ca
