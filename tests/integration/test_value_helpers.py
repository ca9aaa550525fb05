"""Large written values are decoded, checked and re-encoded in helper processes, not on the
router's event loop (``store/offload.py``): real helper processes, real gRPC, real stores.

What the loop saves (another caller's latency during a 15 MB write) is measured by
``bench/attacks.py``, not asserted here.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import grpc
import psutil
import pytest

from snakepit import Client
from snakepit.protocol import pb, pb_grpc, to_pb
from snakepit.store import MemoryStore
from snakepit.store.base import SessionStore
from snakepit.store.limits import StoreLimits
from snakepit.store.offload import HelperConfig, ValueHelpers
from snakepit.store.redis import RedisStore
from snakepit.store.service import StoreService, generic_handler
from tests.fixtures.processes import ProcessFactory, wait_for
from tests.fixtures.redis import RedisServer

from .test_store_service import rpc_error

MiB = 1 << 20
LIMITS = StoreLimits(max_parsed_value_bytes=16 * MiB)
# Small enough that a test's "large" values stay quick to build.
THRESHOLD = 64 * 1024


def helper_pids(pid: int) -> list[int]:
    """The value helpers among ``pid``'s descendants."""
    return [
        child.pid
        for child in psutil.Process(pid).children(recursive=True)
        if "snakepit.store.offload" in " ".join(child.cmdline())
    ]


@asynccontextmanager
async def served(
    store: SessionStore, helpers: ValueHelpers | None
) -> AsyncIterator[pb_grpc.BridgeServiceStub]:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((generic_handler(StoreService(store, helpers=helpers)),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield pb_grpc.BridgeServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)
        if helpers is not None:
            await helpers.close()
        await store.close()


@pytest.fixture(params=["memory", "redis"])
def make_store(request: pytest.FixtureRequest) -> Iterator[type[SessionStore] | object]:
    if request.param == "memory":
        yield lambda: MemoryStore(limits=LIMITS)
        return
    redis: RedisServer = request.getfixturevalue("redis_server")
    prefix: str = request.getfixturevalue("redis_prefix")
    yield lambda: RedisStore(redis.url, prefix=prefix, limits=LIMITS)


def test_a_15_mb_write_lands_intact_while_small_calls_go_on(procs: ProcessFactory) -> None:
    serve = procs.serve("--max-parsed-value-bytes", str(16 * MiB))
    text = "snakepit-" * (15 * MiB // 9)
    blob = os.urandom(15 * MiB)
    failures: list[BaseException] = []
    small_calls = 0
    done = threading.Event()

    def others() -> None:
        nonlocal small_calls
        with Client(serve.address) as client, client.session() as session:
            session.set("n", 0)
            while not done.is_set():
                try:
                    assert client.execute("add", a=1, b=2) == 3
                    session.set("n", small_calls)
                    assert session.get("n") == small_calls
                    small_calls += 1
                except BaseException as exc:
                    failures.append(exc)
                    return

    thread = threading.Thread(target=others)
    thread.start()
    try:
        with Client(serve.address, timeout=120) as client, client.session() as session:
            for _ in range(2):
                session.set("text", text)
                session.set("blob", blob)
            assert session.get("text") == text
            assert session.get("blob") == blob
            watched_pids = helper_pids(serve.pid)
    finally:
        done.set()
        thread.join(60)
    assert not failures, failures
    assert small_calls > 0
    # The large values were checked by the router's helper processes (started on demand)...
    assert watched_pids
    # ...which end with it.
    serve.process.send_signal(signal.SIGTERM)
    serve.wait(30)
    assert not [pid for pid in watched_pids if psutil.pid_exists(pid)]


BAD_VALUES = {
    # a decode error: named as the inline decoder names it
    "malformed JSON": pb.Value(type="string", json=b'"' + b"a" * (2 * THRESHOLD)),
    # a check against the declaration: type, then constraints
    "wrong type": to_pb(list(range(THRESHOLD))),
    "too long": to_pb("x" * (2 * THRESHOLD)),
    "pattern": to_pb("a" * (2 * THRESHOLD) + "!"),
}


async def _errors(stub: pb_grpc.BridgeServiceStub) -> dict[str, tuple[grpc.StatusCode, str]]:
    await stub.InitializeSession(pb.InitializeSessionRequest(session_id="s", get_or_create=True))
    for name in ("len", "pat"):
        await stub.RegisterVariable(
            pb.RegisterVariableRequest(
                session_id="s",
                name=name,
                type="string",
                value=to_pb("a"),
                constraints=(
                    pb.Constraints(max_length=THRESHOLD)
                    if name == "len"
                    else pb.Constraints(pattern="a+")
                ),
            )
        )
    target = {"malformed JSON": "len", "wrong type": "len", "too long": "len", "pattern": "pat"}
    out = {}
    for what, value in BAD_VALUES.items():
        request = pb.SetVariableRequest(session_id="s", name=target[what], value=value)
        error = await rpc_error(stub.SetVariable(request))
        out[what] = (error.code(), error.details() or "")
    many = pb.SetVariablesRequest(session_id="s", values={"len": BAD_VALUES["too long"]})
    error = await rpc_error(stub.SetVariables(many))
    out["SetVariables"] = (error.code(), error.details() or "")
    return out


async def test_a_bad_large_value_gets_the_same_error_as_inline(make_store) -> None:  # type: ignore[no-untyped-def]
    helpers = ValueHelpers(LIMITS, HelperConfig(threshold=THRESHOLD))
    async with served(make_store(), helpers) as stub:
        offloaded = await _errors(stub)
        assert helpers.started >= 1  # the values really went to a helper
    async with served(make_store(), None) as stub:
        inline = await _errors(stub)
    assert offloaded == inline
    assert {code for code, _ in inline.values()} == {grpc.StatusCode.INVALID_ARGUMENT}
    assert "malformed value" in inline["malformed JSON"][1]
    assert "SetVariable 'len'" in inline["malformed JSON"][1]


async def test_a_good_large_value_reads_back_as_written(make_store) -> None:  # type: ignore[no-untyped-def]
    helpers = ValueHelpers(LIMITS, HelperConfig(threshold=THRESHOLD))
    values = {
        "text": "é" * THRESHOLD,
        "list": [{"k": i, "v": [i, str(i)]} for i in range(THRESHOLD // 8)],
        "blob": os.urandom(2 * THRESHOLD),
    }
    async with served(make_store(), helpers) as stub:
        await stub.InitializeSession(pb.InitializeSessionRequest(session_id="s"))
        for name, value in values.items():
            written = await stub.SetVariable(
                pb.SetVariableRequest(session_id="s", name=name, value=to_pb(value))
            )
            assert written.variable.version == 1
        again = await stub.SetVariables(
            pb.SetVariablesRequest(session_id="s", values={n: to_pb(v) for n, v in values.items()})
        )
        assert [v.version for v in again.variables] == [2, 2, 2]
        read = await stub.GetVariables(pb.GetVariablesRequest(session_id="s", names=list(values)))
        from snakepit.protocol import from_pb

        assert {v.name: from_pb(v.value) for v in read.variables} == values
        assert {v.name: v.type for v in read.variables} == {
            "text": "string",
            "list": "list",
            "blob": "bytes",
        }
        assert helpers.started >= 1


BIG = pb.SetVariableRequest(session_id="s", name="v", value=to_pb("x" * (4 * THRESHOLD)))


@asynccontextmanager
async def one_helper(
    config: HelperConfig,
) -> AsyncIterator[tuple[pb_grpc.BridgeServiceStub, ValueHelpers, int]]:
    """A store served with ``config``'s helpers, after one large write started a helper:
    (stub, helpers, that helper's pid)."""
    helpers = ValueHelpers(LIMITS, config)
    async with served(MemoryStore(limits=LIMITS), helpers) as stub:
        await stub.InitializeSession(pb.InitializeSessionRequest(session_id="s"))
        await stub.SetVariable(BIG)
        (pid,) = helpers.pids()
        yield stub, helpers, pid


def gone(pid: int) -> bool:
    return not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


async def test_a_helper_killed_mid_check_fails_that_write_only() -> None:
    config = HelperConfig(processes=1, threshold=THRESHOLD)
    async with one_helper(config) as (stub, helpers, pid):
        os.kill(pid, signal.SIGSTOP)  # it now holds the next write until killed
        stuck = asyncio.ensure_future(stub.SetVariable(BIG))
        await asyncio.to_thread(wait_for, lambda: helpers._busy)
        # Small writes do not wait for helpers.
        small = pb.SetVariableRequest(session_id="s", name="small", value=to_pb(1))
        assert (await stub.SetVariable(small)).variable.version == 1
        os.kill(pid, signal.SIGKILL)
        error = await rpc_error(stuck)
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert "the process checking the value ended" in (error.details() or "")
        assert "not written" in (error.details() or "")
        # The next write gets a fresh helper; the failed one changed nothing.
        assert (await stub.SetVariable(BIG)).variable.version == 2
        assert helpers.started == 2


async def test_a_helper_that_dies_idle_costs_no_write() -> None:
    async with one_helper(HelperConfig(processes=1, threshold=THRESHOLD)) as (stub, helpers, pid):
        os.kill(pid, signal.SIGKILL)
        for _ in range(1000):  # until this loop has seen it exit
            if not helpers.pids():
                break
            await asyncio.sleep(0.01)
        assert (await stub.SetVariable(BIG)).variable.version == 2
        assert helpers.started == 2


async def test_helpers_are_bounded_in_time_and_queue() -> None:
    config = HelperConfig(processes=1, waiting=0, timeout=1.0, threshold=THRESHOLD)
    async with one_helper(config) as (stub, helpers, pid):
        os.kill(pid, signal.SIGSTOP)
        stuck = asyncio.ensure_future(stub.SetVariable(BIG))
        await asyncio.to_thread(wait_for, lambda: helpers._busy)
        # No room to wait for the one helper: refused at once.
        error = await rpc_error(stub.SetVariable(BIG))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "value helpers of this router are busy" in (error.details() or "")
        # The stuck check ends at the helper timeout; its helper is killed.
        error = await rpc_error(stuck)
        assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "took longer than 1 s" in (error.details() or "")
        assert gone(pid)
        assert (await stub.SetVariable(BIG)).variable.version == 2


async def test_helpers_start_on_first_use_and_stop_on_close() -> None:
    helpers = ValueHelpers(LIMITS, HelperConfig(processes=2, threshold=THRESHOLD))
    async with served(MemoryStore(limits=LIMITS), helpers) as stub:
        await stub.InitializeSession(pb.InitializeSessionRequest(session_id="s"))
        for i in range(20):  # small values never start one
            await stub.SetVariable(
                pb.SetVariableRequest(session_id="s", name=f"v{i}", value=to_pb("x" * 100))
            )
        assert helpers.started == 0
        big = to_pb("x" * (4 * THRESHOLD))
        await asyncio.gather(
            *(
                stub.SetVariable(pb.SetVariableRequest(session_id="s", name=f"b{i}", value=big))
                for i in range(4)
            )
        )
        assert 1 <= helpers.started <= 2
        pids = helpers.pids()
        await helpers.close()
        assert not [pid for pid in pids if psutil.pid_exists(pid)]
        error = await rpc_error(
            stub.SetVariable(pb.SetVariableRequest(session_id="s", name="b0", value=big))
        )
        assert error.code() == grpc.StatusCode.UNAVAILABLE
