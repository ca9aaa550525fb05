"""Status of a pool from its children: conditions, counts, transitions and the patch written."""

from __future__ import annotations

from typing import Any

from snakepit.operator.spec import Pool, parse_pool
from snakepit.operator.status import (
    Observed,
    Problem,
    Transition,
    compute_status,
    event_for,
    rollout,
    status_patch,
)


def make_pool(spec: dict[str, Any] | None = None, generation: int = 4) -> Pool:
    return parse_pool(
        {
            "metadata": {"name": "demo", "namespace": "ml", "uid": "u", "generation": generation},
            "spec": spec or {},
        }
    )


def deployment(
    desired: int,
    ready: int,
    updated: int | None = None,
    generation: int = 2,
    observed: int = 2,
    conditions: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    return {
        "kind": "Deployment",
        "metadata": {"generation": generation},
        "spec": {"replicas": desired},
        "status": {
            "observedGeneration": observed,
            "replicas": desired,
            "updatedReplicas": desired if updated is None else updated,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "conditions": conditions or [],
        },
    }


def statefulset(ready: int) -> dict[str, Any]:
    return {
        "kind": "StatefulSet",
        "metadata": {"generation": 1},
        "spec": {"replicas": 1},
        "status": {
            "observedGeneration": 1,
            "replicas": 1,
            "updatedReplicas": 1,
            "readyReplicas": ready,
            "availableReplicas": ready,
            "currentRevision": "r1",
            "updateRevision": "r1",
        },
    }


def conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def healthy() -> Observed:
    return Observed(workers=deployment(3, 3), router=deployment(2, 2), store=statefulset(1))


def test_healthy_pool_is_ready_not_progressing_not_degraded() -> None:
    status, _ = compute_status(make_pool(), healthy(), {}, "T1")
    c = conditions(status)
    assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("True", "Available")
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == ("False", "RolloutComplete")
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("False", "AsExpected")
    assert all(x["observedGeneration"] == 4 for x in c.values())
    assert status["observedGeneration"] == 4
    assert status["replicas"] == 3
    assert status["readyReplicas"] == 3
    assert status["endpoint"] == "demo-router.ml.svc:50051"
    assert status["selector"] == "app.kubernetes.io/component=worker,snakepit.dev/pool=demo"


def test_rollout_in_progress_is_progressing_and_still_ready() -> None:
    observed = Observed(
        workers=deployment(3, 2, updated=1), router=deployment(2, 2), store=statefulset(1)
    )
    c = conditions(compute_status(make_pool(), observed, {}, "T")[0])
    assert c["Ready"]["status"] == "True"
    assert c["Progressing"]["status"] == "True"
    assert "workers: 1/3 updated" in c["Progressing"]["message"]


def test_deployment_not_yet_seen_by_its_controller_is_progressing() -> None:
    observed = Observed(
        workers=deployment(3, 3, generation=3, observed=2),
        router=deployment(2, 2),
        store=statefulset(1),
    )
    c = conditions(compute_status(make_pool(), observed, {}, "T")[0])
    assert c["Progressing"]["status"] == "True"
    assert "workers: waiting for its controller" in c["Progressing"]["message"]


def test_not_ready_reasons_name_the_missing_part() -> None:
    cases = [
        (
            Observed(workers=deployment(3, 0), router=deployment(2, 2), store=statefulset(1)),
            "NoReadyWorkers",
        ),
        (
            Observed(workers=deployment(3, 3), router=deployment(2, 0), store=statefulset(1)),
            "RouterUnavailable",
        ),
        (
            Observed(workers=deployment(3, 3), router=deployment(2, 2), store=statefulset(0)),
            "StoreUnavailable",
        ),
        (
            Observed(workers=deployment(0, 0), router=deployment(2, 2), store=statefulset(1)),
            "ScaledToZero",
        ),
        (Observed(), "NotCreated"),
    ]
    for observed, reason in cases:
        c = conditions(compute_status(make_pool(), observed, {}, "T")[0])
        assert (c["Ready"]["status"], c["Ready"]["reason"]) == ("False", reason)


def test_external_store_does_not_need_a_statefulset() -> None:
    pool = make_pool({"sessionStore": {"managed": False, "url": "redis://x:1/0"}})
    observed = Observed(workers=deployment(1, 1), router=deployment(1, 1))
    assert conditions(compute_status(pool, observed, {}, "T")[0])["Ready"]["status"] == "True"


def test_apply_failures_and_stuck_rollouts_degrade() -> None:
    observed = Observed(
        workers=deployment(3, 3),
        router=deployment(2, 2),
        store=statefulset(1),
        problems=[Problem("ApplyFailed", "Deployment demo-workers: forbidden")],
    )
    c = conditions(compute_status(make_pool(), observed, {}, "T")[0])
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == ("True", "ApplyFailed")
    assert "forbidden" in c["Degraded"]["message"]

    stuck = deployment(
        3,
        1,
        updated=1,
        conditions=[
            {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
        ],
    )
    observed = Observed(workers=stuck, router=deployment(2, 2), store=statefulset(1))
    c = conditions(compute_status(make_pool(), observed, {}, "T")[0])
    assert (c["Degraded"]["status"], c["Degraded"]["reason"]) == (
        "True",
        "ProgressDeadlineExceeded",
    )
    assert (c["Progressing"]["status"], c["Progressing"]["reason"]) == (
        "False",
        "ProgressDeadlineExceeded",
    )

    failing = deployment(
        3,
        0,
        conditions=[{"type": "ReplicaFailure", "status": "True", "message": "exceeded quota"}],
    )
    observed = Observed(workers=failing, router=deployment(2, 2), store=statefulset(1))
    c = conditions(compute_status(make_pool(), observed, {}, "T")[0])
    assert c["Degraded"]["reason"] == "ReplicaFailure"
    assert "exceeded quota" in c["Degraded"]["message"]


def test_transition_time_moves_only_when_the_status_flips() -> None:
    first, transitions = compute_status(make_pool(), healthy(), {}, "T1")
    assert {t.type for t in transitions} == {"Ready", "Progressing", "Degraded"}
    again, transitions = compute_status(make_pool(generation=5), healthy(), first, "T2")
    assert transitions == []
    assert all(c["lastTransitionTime"] == "T1" for c in again["conditions"])
    assert all(c["observedGeneration"] == 5 for c in again["conditions"])
    broken = Observed(workers=deployment(3, 0), router=deployment(2, 2), store=statefulset(1))
    later, transitions = compute_status(make_pool(generation=5), broken, again, "T3")
    assert [(t.type, t.status, t.previous) for t in transitions] == [
        ("Ready", "False", "True"),
        ("Progressing", "True", "False"),
    ]
    assert conditions(later)["Progressing"]["reason"] == "WaitingForPods"
    assert conditions(later)["Ready"]["lastTransitionTime"] == "T3"
    assert conditions(later)["Degraded"]["lastTransitionTime"] == "T1"


def test_events_for_transitions() -> None:
    assert event_for(Transition("Ready", "True", "Available", "ok", None)) == (
        "Normal",
        "Available",
        "pool is ready: ok",
    )
    assert event_for(Transition("Ready", "False", "NotCreated", "x", None)) is None
    assert event_for(Transition("Ready", "False", "NoReadyWorkers", "0/3", "True")) == (
        "Warning",
        "NoReadyWorkers",
        "pool is no longer ready: 0/3",
    )
    assert event_for(Transition("Degraded", "False", "AsExpected", "", None)) is None
    assert event_for(Transition("Degraded", "True", "ApplyFailed", "boom", "False")) == (
        "Warning",
        "ApplyFailed",
        "boom",
    )
    assert event_for(Transition("Degraded", "False", "AsExpected", "", "True"))[1] == "Recovered"  # type: ignore[index]


def test_load_balancer_address_becomes_external_endpoint() -> None:
    service = {
        "spec": {"ports": [{"port": 50051}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}},
    }
    observed = Observed(
        workers=deployment(1, 1),
        router=deployment(1, 1),
        store=statefulset(1),
        router_service=service,
    )
    status, _ = compute_status(make_pool(), observed, {}, "T")
    assert status["externalEndpoint"] == "203.0.113.7:50051"


def test_status_patch_changes_only_what_differs_and_removes_what_is_gone() -> None:
    assert status_patch({"a": 1, "b": 2}, {"a": 1, "b": 2}) == {}
    assert status_patch({"a": 1, "old": "x"}, {"a": 2}) == {"a": 2, "old": None}
    # Nested objects are merged by the API server: what left them is removed explicitly.
    on = {"auth": {"enabled": True, "callers": ["serviceaccount ml/*"]}}
    off = {"auth": {"enabled": False, "reason": "spec.auth.enabled: false"}}
    assert status_patch(on, off) == {
        "auth": {"enabled": False, "reason": "spec.auth.enabled: false", "callers": None}
    }


def test_statefulset_revision_change_is_still_rolling() -> None:
    sts = statefulset(1)
    sts["status"]["updateRevision"] = "r2"
    assert not rollout("store", sts).complete
