"""A load that steps up and down, and a recorder of the pool's size, for autoscaling tests.

``RampLoad`` runs one thread per unit of load: each calls ``sleep`` through its own session, so
the calls in flight equal the active threads, and every fifth call atomically increments the
session's counter, so the test can check afterwards that session variables survived workers
leaving (the counter equals the increments acknowledged). ``Timeline`` polls a probe (pool
status) and keeps the series the tests assert on, print and plot.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from snakepit import Client
from snakepit.errors import SnakepitError


@dataclass
class _Lane:
    index: int
    session_id: str
    increments: int = 0


class RampLoad:
    def __init__(
        self,
        target: str,
        call_seconds: float = 0.2,
        timeout: float = 60.0,
        client_options: dict[str, Any] | None = None,  # e.g. tls= and token= of a secured pool
    ) -> None:
        self.client = Client(target, timeout=timeout, **(client_options or {}))
        self.call_seconds = call_seconds
        self.level = 0
        self.calls = 0
        self.failures: list[str] = []
        self.latencies: list[tuple[float, float]] = []  # (start, seconds)
        self._lanes: list[_Lane] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._run_id = time.monotonic_ns()

    def set_level(self, level: int) -> None:
        """Keep ``level`` calls in flight from now on (lanes above it pause after their call)."""
        self.level = level
        while len(self._lanes) < level:
            lane = _Lane(len(self._lanes), f"ramp-{self._run_id}-{len(self._lanes)}")
            self._lanes.append(lane)
            thread = threading.Thread(target=self._run, args=(lane,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _run(self, lane: _Lane) -> None:
        session = self.client.session(lane.session_id, keep=True)
        count = 0
        while not self._stop.is_set():
            if lane.index >= self.level:
                time.sleep(0.02)
                continue
            count += 1
            started = time.monotonic()
            try:
                if count % 5 == 0:
                    session.execute("counter_increment")
                    lane.increments += 1
                else:
                    session.execute("sleep", seconds=self.call_seconds)
                ok = None
            except SnakepitError as exc:
                ok = f"{exc.code.name}: {exc}"
            with self._lock:
                self.calls += 1
                self.latencies.append((started, time.monotonic() - started))
                if ok is not None:
                    self.failures.append(ok)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def lost_increments(self) -> list[str]:
        """Sessions whose counter differs from the increments acknowledged to them."""
        lost = []
        for lane in self._lanes:
            if not lane.increments:
                continue
            value = self.client.session(lane.session_id, keep=True).get("counter")
            if value != lane.increments:
                lost.append(f"{lane.session_id}: counter {value}, acknowledged {lane.increments}")
        return lost

    def close(self) -> None:
        self.stop()
        self.client.close()


@dataclass
class Point:
    at: float
    level: int
    load: float
    desired: int
    ready: int
    total: int


@dataclass
class Timeline:
    """Polls ``probe`` -> (load, desired, ready, total) every ``interval`` in a thread."""

    probe: Callable[[], tuple[float, int, int, int]]
    level: Callable[[], int]
    interval: float = 0.25
    points: list[Point] = field(default_factory=list)
    marks: list[tuple[float, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def now(self) -> float:
        return time.monotonic() - self.started

    def mark(self, label: str) -> float:
        at = self.now()
        self.marks.append((at, label))
        return at

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                load, desired, ready, total = self.probe()
            except Exception:  # a probe that fails is a gap in the series, not a test failure
                load, desired, ready, total = -1.0, -1, -1, -1
            self.points.append(Point(self.now(), self.level(), load, desired, ready, total))
            self._stop.wait(self.interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def first(self, after: float, predicate: Callable[[Point], bool]) -> float | None:
        """Seconds from ``after`` until the first point that satisfies ``predicate``."""
        for point in self.points:
            if point.at >= after and predicate(point):
                return point.at - after
        return None

    def wait(self, after: float, predicate: Callable[[Point], bool], timeout: float) -> float:
        """Block until a point after ``after`` satisfies ``predicate``; seconds from ``after``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.first(after, predicate)
            if found is not None:
                return found
            time.sleep(0.05)
        raise AssertionError(f"not reached within {timeout} s:\n{self.table(0.5)}")

    def table(self, every: float = 1.0) -> str:
        lines = [f"{'t/s':>6} {'level':>5} {'load':>6} {'desired':>7} {'ready':>5} {'total':>5}"]
        next_at = 0.0
        for p in self.points:
            if p.at + 1e-9 >= next_at:
                lines.append(
                    f"{p.at:6.1f} {p.level:5d} {p.load:6.1f} {p.desired:7d} {p.ready:5d} {p.total:5d}"
                )
                next_at = p.at + every
        return "\n".join(lines)
