"""Tools hosted by the caller, over real processes: a worker's tool calls back into the test."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from snakepit import AsyncClient, Client
from snakepit.errors import (
    DeadlineExceeded,
    InvalidArgument,
    NotFound,
    ToolError,
    Unavailable,
)
from tests.fixtures import processes
from tests.fixtures.processes import ProcessFactory
from tests.fixtures.redis import RedisServer
from tests.integration.test_router import start_pool, wait_for, wait_ready
from tests.support import host_app


def scale_and_sum(x: np.ndarray, factor: float) -> dict[str, object]:
    return {"scaled": x * factor, "sum": float(x.sum())}


def lookup_price(item: str) -> float:
    prices = {"apple": 0.5, "pear": 0.75}
    if item not in prices:
        raise LookupError(f"no price for {item!r}")
    return prices[item]


def countdown(n: int) -> Iterator[int]:
    yield from range(n, 0, -1)


def test_a_python_tool_calls_a_tool_hosted_by_the_caller(procs: ProcessFactory) -> None:
    router, _ = start_pool(procs, 2)
    with Client(router.address) as client, client.session() as session:
        client.register_tool("scale_and_sum", scale_and_sum, description="Scale, and sum")
        x = np.arange(50_000, dtype=np.float32)  # above the binary threshold: raw bytes
        out = session.execute("relay", tool="scale_and_sum", arguments={"x": x, "factor": 2})
        assert out["scaled"].dtype == np.float32 and np.array_equal(out["scaled"], x * 2)
        assert out["sum"] == float(x.sum())

        listed = {t.name: t for t in session.list_tools()}
        assert listed["scale_and_sum"].caller_hosted
        assert [p.name for p in listed["scale_and_sum"].parameters] == ["x", "factor"]
        assert listed["scale_and_sum"].description == "Scale, and sum"
        assert not listed["add"].caller_hosted
        assert "scale_and_sum" not in {t.name for t in client.list_tools()}  # no session


def test_streaming_results_and_errors_cross_back_with_type_and_message(
    procs: ProcessFactory,
) -> None:
    router, _ = start_pool(procs, 2)
    with Client(router.address) as client, client.session() as session:
        client.register_tool("countdown", countdown)
        client.register_tool("lookup_price", lookup_price)
        items = list(session.stream("relay_stream", tool="countdown", arguments={"n": 4}))
        assert items == [4, 3, 2, 1]
        assert session.execute("relay", tool="countdown", arguments={"n": 3}) == [3, 2, 1]

        assert session.execute("relay", tool="lookup_price", arguments={"item": "pear"}) == 0.75
        with pytest.raises(ToolError) as raised:
            session.execute("relay", tool="lookup_price", arguments={"item": "plum"})
        assert raised.value.remote_type == "LookupError"
        assert "no price for 'plum'" in raised.value.message
        with pytest.raises(InvalidArgument, match="missing required argument 'item'"):
            session.execute("relay", tool="lookup_price", arguments={})


def test_a_host_that_dies_mid_call_fails_the_call_fast_and_later_calls_find_nothing(
    procs: ProcessFactory,
) -> None:
    router, _ = start_pool(procs, 2)
    with host_app.hosting(router.address, "doomed") as host, Client(router.address) as client:
        session = client.session("doomed", keep=True)
        assert session.execute("relay", tool="stall", arguments={"seconds": 0}) == 0
        error = host_app.killed_mid_call(host, session)
        assert isinstance(error, Unavailable)
        assert "application hosting tool 'stall' went away" in str(error)
        with pytest.raises(NotFound, match="no application hosts one for session 'doomed'"):
            session.execute("relay", tool="stall", arguments={"seconds": 0})


def test_two_applications_host_one_name_for_their_own_sessions(procs: ProcessFactory) -> None:
    router, _ = start_pool(procs, 2)
    with Client(router.address) as alice, Client(router.address) as bob:
        alice.register_tool("whose", lambda: "alice")
        bob.register_tool("whose", lambda: "bob")
        with alice.session() as a, bob.session() as b, alice.session() as a2:
            for _ in range(3):
                assert a.execute("relay", tool="whose", arguments={}) == "alice"
                assert b.execute("relay", tool="whose", arguments={}) == "bob"
                assert a2.execute("relay", tool="whose", arguments={}) == "alice"
        # The session of a client that hosts nothing reaches neither.
        with Client(router.address) as carol, carol.session() as c:
            assert c.execute("relay", tool="add", arguments={"a": 1, "b": 2}) == 3
            with pytest.raises(NotFound, match="no tool 'whose'"):
                c.execute("relay", tool="whose", arguments={})


def test_a_session_deleted_elsewhere_or_expired_no_longer_reaches_its_host(
    procs: ProcessFactory,
) -> None:
    """Removal when the session ends, not only when the stream does: a later session under the
    same id (opened by another application) must not reach the first application's tool."""
    router, _ = start_pool(procs, 2)
    with Client(router.address) as app, Client(router.address) as other:
        app.register_tool("whose", lambda: "app")
        deleted = app.session("hosted-then-deleted", keep=True)
        expiring = app.session("hosted-then-expired", ttl=1, keep=True)
        assert deleted.execute("relay", tool="whose", arguments={}) == "app"
        assert expiring.execute("relay", tool="whose", arguments={}) == "app"
        assert other.session(deleted.id, keep=True).close()  # deleted by another client

        assert app._host is not None
        served = app._host.host.sessions  # what the app's stream would claim on a reconnect
        wait_for(lambda: not served & {deleted.id, expiring.id}, timeout=20, interval=0.2)

        for session_id in (deleted.id, expiring.id):
            with (
                other.session(session_id) as reopened,
                pytest.raises(NotFound, match="no tool 'whose'"),
            ):
                reopened.execute("relay", tool="whose", arguments={})
        # The application's own live sessions still reach it.
        with app.session() as live:
            assert live.execute("relay", tool="whose", arguments={}) == "app"


def test_unregister_deadline_concurrency_and_name_rules(procs: ProcessFactory) -> None:
    router, _ = start_pool(procs, 2, concurrency=8)
    running = 0
    peak = 0
    lock = threading.Lock()

    def busy(seconds: float) -> int:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
        time.sleep(seconds)
        with lock:
            running -= 1
        return peak

    with Client(router.address) as client, client.session() as session:
        handle = client.register_tool("busy", busy, concurrency=3)
        threads = [
            threading.Thread(
                target=session.execute,
                args=("relay",),
                kwargs={"tool": "busy", "arguments": {"seconds": 0.3}},
            )
            for _ in range(6)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert peak == 3  # several at once, never more than the limit

        started = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            session.execute("relay", tool="busy", arguments={"seconds": 30}, timeout=1)
        assert time.monotonic() - started < 10  # bounded by the caller's deadline, not the host

        handle.unregister()
        with pytest.raises(NotFound, match="no tool 'busy'"):
            session.execute("relay", tool="busy", arguments={"seconds": 0})
        client.register_tool("busy", busy)  # the name is free again
        assert session.execute("relay", tool="busy", arguments={"seconds": 0}) >= 1

        with pytest.raises(InvalidArgument, match="already have a tool named 'add'"):
            client.register_tool("add", lambda a, b: a - b)
        with pytest.raises(ValueError, match="already hosts a tool named 'busy'"):
            client.register_tool("busy", busy)


def test_the_async_client_hosts_async_and_sync_functions(procs: ProcessFactory) -> None:
    router, _ = start_pool(procs, 2)
    cancelled = asyncio.Event()

    async def fetch_user(user_id: int) -> dict[str, object]:
        if user_id < 0:
            raise NotFound(f"no user {user_id}")  # a snakepit error chooses the status code
        await asyncio.sleep(0.01)
        return {"id": user_id, "name": f"user-{user_id}"}

    async def wait_forever() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def main() -> None:
        async with AsyncClient(router.address) as client:
            session = await client.session()
            handle = await client.register_tool("fetch_user", fetch_user)
            await client.register_tool("double", lambda v: v * 2)
            user = await session.execute("relay", tool="fetch_user", arguments={"user_id": 7})
            assert user == {"id": 7, "name": "user-7"}
            assert await session.execute("relay", tool="double", arguments={"v": 21}) == 42
            with pytest.raises(NotFound, match="no user -1"):
                await session.execute("relay", tool="fetch_user", arguments={"user_id": -1})

            await client.register_tool("wait_forever", wait_forever)
            with pytest.raises(DeadlineExceeded):
                await session.execute("relay", tool="wait_forever", arguments={}, timeout=1)
            await asyncio.wait_for(cancelled.wait(), 10)  # the host's coroutine was cancelled
            await handle.unregister()
            with pytest.raises(NotFound):
                await session.execute("relay", tool="fetch_user", arguments={"user_id": 7})
            await session.close()

    asyncio.run(main())


def test_two_routers_sharing_redis_forward_a_call_to_the_holder_of_the_stream(
    procs: ProcessFactory, redis_server
) -> None:  # type: ignore[no-untyped-def]
    """Workers call router B; the application's stream is on router A; both share Redis."""
    store = redis_server.url
    router_b, workers = start_pool(procs, 2, "--store", store)
    router_a = procs.router(workers, store=store)
    wait_ready(router_a.address, 2)
    with Client(router_a.address) as client, client.session() as session:
        client.register_tool("lookup_price", lookup_price)
        assert session.execute("relay", tool="lookup_price", arguments={"item": "apple"}) == 0.5
        with pytest.raises(ToolError, match="no price for 'kiwi'"):
            session.execute("relay", tool="lookup_price", arguments={"item": "kiwi"})
        with Client(router_b.address) as other:  # the same session through the other router
            via_b = other.session(session.id, keep=True)
            assert via_b.execute("relay", tool="lookup_price", arguments={"item": "pear"}) == 0.75
            assert {t.name for t in via_b.list_tools() if t.caller_hosted} == {"lookup_price"}
    # The client closed its stream: neither router routes the session any more.
    with Client(router_b.address) as other:
        again = other.session(session.id, keep=True)
        with pytest.raises(NotFound):
            again.execute("relay", tool="lookup_price", arguments={"item": "pear"})


def test_the_example_application_gets_a_quote_priced_by_its_own_tool(
    procs: ProcessFactory,
) -> None:
    pool = procs.serve()
    example = processes.ROOT / "examples" / "hosted_tools.py"
    run = subprocess.run(
        [sys.executable, str(example), pool.address],
        env=processes.child_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "{'lines': {'apple': 2.0, 'fig': 2.5}, 'total': 4.5}"


def test_the_host_registers_again_when_its_router_restarts(
    procs: ProcessFactory, redis_server: RedisServer, redis_prefix: str
) -> None:
    """The sessions live in Redis, so they outlive the router (a router with the in-memory store
    takes its sessions with it, and a host may serve only sessions that exist)."""
    store = f"{redis_server.url}?prefix={redis_prefix}"
    router, workers = start_pool(procs, 2, "--store", store)
    port = int(router.address.rsplit(":", 1)[1])
    with Client(router.address) as client, client.session() as session:
        client.register_tool("lookup_price", lookup_price)
        assert session.execute("relay", tool="lookup_price", arguments={"item": "apple"}) == 0.5
        router.kill()
        procs.router(workers, port=port, store=store)  # the workers' router, a fresh process
        wait_ready(router.address, 2)

        def priced() -> bool:
            try:
                return (
                    session.execute("relay", tool="lookup_price", arguments={"item": "pear"})
                    == 0.75
                )
            except (NotFound, Unavailable):
                return False  # not registered again yet, or a connection not re-made yet

        wait_for(priced, timeout=15)
