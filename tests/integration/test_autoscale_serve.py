"""``snakepit serve --max-workers``: worker processes follow the load, and wake from zero.

Real processes: the serve process runs the router and the autoscaler, workers are its children;
the load is real calls (``sleep``) from threads. Timings are printed, and asserted only loosely.
Each test runs on both data paths: on HAProxy's, the load read includes HAProxy's queue and
running calls, and a call that finds no worker is handed to the Python router, which holds it
and wakes the autoscaler.
"""

from __future__ import annotations

import time

import pytest

from snakepit import Client
from tests.fixtures.processes import Proc, ProcessFactory
from tests.support.ramp import RampLoad, Timeline

pytestmark = pytest.mark.parametrize("data_path", ["python", "haproxy"])


def serve(procs: ProcessFactory, data_path: str, *args: str) -> Proc:
    pool = procs.serve(*args, "--data-path", data_path)
    assert f"data path: {data_path}" in pool.logs()
    return pool


def status_probe(client: Client):  # type: ignore[no-untyped-def]
    def probe() -> tuple[float, int, int, int]:
        s = client.status()
        return (
            float(s["in_flight"] + s["queued"]),
            int(s["workers_desired"]),
            int(s["workers_ready"]),
            int(s["workers_total"]),
        )

    return probe


def test_serve_grows_and_shrinks_under_a_load_ramp(procs: ProcessFactory, data_path: str) -> None:
    # Target 1.5 calls per worker (0.75 x 2): 1 call in flight -> 1 worker, 6 -> 4 (the max).
    pool = serve(
        procs, data_path, "--min-workers", "1", "--max-workers", "4",
        "--worker-concurrency", "2", "--scale-down-delay", "3", "--scale-interval", "0.25",
    )  # fmt: skip
    load = RampLoad(pool.address, call_seconds=0.2)
    with Client(pool.address) as client:
        timeline = Timeline(status_probe(client), lambda: load.level, interval=0.1)
        try:
            load.set_level(1)
            time.sleep(2.0)
            assert {p.desired for p in timeline.points} == {1}

            up = timeline.mark("step up to 6 calls")
            load.set_level(6)
            decided = timeline.wait(up, lambda p: p.desired == 4, timeout=5)
            grown = timeline.wait(up, lambda p: p.ready == 4, timeout=30)
            time.sleep(4.0)  # steady at the peak: no flapping
            peak = [p for p in timeline.points if p.at > up + grown + 0.5]
            assert {p.desired for p in peak} == {4}

            down = timeline.mark("step down to 1 call")
            load.set_level(1)
            shrunk = timeline.wait(down, lambda p: p.desired == 1, timeout=10)
            gone = timeline.wait(down, lambda p: p.total == 1, timeout=15)
            time.sleep(1.0)
        finally:
            load.stop()
            timeline.stop()
            lost = load.lost_increments()
            load.close()
        print(timeline.table(0.5))
        print(
            f"scale up: decided {decided:.2f} s, 4 ready {grown:.2f} s after the step; "
            f"scale down: decided {shrunk:.2f} s, 1 left {gone:.2f} s after the step; "
            f"{load.calls} calls, {len(load.failures)} failed"
        )
        assert load.failures == []
        assert lost == []
        assert all(1 <= p.desired <= 4 for p in timeline.points)
        assert shrunk >= 2.5, "shrank before the scale-down delay"


def test_serve_wakes_from_zero_at_once_when_a_call_arrives(
    procs: ProcessFactory, data_path: str
) -> None:
    # The load is read every 60 s only: answering fast proves the router woke the autoscaler.
    pool = serve(
        procs, data_path, "--min-workers", "0", "--max-workers", "2", "--scale-interval", "60"
    )
    with Client(pool.address, timeout=30) as client:
        assert client.status()["workers_total"] == 0
        started = time.monotonic()
        assert client.execute("add", a=1, b=2) == 3
        cold = time.monotonic() - started
        status = client.status()
    print(f"cold start (call made -> answered, snakepit serve): {cold:.2f} s")
    assert cold < 20
    assert status["workers_desired"] == 1
    assert status["scale_reason"].startswith("wake from zero")


def test_serve_goes_to_zero_when_idle_and_answers_the_next_call(
    procs: ProcessFactory, data_path: str
) -> None:
    pool = serve(
        procs, data_path, "--min-workers", "0", "--max-workers", "2",
        "--scale-down-delay", "1", "--idle-timeout", "2", "--scale-interval", "0.2",
    )  # fmt: skip
    with Client(pool.address, timeout=30) as client:
        for _ in range(2):
            assert client.execute("add", a=2, b=3) == 5
            deadline = time.monotonic() + 15
            while client.status()["workers_total"] != 0:
                assert time.monotonic() < deadline, client.status()
                time.sleep(0.1)
            assert client.status()["scale_reason"].startswith("idle")
