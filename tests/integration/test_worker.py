"""A real worker process over real gRPC: tools, streaming, deadlines, limits, health, drain, recycling."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from snakepit import Client
from snakepit.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ToolError,
    Unavailable,
)
from snakepit.protocol import method_path
from tests.fixtures.processes import FAULTS, ProcessFactory, health_status

PROBE = "tests.support.adapters:ProbeAdapter"
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(interval)


def test_every_showcase_tool(procs: ProcessFactory) -> None:
    worker = procs.worker(worker_id="show-1")
    with Client(worker.address) as client:
        tools = {t.name: t for t in client.list_tools()}
        assert set(tools) >= {"echo", "add", "whoami", "sleep", "count", "fail",
                              "counter_increment", "tensor_sum", "tensor_scale", "nested_add"}  # fmt: skip
        assert "crash" not in tools  # the default adapter has no tool that kills its worker
        assert tools["count"].streaming and not tools["add"].streaming
        assert [(p.name, p.type, p.required) for p in tools["add"].parameters] == [
            ("a", "float", True),
            ("b", "float", True),
        ]
        assert tools["counter_increment"].parameters[0].default == "counter"

        for value in [None, True, 7, 2.5, "text", b"\x00\x01", [1, [2]], {"k": {"n": None}}]:
            assert client.execute("echo", value=value) == value
        array = np.arange(12, dtype=np.int16).reshape(3, 4)
        echoed = client.execute("echo", value=array)
        assert echoed.dtype == np.int16 and np.array_equal(echoed, array)
        assert client.execute("add", a=1, b=2) == 3
        assert client.execute("whoami") == {"worker_id": "show-1", "pid": worker.pid}
        assert client.execute("sleep", seconds=0.05) == 0.05
        assert list(client.stream("count", n=5)) == [0, 1, 2, 3, 4]
        assert client.execute("count", n=3) == [0, 1, 2]  # a streaming tool called unary: all items
        assert client.execute("tensor_sum", x=np.ones((10, 10))) == 100.0
        scaled = client.execute("tensor_scale", x=np.arange(5000, dtype=np.float32), factor=2)
        assert scaled.dtype == np.float32 and scaled[4999] == 9998.0

        with pytest.raises(ToolError) as failure:
            client.execute("fail", message="boom")
        assert failure.value.remote_type == "ValueError"
        assert failure.value.message == "boom"
        assert failure.value.code == grpc.StatusCode.INTERNAL
        assert "raise ValueError(message)" in (failure.value.remote_traceback or "")
        assert failure.value.worker_id == "show-1"


def test_bad_calls_get_invalid_argument_naming_the_problem(procs: ProcessFactory) -> None:
    worker = procs.worker()
    with Client(worker.address) as client:
        with pytest.raises(
            InvalidArgument, match="argument 'a' of tool 'add' must be of type float, got string"
        ):
            client.execute("add", a="one", b=2)
        with pytest.raises(InvalidArgument, match="missing required argument 'b' for tool 'add'"):
            client.execute("add", a=1)
        with pytest.raises(InvalidArgument, match="unknown argument 'c' for tool 'add'"):
            client.execute("add", a=1, b=2, c=3)
        with pytest.raises(NotFound, match="unknown tool 'nope'"):
            client.execute("nope")
        with grpc.insecure_channel(worker.address) as channel:
            garbage = channel.unary_unary(method_path("ExecuteTool"))
            with pytest.raises(grpc.RpcError) as raw_error:
                garbage(b"\x0a\xff\xff\xff", timeout=5)
            assert raw_error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "malformed" in raw_error.value.details()
        assert client.execute("add", a=1, b=2) == 3  # still healthy


def test_a_blocking_sync_tool_does_not_stall_the_event_loop(procs: ProcessFactory) -> None:
    worker = procs.worker(adapter=PROBE)
    with Client(worker.address) as client, ThreadPoolExecutor(1) as pool:
        blocked = pool.submit(client.execute, "block", seconds=1.5)
        time.sleep(0.2)
        started = time.monotonic()
        assert client.ping()["role"] == "worker"
        assert client.execute("pid") == worker.pid
        assert time.monotonic() - started < 0.5
        assert not blocked.done()
        assert blocked.result(timeout=5) == 1.5


def test_deadline_stops_the_tool_and_reports_deadline_exceeded(
    procs: ProcessFactory, tmp_path: Path
) -> None:
    worker = procs.worker(adapter=PROBE, env={"SNAKEPIT_TEST_MARKS": str(tmp_path)})
    with Client(worker.address) as client:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            client.execute("wait_cancel", key="d1", timeout=0.3)
        assert time.monotonic() - started < 2.0
        wait_for(lambda: (tmp_path / "cancelled-d1").exists())


def test_streaming_with_cancellation_closes_the_generator(
    procs: ProcessFactory, tmp_path: Path
) -> None:
    worker = procs.worker(adapter=PROBE, env={"SNAKEPIT_TEST_MARKS": str(tmp_path)})
    with Client(worker.address) as client:
        stream = client.stream("ticks", key="s1", n=10_000, interval=0.005)
        received = [next(stream) for _ in range(5)]
        assert received == [0, 1, 2, 3, 4]
        stream.close()  # cancels the RPC
        wait_for(lambda: (tmp_path / "closed-s1").exists())
        assert list(client.stream("sync_ticks", n=4)) == [0, 1, 2, 3]


def test_concurrency_limit_refuses_with_resource_exhausted(procs: ProcessFactory) -> None:
    """With no backlog (``--backlog 0``) a call beyond the limit is refused at once."""
    worker = procs.worker("--backlog", "0", adapter=PROBE, concurrency=2)
    with Client(worker.address) as client, ThreadPoolExecutor(2) as pool:
        busy = [pool.submit(client.execute, "block", seconds=1.0) for _ in range(2)]
        time.sleep(0.3)
        with pytest.raises(ResourceExhausted, match="concurrency limit") as refused:
            client.execute("pid")
        assert refused.value.not_started
        assert [f.result(timeout=5) for f in busy] == [1.0, 1.0]
        assert client.execute("pid") == worker.pid


def test_health_is_not_serving_until_the_adapter_is_initialised(procs: ProcessFactory) -> None:
    worker = procs.worker(adapter="tests.support.adapters:SlowStartAdapter", wait=False,
                          env={"SNAKEPIT_TEST_INIT_SECONDS": "2"})  # fmt: skip
    wait_for(lambda: health_status(worker.address) is not None)
    assert health_status(worker.address) == NOT_SERVING
    assert health_status(worker.address, "snakepit.bridge.v1.BridgeService") == NOT_SERVING
    wait_for(lambda: health_status(worker.address) == SERVING, timeout=10)


def test_sigterm_drains_in_flight_calls_then_exits(procs: ProcessFactory) -> None:
    worker = procs.worker(adapter=PROBE)
    with Client(worker.address) as client, ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(client.execute, "block", seconds=1.0)
        time.sleep(0.3)
        worker.signal(signal.SIGTERM)
        wait_for(lambda: health_status(worker.address) == NOT_SERVING, timeout=3)
        refusals: list[Unavailable] = []

        def refused() -> bool:
            """New calls still run for the grace window (--drain-grace), then are refused."""
            try:
                client.execute("pid")
            except Unavailable as exc:
                refusals.append(exc)
                return True
            return False

        wait_for(refused, timeout=5)
        assert "draining" in str(refusals[0])
        assert refusals[0].not_started
        assert in_flight.result(timeout=5) == 1.0
    assert worker.wait(timeout=10) == 0


def test_a_call_waiting_in_the_backlog_when_the_grace_ends_still_runs(
    procs: ProcessFactory,
) -> None:
    """A call admitted within the grace window but waiting for a slot runs once the slot is
    free; refused, it failed on HAProxy, which cannot send a gRPC refusal elsewhere (an image
    roll in CI, stop 29)."""
    worker = procs.worker(adapter=PROBE, concurrency=1)
    with Client(worker.address) as client, ThreadPoolExecutor(2) as pool:
        holding = pool.submit(client.execute, "block", seconds=2.0)
        time.sleep(0.3)
        waiting = pool.submit(client.execute, "block", seconds=0.2)  # in the backlog
        time.sleep(0.2)
        worker.signal(signal.SIGTERM)  # the grace (1 s) ends while both are still there
        assert holding.result(timeout=10) == 2.0
        assert waiting.result(timeout=10) == 0.2
        with pytest.raises(Unavailable, match="draining"):  # a call after the grace: refused
            client.execute("pid")
    assert worker.wait(timeout=10) == 0


def test_worker_recycles_after_max_requests(procs: ProcessFactory) -> None:
    worker = procs.worker("--max-requests", "3")
    with Client(worker.address) as client:
        for i in range(3):
            assert client.execute("add", a=i, b=1) == i + 1
    assert worker.wait(timeout=10) == 0


def test_the_default_sleep_is_bounded_and_the_faults_sleep_is_not(procs: ProcessFactory) -> None:
    with Client(procs.worker().address) as client, pytest.raises(InvalidArgument, match="0 to 60"):
        client.execute("sleep", seconds=1e9, timeout=5)
    with Client(procs.worker(adapter=FAULTS).address) as client:
        assert {"crash", "echo"} <= {t.name for t in client.list_tools()}
        with pytest.raises(DeadlineExceeded):
            client.execute("sleep", seconds=1e9, timeout=0.3)


def test_crash_kills_only_its_own_worker(procs: ProcessFactory) -> None:
    doomed = procs.worker(adapter=FAULTS)
    survivor = procs.worker()
    with Client(doomed.address) as client, pytest.raises(Unavailable):
        client.execute("crash", timeout=5)
    assert doomed.wait(timeout=5) == -signal.SIGKILL
    with Client(survivor.address) as client:
        assert client.execute("add", a=2, b=2) == 4


def test_large_tensors_pass_the_raised_message_limit(procs: ProcessFactory) -> None:
    worker = procs.worker()
    array = np.random.default_rng(1).random(50 * 1024 * 1024 // 8)
    with Client(worker.address) as client:
        echoed = client.execute("echo", value=array, timeout=60)
    assert echoed.dtype == array.dtype and np.array_equal(echoed, array)


def test_calls_from_many_threads(procs: ProcessFactory) -> None:
    worker = procs.worker(concurrency=8)
    errors: list[BaseException] = []

    def hammer(offset: int) -> None:
        try:
            with Client(worker.address) as client:
                for i in range(50):
                    assert client.execute("add", a=offset, b=i) == offset + i
        except BaseException as exc:  # collected for the main thread
            errors.append(exc)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
