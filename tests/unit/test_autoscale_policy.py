"""The autoscaling policy as a pure function: load history -> desired workers."""

from __future__ import annotations

import pytest

from snakepit.autoscale.policy import (
    Policy,
    Sample,
    decide,
    default_target,
    recommend,
    total_load,
    trim,
)

POLICY = Policy(
    min_replicas=1,
    max_replicas=4,
    target_per_worker=2.0,
    scale_up_seconds=0.0,
    scale_down_seconds=10.0,
    idle_seconds=30.0,
)


def series(*loads: float, start: float = 0.0, step: float = 1.0, complete: bool = True):  # type: ignore[no-untyped-def]
    return [Sample(start + i * step, load, complete) for i, load in enumerate(loads)]


def run(policy: Policy, history: list[Sample], current: int) -> list[int]:
    """Replay samples one by one, applying every decision, as a loop would."""
    sizes = []
    seen: list[Sample] = []
    for sample in history:
        seen.append(sample)
        current = decide(policy, seen, current, sample.at).desired
        sizes.append(current)
    return sizes


def test_recommendation_is_load_over_target_within_limits() -> None:
    assert [recommend(POLICY, load) for load in (0, 0.5, 2, 2.1, 4, 8, 100)] == [
        1,
        1,
        1,
        2,
        2,
        4,
        4,
    ]
    zero = Policy(min_replicas=0, max_replicas=3, target_per_worker=2.0)
    assert [recommend(zero, load) for load in (0, 0.1, 7)] == [0, 1, 3]


def test_a_burst_scales_up_at_once() -> None:
    history = series(1, 1, 7.5)
    decision = decide(POLICY, history, current=1, now=2)
    assert decision.desired == 4
    assert "load 7.5 over 1 workers" in decision.reason


def test_scale_up_window_ignores_a_short_spike() -> None:
    policy = Policy(min_replicas=1, max_replicas=4, target_per_worker=2.0, scale_up_seconds=3.0)
    assert run(policy, series(1, 8, 1, 1), current=1) == [1, 1, 1, 1]
    # A burst that lasts the window is answered once the window has passed.
    assert run(policy, series(1, 8, 8, 8, 8), current=1) == [1, 1, 1, 1, 4]


def test_scale_down_waits_for_the_whole_window() -> None:
    history = series(8, *[1] * 12)  # t=0 busy, then quiet from t=1
    sizes = run(POLICY, history, current=4)
    # Busy at t=0 keeps 4 in the window until t=11 has no sample of it left.
    assert sizes[:11] == [4] * 11
    assert sizes[11:] == [1, 1]


def test_flapping_load_never_shrinks_and_never_flaps() -> None:
    history = series(*[8, 0.5] * 20)
    sizes = run(POLICY, history, current=1)
    assert sizes == [4] * len(history)


def test_gradual_decline_steps_down_by_the_window_maximum() -> None:
    history = series(*[8] * 5, *[4] * 15, *[2] * 15)
    sizes = run(POLICY, history, current=4)
    assert sizes[4] == 4
    assert sizes[14] == 4 and sizes[15] == 2  # 4 calls -> 2 workers once 8 left the window
    assert sizes[-1] == 1


def test_a_silent_router_is_not_zero_load() -> None:
    # One router stops answering: the samples are incomplete; the pool never shrinks on them.
    quiet = series(*[0.0] * 40, start=1, complete=False)
    history = [Sample(0, 8), *quiet]
    assert run(POLICY, history, current=4) == [4] * len(history)
    zero = Policy(min_replicas=0, max_replicas=4, target_per_worker=2.0, idle_seconds=5.0)
    assert run(zero, history, current=4)[-1] == 4


def test_incomplete_samples_still_grow_the_pool() -> None:
    # The routers that did answer already report more than the pool serves: a lower bound.
    history = series(1, 6, complete=False)
    assert decide(POLICY, history, current=1, now=1).desired == 3


def test_missing_history_never_shrinks() -> None:
    # E.g. right after an operator restart: one quiet sample says nothing about the window.
    decision = decide(POLICY, series(0, start=100), current=3, now=100)
    assert decision.desired == 3
    assert "holding" in decision.reason


def test_limits_clamp_the_current_size() -> None:
    assert decide(POLICY, series(1), current=9, now=0).desired == 4
    assert decide(POLICY, series(0), current=0, now=0).desired == 1
    assert decide(POLICY, series(100), current=4, now=0).desired == 4
    assert decide(POLICY, [], current=7, now=0).desired == 4


def test_idle_goes_to_zero_only_after_the_idle_time() -> None:
    policy = Policy(
        min_replicas=0,
        max_replicas=4,
        target_per_worker=2.0,
        scale_down_seconds=5.0,
        idle_seconds=20.0,
    )
    history = series(4, *[0] * 30)
    sizes = run(policy, history, current=2)
    assert sizes[5] == 2 and sizes[6] == 1  # down window passed: one worker stays
    assert sizes[20] == 1 and sizes[21] == 0  # idle time passed: none
    assert sizes[-1] == 0


def test_a_single_call_keeps_a_worker_from_going_to_zero() -> None:
    policy = Policy(min_replicas=0, max_replicas=4, target_per_worker=2.0, idle_seconds=10.0)
    history = series(*[0] * 9, 0.2, *[0] * 5)
    assert run(policy, history, current=1) == [1] * 15


def test_zero_wakes_at_once_despite_a_scale_up_window() -> None:
    policy = Policy(min_replicas=0, max_replicas=4, target_per_worker=2.0, scale_up_seconds=30.0)
    history = series(*[0] * 5, 1)
    decision = decide(policy, history, current=0, now=5)
    assert decision.desired == 1
    assert decision.reason.startswith("wake from zero")
    # Many held calls: more than one worker right away.
    assert decide(policy, series(0, 7), current=0, now=1).desired == 4


def test_zero_stays_zero_without_load() -> None:
    policy = Policy(min_replicas=0, max_replicas=4, target_per_worker=2.0)
    assert run(policy, series(*[0] * 10), current=0) == [0] * 10


def test_trim_keeps_one_sample_older_than_the_longest_window() -> None:
    history = series(*range(100))
    trim(history, now=99, policy=POLICY)  # longest window: idle 30 s
    assert history[0].at == 69
    assert decide(POLICY, history, current=4, now=99).desired == 4


def test_total_load_marks_a_silent_router() -> None:
    assert total_load([1, 2.5]) == (3.5, True)
    assert total_load([1, None, 2]) == (3, False)
    assert total_load([]) == (0, True)


def test_default_target_is_a_fraction_of_the_concurrency() -> None:
    assert default_target(4) == 3.0
    assert default_target(1) == 0.75


@pytest.mark.parametrize(
    "kwargs",
    [
        {"min_replicas": 3, "max_replicas": 2},
        {"min_replicas": -1},
        {"min_replicas": 0, "max_replicas": 0},
        {"target_per_worker": 0},
        {"scale_down_seconds": -1},
    ],
)
def test_impossible_policies_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Policy(**kwargs)  # type: ignore[arg-type]
