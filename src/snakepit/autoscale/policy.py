"""The autoscaling policy: a pure function from a pool's load history to its desired size.

Load is what only the router knows: calls in flight plus calls queued, summed over every router
replica. The policy is HPA's stabilization windows applied to Ray Serve's "target ongoing
requests per replica", plus Knative-style scale to zero:

- The recommendation of one sample is ``ceil(load / target)`` workers.
- Up: the pool grows to the *smallest* recommendation of the scale-up window (default 0 s: the
  latest sample alone), so a burst is answered at once and, with a window, only a burst that
  lasts the window is.
- Down: the pool shrinks to the *largest* recommendation of the scale-down window, so flapping
  load never shrinks it and a real drop shrinks it once the window has passed.
- Zero: with ``min_replicas == 0`` the pool keeps one worker until the load has been exactly zero
  for ``idle_seconds``; from zero, any load wakes it at once (the window is not waited for: the
  calls are being held).
- A sample from a round where some router did not answer is incomplete: its load is a lower
  bound, good enough to grow on but never to shrink on. Missing history (the window is not yet
  covered, e.g. after a restart) likewise never shrinks the pool.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

DEFAULT_TARGET_FRACTION = 0.75
DEFAULT_SCALE_UP_SECONDS = 0.0
DEFAULT_SCALE_DOWN_SECONDS = 60.0
DEFAULT_IDLE_SECONDS = 300.0


@dataclass(frozen=True)
class Policy:
    """Tuning knobs; see docs/autoscaling.md for what each does and why its default."""

    min_replicas: int = 1
    max_replicas: int = 10
    target_per_worker: float = 3.0
    scale_up_seconds: float = DEFAULT_SCALE_UP_SECONDS
    scale_down_seconds: float = DEFAULT_SCALE_DOWN_SECONDS
    idle_seconds: float = DEFAULT_IDLE_SECONDS

    def __post_init__(self) -> None:
        if self.min_replicas < 0 or self.max_replicas < max(1, self.min_replicas):
            raise ValueError(
                f"need 0 <= min ({self.min_replicas}) <= max ({self.max_replicas}) and max >= 1"
            )
        if not self.target_per_worker > 0:
            raise ValueError(f"target load per worker must be > 0, got {self.target_per_worker}")
        if min(self.scale_up_seconds, self.scale_down_seconds, self.idle_seconds) < 0:
            raise ValueError("windows must be >= 0 seconds")

    @property
    def history_seconds(self) -> float:
        """How much history ``decide`` looks at: keep at least this much."""
        return max(self.scale_up_seconds, self.scale_down_seconds, self.idle_seconds)


def default_target(worker_concurrency: int) -> float:
    """Target calls in flight per worker: a fraction of its limit, so bursts find free slots."""
    return max(0.1, DEFAULT_TARGET_FRACTION * worker_concurrency)


@dataclass(frozen=True)
class Sample:
    """One reading of the pool's load at time ``at`` (seconds, any monotonic clock).

    ``load`` is calls in flight plus queued over the routers that answered; ``complete`` is
    False when some router did not answer, so ``load`` is only a lower bound.
    """

    at: float
    load: float
    complete: bool = True


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str

    def changes(self, current: int) -> bool:
        return self.desired != current


def recommend(policy: Policy, load: float) -> int:
    """Workers for one sample's load, within the limits (and at least 1 when there is load)."""
    wanted = math.ceil(load / policy.target_per_worker - 1e-9) if load > 0 else 0
    return min(policy.max_replicas, max(policy.min_replicas, wanted, 1 if load > 0 else 0))


def _window(history: Sequence[Sample], now: float, seconds: float) -> list[Sample]:
    """Samples of the last ``seconds`` (the latest sample at least)."""
    return [s for s in history if s.at >= now - seconds] or list(history[-1:])


def _covers(history: Sequence[Sample], now: float, seconds: float) -> bool:
    return bool(history) and history[0].at <= now - seconds


def decide(policy: Policy, history: Sequence[Sample], current: int, now: float) -> Decision:
    """The desired worker count given the samples so far (oldest first) and the current count."""
    if not history:
        return _clamp(policy, current, "no load reading yet")
    latest = history[-1]
    if current == 0 and latest.load > 0:
        wanted = recommend(policy, latest.load)
        return Decision(wanted, f"wake from zero: {_fmt(latest.load)} calls waiting")
    up = min(recommend(policy, s.load) for s in _window(history, now, policy.scale_up_seconds))
    limits = f"limits {policy.min_replicas}..{policy.max_replicas}"
    if current > policy.max_replicas:
        return Decision(policy.max_replicas, limits)
    if current < policy.min_replicas:
        return Decision(max(policy.min_replicas, up), limits)
    if up > current:
        return Decision(
            up,
            f"load {_fmt(latest.load)} over {current} workers "
            f"(target {_fmt(policy.target_per_worker)} each)",
        )
    down_window = _window(history, now, policy.scale_down_seconds)
    if not _covers(history, now, policy.scale_down_seconds) or not all(
        s.complete for s in down_window
    ):
        return Decision(current, "holding: load not known for the whole scale-down window")
    down = max(recommend(policy, s.load) for s in down_window)
    if down == 0:
        idle = _window(history, now, policy.idle_seconds)
        if _covers(history, now, policy.idle_seconds) and all(
            s.complete and s.load == 0 for s in idle
        ):
            if current > 0:
                return Decision(0, f"idle for {_fmt(policy.idle_seconds)} s")
            return Decision(0, "idle")
        down = 1
    if down < current:
        return Decision(
            down,
            f"load at most {_fmt(max(s.load for s in down_window))} for "
            f"{_fmt(policy.scale_down_seconds)} s (target {_fmt(policy.target_per_worker)} each)",
        )
    return Decision(current, "steady")


def _clamp(policy: Policy, current: int, reason: str) -> Decision:
    floor = policy.min_replicas
    return Decision(min(policy.max_replicas, max(floor, current)), reason)


def trim(history: list[Sample], now: float, policy: Policy) -> None:
    """Drop samples ``decide`` no longer needs, keeping one just older than every window."""
    keep_from = now - policy.history_seconds
    while len(history) > 1 and history[1].at <= keep_from:
        del history[0]


def total_load(loads: Iterable[float | None]) -> tuple[float, bool]:
    """Sum of the routers' loads; None (a router that did not answer) makes it incomplete."""
    total = 0.0
    complete = True
    for load in loads:
        if load is None:
            complete = False
        else:
            total += load
    return total, complete


def _fmt(value: float) -> str:
    return f"{value:g}"
