"""Consistent hashing: deterministic across processes, stable under membership change, balanced."""

from __future__ import annotations

import collections
import subprocess
import sys

from snakepit.router.ring import HashRing, load_bound

WORKERS = [f"worker-{i}" for i in range(5)]


def test_two_rings_with_the_same_workers_agree_whatever_the_order() -> None:
    a = HashRing(WORKERS)
    b = HashRing(reversed(WORKERS))
    for i in range(500):
        assert list(a.candidates(f"s{i}")) == list(b.candidates(f"s{i}"))


def test_a_separate_process_computes_the_same_placement() -> None:
    code = (
        "from snakepit.router.ring import HashRing; r = HashRing(['a', 'b', 'c']); "
        "print([r.preferred(f's{i}') for i in range(50)])"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    ring = HashRing(["c", "a", "b"])
    assert other.strip() == str([ring.preferred(f"s{i}") for i in range(50)])


def test_candidates_list_every_worker_once_preferred_first() -> None:
    ring = HashRing(WORKERS)
    order = list(ring.candidates("session-x"))
    assert sorted(order) == sorted(WORKERS)
    assert order[0] == ring.preferred("session-x")


def test_removing_a_worker_moves_only_its_sessions() -> None:
    before = HashRing(WORKERS)
    after = HashRing(WORKERS[:-1])
    moved = 0
    for i in range(2000):
        old, new = before.preferred(f"s{i}"), after.preferred(f"s{i}")
        if old != WORKERS[-1]:
            assert old == new
        else:
            moved += 1
            assert new != WORKERS[-1]
    assert 200 < moved < 700  # about a fifth


def test_sessions_spread_roughly_evenly() -> None:
    ring = HashRing(WORKERS)
    counts = collections.Counter(ring.preferred(f"s{i}") for i in range(10_000))
    assert min(counts.values()) > 1200 and max(counts.values()) < 2800


def test_empty_ring_and_load_bound() -> None:
    assert HashRing([]).preferred("x") is None
    assert load_bound(0, 4) == 1
    assert load_bound(7, 4) == 3  # ceil(1.25 * 8 / 4)
    assert load_bound(100, 0) == 0
