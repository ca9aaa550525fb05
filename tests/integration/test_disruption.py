"""Planned disruptions under a heavy mixed load fail no call (real router and worker processes).

These reproduce, without a cluster, what the e2e suite saw on Kubernetes: a worker stopping
(SIGTERM: scale-down, rollout, recycling) while calls are on the wire, and two router replicas
sending more than the pool's capacity at once.
"""

from __future__ import annotations

import signal
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from snakepit import Client
from snakepit.errors import ResourceExhausted, SnakepitError, Unavailable
from snakepit.protocol import method_path
from snakepit.protocol.messages import encode_request
from snakepit.protocol.status import never_started
from tests.fixtures.processes import (
    ProcessFactory,
    connections_to,
    free_port,
    health_status,
    start_pool,
    wait_for,
    wait_ready,
)
from tests.fixtures.redis import RedisServer
from tests.support.closerace import check_only_close_resets
from tests.support.load import MixedLoad

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def test_a_worker_stopping_under_load_fails_no_call(procs: ProcessFactory, data_path: str) -> None:
    """SIGTERM one of three workers while 32 sessions call: its calls finish, new ones go
    elsewhere, and no call on the wire is CANCELLED when its server stops (grpc/grpc#41785).
    On the HAProxy data path the load's 2 MB tensor calls take the Python router (their bodies
    would stall the client's connection in HAProxy's queue: docs/architecture.md)."""
    router, workers = start_pool(procs, 3)
    with MixedLoad(router.address, sessions=32) as load:
        time.sleep(1.0)
        with load.window("SIGTERM a worker") as window:
            workers[1].signal(signal.SIGTERM)
            assert workers[1].wait(timeout=30) == 0
            time.sleep(1.0)
        window.check(min_calls=50)
        load.check_no_acknowledged_write_lost()
    with Client(router.address) as client:
        assert client.status()["workers_ready"] == 2


def test_two_routers_over_capacity_queue_instead_of_refusing(
    procs: ProcessFactory, redis_server: RedisServer, redis_prefix: str, data_path: str
) -> None:
    """Two router replicas each count only their own calls, so together they send a worker
    twice its slots; the excess waits (worker backlog, router backoff) and nothing is refused.
    On the HAProxy data path too: each HAProxy holds at most its worker-concurrency per worker
    (``maxconn``), and the worker's backlog absorbs what the other replica adds."""
    store = f"{redis_server.url}?prefix={redis_prefix}"
    router_a, workers = start_pool(procs, 2, "--store", store, concurrency=2)
    router_b = procs.router(workers, "--worker-concurrency", "2", store=store)
    wait_ready(router_b.address, 2)
    mix = {"add": 0.5, "sleep": 0.2, "increment": 0.3}
    with (
        MixedLoad(router_a.address, sessions=12, mix=mix, seed=1) as load_a,
        MixedLoad(router_b.address, sessions=12, mix=mix, seed=2) as load_b,
        load_a.window("router A, 12 sessions on 4 slots") as window_a,
        load_b.window("router B, 12 sessions on 4 slots") as window_b,
    ):
        time.sleep(6.0)
    window_a.check(min_calls=20)
    window_b.check(min_calls=20)
    load_a.check_no_acknowledged_write_lost()
    load_b.check_no_acknowledged_write_lost()


def test_a_worker_backlog_that_is_full_refuses_at_once(procs: ProcessFactory) -> None:
    """Straight to a worker (no router to wait for it): beyond concurrency + backlog a call is
    refused at once with RESOURCE_EXHAUSTED marked not started; the calls that fit all run, the
    waiting ones in arrival order."""
    metrics_port = free_port()
    worker = procs.worker("--backlog", "2", "--metrics-port", str(metrics_port), concurrency=1)
    with Client(worker.address) as client, ThreadPoolExecutor(4) as pool:
        held = []
        for i in range(3):
            held.append(pool.submit(client.execute, "sleep", seconds=0.5))
            # Each call in place (running, then waiting) before the next: on a busy machine a
            # call sent later could otherwise overtake one still in its client thread.
            wait_for(lambda n=i + 1: _taken(metrics_port) == n)
        started = time.monotonic()
        with pytest.raises(ResourceExhausted, match="2 calls already wait for a slot") as info:
            client.execute("add", a=1, b=2)
        assert info.value.not_started
        assert time.monotonic() - started < 0.3
        assert [f.result(timeout=10) for f in held] == [0.5, 0.5, 0.5]
        assert client.execute("add", a=1, b=2) == 3


def _taken(metrics_port: int) -> int:
    """A worker's calls running plus waiting for a slot, from its metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(
        int(float(line.split()[-1]))
        for line in text.splitlines()
        if line.startswith(("snakepit_worker_in_flight ", "snakepit_worker_backlog "))
    )


def test_a_wait_in_the_backlog_is_bounded(procs: ProcessFactory) -> None:
    worker = procs.worker("--backlog-timeout", "0.3", concurrency=1)
    with Client(worker.address) as client, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(client.execute, "sleep", seconds=1.5)
        time.sleep(0.2)
        started = time.monotonic()
        with pytest.raises(ResourceExhausted, match=r"no slot became free within 0\.3s"):
            client.execute("add", a=1, b=2)
        assert 0.25 < time.monotonic() - started < 1.0
        assert busy.result(timeout=5) == 1.5


def test_workers_stopping_between_short_calls_fail_no_call(
    procs: ProcessFactory, data_path: str
) -> None:
    """The sharp edge of a stop: short calls only, so a worker is often idle at the instant it
    is told to stop while the next call is already on its way (scale 5 -> 1). On the HAProxy
    data path, which cannot retry a refusal, the workers' grace window covers the moment before
    the router has put a stopping worker's server in ``drain``."""
    router, workers = start_pool(procs, 5)
    with MixedLoad(router.address, sessions=8, mix={"add": 1.0}) as load:
        time.sleep(0.5)
        with load.window("stop 4 of 5 workers, one every 0.3 s") as window:
            for worker in workers[1:]:
                worker.signal(signal.SIGTERM)
                time.sleep(0.3)
            for worker in workers[1:]:
                assert worker.wait(timeout=30) == 0
            time.sleep(0.5)
        window.check(min_calls=200)


def test_every_call_a_stopping_worker_turns_away_is_safe_to_retry(procs: ProcessFactory) -> None:
    """Callers that have not yet seen a worker leave (a router before its health update lands,
    a direct-mode client with last second's routing table) keep sending to it until it turns
    them away. That first refusal must say "never started" (draining, or no connection), which
    a router or client retries elsewhere, and never CANCELLED, which nobody may retry because
    the tool might have run. (Then, like a router or a direct-mode client, each caller stops
    sending to that worker.)"""
    worker = procs.worker()
    errors: list[SnakepitError] = []
    succeeded = 0
    stop = threading.Event()

    def hammer() -> None:
        nonlocal succeeded
        with Client(worker.address, timeout=5) as client:
            while not stop.is_set():
                try:
                    client.execute("add", a=1, b=2)
                    succeeded += 1
                except SnakepitError as exc:
                    errors.append(exc)
                    return

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for thread in threads:
        thread.start()
    wait_for(lambda: succeeded >= 50, timeout=20)
    worker.signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join(timeout=10)
    assert errors, "the callers never saw the worker go"
    unsafe = [f"{e.code.name}: {e}" for e in errors if not never_started(e)]
    assert not unsafe, unsafe[:5]


def test_a_direct_mode_stream_turned_away_by_a_draining_worker_goes_elsewhere(
    procs: ProcessFactory,
) -> None:
    """Direct mode with last second's routing table: a stream the session's worker refuses
    (draining, past its grace window) before its first item is tried on another worker, as a
    unary call is."""
    router, workers = start_pool(procs, 2)
    with Client(router.address, direct=True, timeout=30) as client, ThreadPoolExecutor(1) as pool:
        for i in range(200):
            session = client.session(f"stream-{i}", keep=True)
            if session.execute("whoami")["worker_id"] == "worker-0":
                break
        else:
            raise AssertionError("no session lands on worker-0")
        held = pool.submit(session.execute, "sleep", seconds=3.0)
        time.sleep(0.3)
        workers[0].signal(signal.SIGTERM)
        wait_for(lambda: health_status(workers[0].address) == NOT_SERVING, timeout=5)
        wait_for(lambda: _refuses(workers[0].address), timeout=5)  # the grace window is over
        assert list(session.stream("count", n=5)) == [0, 1, 2, 3, 4]
        assert session.execute("whoami")["worker_id"] == "worker-1"
        assert held.result(timeout=10) == 3.0


def _refuses(address: str) -> bool:
    """Whether a worker turns a new call away (draining, not started)."""
    with Client(address, timeout=5) as client:
        try:
            client.execute("add", a=1, b=2)
        except Unavailable as exc:
            assert exc.not_started, exc
            return True
    return False


def test_a_draining_worker_runs_the_calls_sent_in_its_grace_window(procs: ProcessFactory) -> None:
    """Routers need a moment to see NOT_SERVING, and HAProxy cannot retry a refusal (a gRPC
    refusal is HTTP 200): a call sent straight to a worker just after it turned NOT_SERVING is
    run, and finishes before the worker stops; once the grace window is over, calls are refused
    as not started, and the worker exits cleanly."""
    worker = procs.worker("--drain-grace", "3", "--drain-linger", "3")
    with Client(worker.address, timeout=10) as client, ThreadPoolExecutor(1) as pool:
        worker.signal(signal.SIGTERM)
        wait_for(lambda: health_status(worker.address) == NOT_SERVING, timeout=5)
        # Runs past the grace window and the linger: the drain waits for it.
        late = pool.submit(client.execute, "sleep", seconds=4.0)
        assert client.execute("add", a=1, b=2) == 3
        wait_for(lambda: _refuses(worker.address), timeout=10)
        assert late.result(timeout=10) == 4.0
    assert worker.wait(timeout=30) == 0


def test_a_killed_worker_fails_only_the_calls_running_on_it(
    procs: ProcessFactory, data_path: str
) -> None:
    """An unplanned failure (SIGKILL: OOM, a node lost) has a bounded cost: the calls running on
    that worker when it died fail with UNAVAILABLE, none is run again behind the caller's back,
    every call started after it is served by the others, and no acknowledged write is lost."""
    router, workers = start_pool(procs, 3)
    with MixedLoad(router.address, sessions=32) as load:
        time.sleep(1.0)
        with load.window("SIGKILL a worker") as window:
            killed_at = time.monotonic()
            workers[1].kill()
            time.sleep(2.0)
            load.wait_for_successes(50, since=killed_at)  # a loaded machine is slower
        failed = [c for c in window.calls if c.error is not None]
        assert all(c.error.startswith("UNAVAILABLE") for c in failed), window.failures[:5]
        # In flight on it means started before it died (the router saw it gone within ms).
        assert all(c.started <= killed_at + 0.5 for c in failed), window.summary()
        assert len(failed) <= 4 + 16  # its slots and its backlog at most
        assert window.succeeded >= 50
        load.check_no_acknowledged_write_lost()


def test_a_worker_killed_mid_stream_ends_its_streams_unavailable_for_any_client(
    procs: ProcessFactory, data_path: str
) -> None:
    """Streams whose answers have begun end UNAVAILABLE when their worker dies, seen by a plain
    gRPC client (not snakepit's), on both data paths. HAProxy 2.6 ended them with an empty
    END_STREAM DATA frame and no status (UNKNOWN "Data frame with END_STREAM flag received",
    every time): on its data path streaming calls now go through the Python router."""
    router, workers = start_pool(procs, 1, adapter="tests.support.adapters:ProbeAdapter")
    request = encode_request("ticks", {"key": "k", "n": 3000, "interval": 0.01}, "")
    with grpc.insecure_channel(router.address) as channel:
        stream = channel.unary_stream(method_path("ExecuteStreamingTool"))
        calls = [stream(request, timeout=60) for _ in range(4)]
        for call in calls:
            next(call)  # under way: the answer has begun
        workers[0].kill()
        outcomes = []
        for call in calls:
            with pytest.raises(grpc.RpcError) as failed:
                for _ in call:
                    pass
            outcomes.append((failed.value.code(), failed.value.details()))
    assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in outcomes), outcomes


def test_tensor_calls_crossing_connection_age_goaways_fail_at_most_one_in_a_thousand(
    procs: ProcessFactory,
) -> None:
    """1 MB each way while the router ages every connection out after 50 ms (a roll's GOAWAYs,
    many times over); both races at a connection's end failed calls of the router rolling
    update e2e test, on kind and on the local cluster (grpc_options' docstring):

    - a request that crossed the GOAWAY, never seen by the server, is resent by grpc only if
      the call still holds it (``Stream removed (GOAWAY received; … max_age)`` otherwise);
    - the last answer on the connection is lost when a client's probe PING makes the server's
      close a reset (``Stream removed (recvmsg:Connection reset by peer …)``).
    """
    router, _ = start_pool(procs, 2, "--max-connection-age", "0.05")
    failures: list[str] = []
    # The router's ageing is under test: the client does not reconnect on its own first.
    with ThreadPoolExecutor(4) as pool:
        counts = [
            pool.submit(_tensor_calls, router.address, 20, failures, max_connection_age=None)
            for _ in range(4)
        ]
        done = sum(c.result(timeout=60) for c in counts)
    assert done > 300, f"only {done} calls in 20 s"
    # What is left when the router closes: the close reset (tests/support/closerace.py);
    # snakepit's clients close first (next test), this one does not.
    check_only_close_resets(failures, done)


def test_a_client_that_reconnects_before_the_router_ages_its_connection_fails_no_call(
    procs: ProcessFactory,
) -> None:
    """What closes the reset race above for snakepit's own clients: the client moves new calls
    to a fresh connection every ``max_connection_age`` (client/rotation.py) and closes the old
    one after its last call, so the router's ageing (here 60 s: never in this run) never closes
    a connection under a call. 1 MB each way over about a thousand client-side reconnects: every
    call succeeds, and a client keeps at most its current and one retiring connection open."""
    router, _ = start_pool(procs, 2, "--max-connection-age", "60")
    router_port = int(router.address.rsplit(":", 1)[1])
    failures: list[str] = []
    seen: set[int] = set()
    most_open = 0
    with ThreadPoolExecutor(4) as pool:
        counts = [
            pool.submit(_tensor_calls, router.address, 15, failures, max_connection_age=0.05)
            for _ in range(4)
        ]
        while not all(c.done() for c in counts):
            open_now = connections_to(router_port)
            seen |= open_now
            most_open = max(most_open, len(open_now))
            time.sleep(0.02)
        done = sum(c.result() for c in counts)
    assert not failures, f"{len(failures)} of {done + len(failures)} failed: {failures[:3]}"
    assert done > 200, f"only {done} calls in 15 s"
    assert len(seen) >= 50, f"the clients reconnected only {len(seen)} times"
    assert most_open <= 4 * 2, most_open
    wait_for(lambda: not connections_to(router_port), timeout=10)


def test_a_workers_store_channel_moves_to_new_connections_before_the_router_ages_it(
    procs: ProcessFactory,
) -> None:
    """A worker's own channel to the router (its store calls, here atomic increments) moves to
    a new connection every 2 s (grpc_options.CLIENT_MAX_CONNECTION_AGE) like a Client's, so the
    router's ageing (60 s here) is not what closes it; no increment is lost on the way."""
    router, (worker,) = start_pool(procs, 1, "--max-connection-age", "60")
    router_port = int(router.address.rsplit(":", 1)[1])
    seen: set[int] = set()
    done = 0
    with Client(router.address, timeout=30) as client, client.session() as session:
        deadline = time.monotonic() + 7
        while time.monotonic() < deadline:
            assert session.execute("counter_increment", name="n") == done + 1
            done += 1
            seen |= connections_to(router_port, worker.pid)
        assert session.get("n") == done
    assert len(seen) >= 3, f"the worker used {len(seen)} connections to the router in 7 s"


def _tensor_calls(target: str, seconds: float, failures: list[str], **client: Any) -> int:
    """1 MB each way, one call after another for ``seconds``: the calls that succeeded; the
    others' errors go to ``failures`` (the caller asserts on them)."""
    tensor = np.ones(2**20 // 8)
    deadline = time.monotonic() + seconds
    done = 0
    with Client(target, timeout=30, **client) as caller:
        while time.monotonic() < deadline:
            try:
                assert float(caller.execute("tensor_scale", x=tensor, factor=2.0)[-1]) == 2.0
                done += 1
            except Exception as exc:  # counted, not raised
                failures.append(repr(exc))
    return done
