"""spec.autoscaling in the operator's pure parts: parsing, the worker count, status carried over."""

from __future__ import annotations

from typing import Any

import pytest

from snakepit.operator.autoscaler import policy_for, scale_status
from snakepit.operator.builders import build_children
from snakepit.operator.config import OperatorConfig
from snakepit.operator.spec import Pool, SpecError, parse_pool
from snakepit.operator.status import Observed, compute_status, status_patch


def make_pool(spec: dict[str, Any], status: dict[str, Any] | None = None) -> Pool:
    return parse_pool(
        {
            "metadata": {"name": "demo", "namespace": "ml", "uid": "u", "generation": 2},
            "spec": spec,
            "status": status or {},
        }
    )


def worker_replicas_built(pool: Pool) -> int:
    (deployment,) = [
        o
        for o in build_children(pool, OperatorConfig(), "sec")
        if o["kind"] == "Deployment" and o["metadata"]["name"] == "demo-workers"
    ]
    return int(deployment["spec"]["replicas"])


def test_autoscaling_defaults_and_policy() -> None:
    pool = make_pool({"workerConcurrency": 8, "autoscaling": {"maxReplicas": 5}})
    scaling = pool.spec.autoscaling
    assert scaling is not None
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 5)
    policy = policy_for(pool.spec)
    assert policy.target_per_worker == 6.0  # 0.75 x workerConcurrency
    assert (policy.scale_up_seconds, policy.scale_down_seconds, policy.idle_seconds) == (0, 60, 300)
    custom = make_pool(
        {
            "autoscaling": {
                "minReplicas": 0,
                "maxReplicas": 3,
                "targetLoadPerWorker": 1.5,
                "scaleUpWindowSeconds": 5,
                "scaleDownWindowSeconds": 30,
                "scaleToZeroAfterSeconds": 90,
            }
        }
    )
    assert policy_for(custom.spec) == type(policy)(0, 3, 1.5, 5, 30, 90)


def test_impossible_autoscaling_is_a_spec_error() -> None:
    with pytest.raises(SpecError, match="minReplicas"):
        make_pool({"autoscaling": {"minReplicas": 4, "maxReplicas": 2}})
    with pytest.raises(SpecError, match="maxReplicas"):
        make_pool({"autoscaling": {"minReplicas": 1}})


def test_without_autoscaling_spec_replicas_sizes_the_workers() -> None:
    pool = make_pool({"replicas": 3}, status={"desiredReplicas": 9})
    assert worker_replicas_built(pool) == 3


def test_with_autoscaling_the_decision_in_status_sizes_the_workers() -> None:
    scaling = {"minReplicas": 0, "maxReplicas": 6}
    # No decision yet: spec.replicas within the limits.
    assert worker_replicas_built(make_pool({"replicas": 9, "autoscaling": scaling})) == 6
    decided = make_pool({"replicas": 2, "autoscaling": scaling}, status={"desiredReplicas": 5})
    assert worker_replicas_built(decided) == 5
    zero = make_pool({"replicas": 2, "autoscaling": scaling}, status={"desiredReplicas": 0})
    assert worker_replicas_built(zero) == 0
    # Limits lowered below the last decision: the limits win at once.
    lowered = make_pool(
        {"autoscaling": {"minReplicas": 1, "maxReplicas": 3}}, status={"desiredReplicas": 5}
    )
    assert worker_replicas_built(lowered) == 3


def test_reconcile_status_keeps_the_autoscaler_fields_only_while_autoscaling() -> None:
    previous = {"observedGeneration": 2, **scale_status(4, "load 12 over 2 workers", "T")}
    on = make_pool({"autoscaling": {"maxReplicas": 6}}, status=previous)
    status, _ = compute_status(on, Observed(), previous, "now")
    assert status["desiredReplicas"] == 4
    assert status["lastScaleReason"] == "load 12 over 2 workers"
    assert "desiredReplicas" not in status_patch(previous, status)

    off = make_pool({}, status=previous)
    status, _ = compute_status(off, Observed(), previous, "now")
    patch = status_patch(previous, status)
    assert patch["desiredReplicas"] is None and patch["lastScaleTime"] is None


def test_a_pool_at_zero_says_a_call_wakes_it() -> None:
    pool = make_pool(
        {"autoscaling": {"minReplicas": 0, "maxReplicas": 2}}, status={"desiredReplicas": 0}
    )
    workers = {
        "kind": "Deployment",
        "metadata": {"generation": 1},
        "spec": {"replicas": 0},
        "status": {"observedGeneration": 1},
    }
    router = {
        "kind": "Deployment",
        "metadata": {"generation": 1},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 1, "availableReplicas": 1, "readyReplicas": 1},
    }
    store = {
        "kind": "StatefulSet",
        "metadata": {"generation": 1},
        "spec": {"replicas": 1},
        "status": {"observedGeneration": 1, "readyReplicas": 1, "availableReplicas": 1},
    }
    status, _ = compute_status(
        pool, Observed(workers=workers, router=router, store=store), {}, "now"
    )
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ScaledToZero")
    assert "a call wakes it" in ready["message"]


def test_autoscaler_rounds_become_metrics() -> None:
    from snakepit.metrics import OperatorMetrics

    metrics = OperatorMetrics()
    key = ("ml", "demo")
    labels = {"namespace": "ml", "pool": "demo"}

    def value(name: str, extra: dict[str, str] | None = None) -> float | None:
        return metrics.registry.get_sample_value(name, extra if extra is not None else labels)

    metrics.autoscale_round(key, load=7.0, complete=False, current=1, desired=3)
    metrics.autoscale_round(key, load=7.0, complete=True, current=3, desired=3)
    metrics.autoscale_round(key, load=0.0, complete=True, current=3, desired=1)
    assert value("snakepit_operator_autoscale_desired_replicas") == 1
    assert value("snakepit_operator_autoscale_load") == 0
    assert value("snakepit_operator_autoscale_reading_complete") == 1
    up = value("snakepit_operator_autoscale_decisions_total", {"direction": "up"})
    down = value("snakepit_operator_autoscale_decisions_total", {"direction": "down"})
    assert (up, down) == (1, 1)
    metrics.autoscale_gone(key)
    assert value("snakepit_operator_autoscale_desired_replicas") is None
