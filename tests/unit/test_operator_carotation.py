"""Rotating a pool's operator-issued CA (builders/carotation.py): each step of the pure state
machine, and the passes that publish them against the in-memory API of
test_operator_reconciler.py. That the published files serve calls with none failing, on real
processes: tests/integration/test_tls.py."""

from __future__ import annotations

import base64
import datetime
from typing import Any

import pytest
from cryptography import x509

from snakepit.operator.builders.carotation import (
    ROTATE_ANNOTATION,
    CaRotation,
    ca_due,
    next_step_after,
    read_rotation,
    rotation_data,
    rotation_step,
)
from snakepit.operator.builders.certs import CA_SECRET, forget_pool_patch, new_pool_ca
from snakepit.operator.builders.tls import CERTS_SECRET
from snakepit.security.localca import LocalCA

from .test_operator_builders import make_pool
from .test_operator_reconciler import setup

NOW = datetime.datetime.now(datetime.UTC)
SETTLE = datetime.timedelta(minutes=3)
ISSUED = {"tls": {"enabled": True, "certificateLifetime": "90m"}}
CERTS = ("v1", "Secret", "ml", CERTS_SECRET)
CAS = ("v1", "Secret", "ml", CA_SECRET)
POOL = ("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")


def _certs(bundle: bytes) -> list[x509.Certificate]:
    return x509.load_pem_x509_certificates(bundle)


def test_a_rotation_publishes_the_new_ca_then_switches_leaves_then_drops_the_old() -> None:
    old, new = LocalCA.generate("old"), LocalCA.generate("new")
    steady = CaRotation(old)
    assert steady.phase == "steady" and _certs(steady.trusted()) == [old.cert]
    assert rotation_step(steady, NOW, request="", new_ca=pytest.fail) is None  # nothing asked

    # 1. Asked (the annotation changed): both CAs trusted, the old one still signs.
    published = rotation_step(steady, NOW, request="r1", new_ca=lambda: new)
    assert published is not None and published.phase == "published"
    assert published.current is old and published.pending is new
    assert _certs(published.trusted()) == [old.cert, new.cert]
    assert (published.since, published.request) == (NOW, "r1")
    # Not settled yet: it stays, whatever is asked meanwhile.
    almost = NOW + SETTLE - datetime.timedelta(seconds=1)
    assert rotation_step(published, almost, request="r2", new_ca=pytest.fail) is None
    assert next_step_after(published, NOW, SETTLE) == SETTLE.total_seconds()

    # 2. Settled: the new CA signs; the old one is still trusted, its key gone.
    later = NOW + SETTLE
    switched = rotation_step(published, later, request="r1", new_ca=pytest.fail, settle=SETTLE)
    assert switched is not None and switched.phase == "switched"
    assert switched.current is new and switched.pending is None
    assert switched.retiring == old.cert_pem and switched.since == later
    assert {c.serial_number for c in _certs(switched.trusted())} == {
        old.cert.serial_number,
        new.cert.serial_number,
    }
    assert rotation_step(switched, later, request="r1", new_ca=pytest.fail) is None

    # 3. Settled again: only the new CA.
    done = rotation_step(switched, later + SETTLE, request="r1", new_ca=pytest.fail)
    assert done is not None and done.phase == "steady"
    assert _certs(done.trusted()) == [new.cert]
    assert rotation_step(done, later + 2 * SETTLE, request="r1", new_ca=pytest.fail) is None
    assert next_step_after(done, NOW, SETTLE) == float("inf")


def test_a_ca_at_two_thirds_of_its_life_rotates_by_itself() -> None:
    ca = LocalCA.generate("short", days=3)
    start, end = ca.cert.not_valid_before_utc, ca.cert.not_valid_after_utc
    two_thirds = start + (end - start) * 2 / 3
    minute = datetime.timedelta(minutes=1)
    assert not ca_due(ca, two_thirds - minute)
    assert ca_due(ca, two_thirds + minute)
    moved = rotation_step(
        CaRotation(ca), two_thirds + minute, request="", new_ca=lambda: LocalCA.generate("next")
    )
    assert moved is not None and moved.phase == "published"


def test_the_state_round_trips_through_the_secret_and_damage_counts_as_none() -> None:
    old, new = LocalCA.generate("old"), LocalCA.generate("new")
    state = CaRotation(old, pending=new, since=NOW, request="r1")
    data = {k: v for k, v in rotation_data("demo", "demo.crt", "demo.key", state).items() if v}
    back = read_rotation("demo", old, data)
    assert back.pending is not None and back.pending.cert_pem == new.cert_pem
    assert (back.since, back.request, back.retiring) == (NOW, "r1", None)
    # A rotation's keys leave with the pool.
    patch = forget_pool_patch(CA_SECRET, {"data": data, "metadata": {}}, "demo")
    assert patch is not None and set(patch["data"]) == set(data)
    data["demo.rotation"] = base64.b64encode(b"{not json").decode()
    assert read_rotation("demo", old, data).since is None


async def test_passes_rotate_the_ca_on_the_annotation_step_by_step() -> None:
    kube, reconciler, _ = setup(ISSUED)
    now = [NOW]
    reconciler.wall = lambda: now[0]
    reconciler.ca_settle = SETTLE
    await reconciler.reconcile(("ml", "demo"))
    first_ca = _certs(base64.b64decode(kube.objects[CAS]["data"]["demo.crt"]))[0]

    def files() -> tuple[list[x509.Certificate], x509.Certificate]:
        data = kube.objects[CERTS]["data"]
        bundle = _certs(base64.b64decode(data["demo.ca.crt"]))
        return bundle, x509.load_pem_x509_certificate(base64.b64decode(data["demo.tls.crt"]))

    async def step(minutes: float, annotation: str = "1") -> dict[str, Any]:
        now[0] = NOW + datetime.timedelta(minutes=minutes)
        kube.objects[POOL]["metadata"]["annotations"] = {ROTATE_ANNOTATION: annotation}
        kube.objects[POOL]["metadata"]["generation"] += 1
        result = await reconciler.reconcile(("ml", "demo"))
        assert result is not None and not result.problems
        return {"status": kube.objects[POOL]["status"], "requeue": result.requeue_after}

    published = await step(1)
    bundle, leaf = files()
    assert bundle[0] == first_ca and len(bundle) == 2
    leaf.verify_directly_issued_by(first_ca)  # leaves still from the old CA
    assert published["status"]["certificate"]["caRotation"] == "published"
    assert published["requeue"] == SETTLE.total_seconds()

    assert (await step(2))["status"]["certificate"]["caRotation"] == "published"  # settling

    switched = await step(4)
    bundle, leaf = files()
    new_ca = bundle[0]
    assert new_ca != first_ca and set(bundle) == {first_ca, new_ca}
    leaf.verify_directly_issued_by(new_ca)
    assert switched["status"]["certificate"]["caRotation"] == "switched"
    assert "demo.next.key" not in kube.objects[CAS]["data"]

    done = await step(8)
    bundle, leaf = files()
    assert bundle == [new_ca]
    leaf.verify_directly_issued_by(new_ca)
    assert "caRotation" not in done["status"]["certificate"]
    assert not {"demo.next.crt", "demo.old.crt"} & set(kube.objects[CAS]["data"])

    await step(20)  # the same annotation value: no second rotation
    assert files()[0] == [new_ca]


def test_each_new_ca_of_a_pool_has_its_own_name() -> None:
    """Two of a pool's CAs are trusted side by side during a rotation; chain building looks
    issuers up by name, so the names differ."""
    pool = make_pool(ISSUED)
    assert new_pool_ca(pool).cert.subject != new_pool_ca(pool).cert.subject
