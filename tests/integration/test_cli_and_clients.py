"""What the README promises a person at a terminal and a Python program: the ``call`` and
``status`` commands, configuration from the environment, the asyncio client, and worker
recycling under load, all against real processes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest

from snakepit import AsyncClient, Client
from snakepit.errors import NotFound, ResourceExhausted
from tests.fixtures.processes import (
    ProcessFactory,
    child_env,
    connections_to,
    free_port,
    start_pool,
    wait_for,
)
from tests.support.load import MixedLoad


def snakepit(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "snakepit", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=child_env(**env),
    )


@pytest.fixture
def pool(procs: ProcessFactory) -> str:
    router, _ = start_pool(procs, 2)
    return router.address


def test_call_prints_json_results_and_streams(pool: str) -> None:
    added = snakepit("call", "add", "a=1", "b=2", "--target", pool)
    assert (added.returncode, added.stdout.strip()) == (0, "3.0")
    echoed = snakepit("call", "echo", 'value={"k": [1, null]}', "--target", pool)
    assert json.loads(echoed.stdout) == {"k": [1, None]}
    raw = snakepit("call", "echo", "value=plain text", "--target", pool)
    assert json.loads(raw.stdout) == "plain text"  # not JSON: passed as a string
    streamed = snakepit("call", "count", "n=3", "--stream", "--target", pool)
    assert streamed.stdout.split() == ["0", "1", "2"]


def test_call_in_a_session_creates_it_and_keeps_its_variables(pool: str) -> None:
    for expected in (1, 2):
        out = snakepit("call", "counter_increment", "--session", "cli-s1", "--target", pool)
        assert out.stdout.strip() == str(expected), out.stderr
    with Client(pool) as client:
        assert client.session("cli-s1", keep=True).get("counter") == 2


def test_call_errors_exit_1_with_the_code_and_message(pool: str) -> None:
    unknown = snakepit("call", "no_such_tool", "--target", pool)
    assert unknown.returncode == 1
    assert unknown.stderr.startswith("error: NOT_FOUND: unknown tool 'no_such_tool'")
    failed = snakepit("call", "fail", "message=boom", "--target", pool)
    assert failed.returncode == 1
    assert "error: INTERNAL: boom" in failed.stderr or "ValueError" in failed.stderr
    assert "Traceback" in failed.stderr  # the tool's own traceback, for the person debugging
    bad = snakepit("call", "add", "a1", "--target", pool)
    assert bad.returncode != 0 and "key=value" in bad.stderr


def test_status_as_a_table_and_as_json(pool: str) -> None:
    table = snakepit("status", "--target", pool)
    assert table.returncode == 0
    assert "workers 2/2 ready" in table.stdout
    assert "worker-0" in table.stdout and "worker-1" in table.stdout
    status = json.loads(snakepit("status", "--json", "--target", pool).stdout)
    assert status["workers_ready"] == 2 and len(status["workers"]) == 2


def test_every_option_can_come_from_the_environment(procs: ProcessFactory) -> None:
    """Pods are configured this way: SNAKEPIT_ + the option name, and the pinned alias
    SNAKEPIT_WORKER_CONCURRENCY for the worker's --concurrency."""
    port = free_port()
    worker = procs.start(
        "env-worker",
        ["worker", "--host", "127.0.0.1", "--worker-id", "env-worker"],
        f"127.0.0.1:{port}",
        env={
            "SNAKEPIT_PORT": str(port),
            "SNAKEPIT_WORKER_CONCURRENCY": "1",
            "SNAKEPIT_BACKLOG": "0",
        },
    )
    with Client(worker.address) as client, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(client.execute, "sleep", seconds=1.0)
        time.sleep(0.3)
        with pytest.raises(ResourceExhausted, match=r"concurrency limit \(1\)"):
            client.execute("add", a=1, b=1)
        assert busy.result(timeout=5) == 1.0
    added = snakepit("call", "add", "a=2", "b=2", SNAKEPIT_TARGET=worker.address)
    assert (added.returncode, added.stdout.strip()) == (0, "4.0")


def test_async_client_does_what_the_sync_client_does(pool: str) -> None:
    async def main() -> None:
        async with AsyncClient(pool, timeout=30) as client:
            assert await client.execute("add", a=1, b=2) == 3
            assert [i async for i in client.stream("count", n=4)] == [0, 1, 2, 3]
            scaled = await client.execute("tensor_scale", x=np.arange(4.0), factor=2.0)
            assert np.array_equal(scaled, np.arange(4.0) * 2)
            assert (await client.routing_table())["workers"]
            assert (await client.status())["workers_ready"] == 2
            async with await client.session() as session:
                await session.set("lr", 0.5, type="float", constraints={"min": 0, "max": 1})
                assert await session.get("lr") == 0.5
                assert await session.increment("steps", 2) == 2
                assert await session.execute("counter_increment", name="steps") == 3
                assert (await session.list()).keys() == {"lr", "steps"}
                seen = []
                watch = session.watch(["lr"])

                async def collect() -> None:
                    async for change in watch:
                        seen.append(change)
                        if len(seen) == 2:
                            return

                task = asyncio.create_task(collect())
                await asyncio.sleep(0.3)
                await session.set("lr", 0.25)
                await session.set("lr", 0.125)
                await asyncio.wait_for(task, 10)
                assert seen[-1].variable is not None and seen[-1].variable.value == 0.125
            with pytest.raises(NotFound):
                await client.execute("no_such_tool")
        async with AsyncClient(pool, direct=True, timeout=30) as direct:
            assert await direct.execute("add", a=2, b=2) == 4
            session = await direct.session("async-direct", keep=True)
            assert [i async for i in session.stream("count", n=3)] == [0, 1, 2]

    asyncio.run(main())


def test_async_client_moves_to_new_connections_under_calls_and_streams(pool: str) -> None:
    """``AsyncClient(max_connection_age=...)`` reconnects on its own (client/rotation.py): 32
    tasks of short calls, calls that outlive many connection ages, streams and a watch all
    finish while new calls move on, and closing the client leaves no connection open."""
    port = int(pool.rsplit(":", 1)[1])

    async def main() -> set[int]:
        seen: set[int] = set()
        async with AsyncClient(pool, timeout=30, max_connection_age=0.05) as client:
            deadline = time.monotonic() + 3

            async def short() -> int:
                done = 0
                while time.monotonic() < deadline:
                    assert await client.execute("add", a=done, b=1) == done + 1
                    done += 1
                return done

            async def long() -> float:
                return float(await client.execute("sleep", seconds=1.0))

            async def stream() -> list[int]:
                items = []
                async for i in client.stream("count", n=5):
                    items.append(i)
                    await asyncio.sleep(0.2)  # read slowly: the stream spans connection ages
                return items

            async def watch() -> float:
                async with await client.session() as session:
                    await session.set("x", 0.0, type="float")
                    changes = session.watch(["x"])
                    latest = asyncio.create_task(_first_change(changes))
                    await asyncio.sleep(0.5)  # the watch's connection retires meanwhile
                    await session.set("x", 1.0)
                    return await asyncio.wait_for(latest, 10)

            async def sample() -> None:
                while time.monotonic() < deadline:
                    seen.update(connections_to(port))
                    await asyncio.sleep(0.02)

            results = await asyncio.gather(
                *(short() for _ in range(24)),
                *(long() for _ in range(4)),
                *(stream() for _ in range(3)),
                watch(),
                sample(),
            )
            assert all(r > 10 for r in results[:24]), results[:24]
            assert results[24:28] == [1.0] * 4
            assert results[28:31] == [[0, 1, 2, 3, 4]] * 3
            assert results[31] == 1.0
        return seen

    seen = asyncio.run(main())
    assert len(seen) >= 10, f"the client reconnected only {len(seen)} times"
    wait_for(lambda: not connections_to(port), timeout=10)


async def _first_change(changes: Any) -> float:
    """The value a watch reports first (a watch starts with the next change)."""
    async for change in changes:
        return float(change.variable.value)
    raise AssertionError("the watch ended")


def test_workers_recycled_by_request_count_under_load_fail_no_call(
    procs: ProcessFactory,
) -> None:
    """``--max-requests`` (here from the environment ``snakepit serve`` passes on): each worker
    drains and exits after 40 calls and serve starts a fresh one; calls in flight finish, the
    others go to the other worker or wait, and the load sees no failure."""
    pool = procs.serve(workers=2, env={"SNAKEPIT_MAX_REQUESTS": "40"})
    with Client(pool.address) as client:
        before = {client.execute("whoami")["pid"] for _ in range(4)}
    with MixedLoad(pool.address, sessions=8, mix={"add": 0.7, "increment": 0.3}) as load:
        with load.window("recycling every 40 calls") as window:
            time.sleep(6.0)
        window.check(min_calls=60)
        load.check_no_acknowledged_write_lost()
    with Client(pool.address) as client:
        wait_for(lambda: client.status()["workers_ready"] == 2, timeout=20)
        after = {client.execute("whoami")["pid"] for _ in range(4)}
    assert not before & after  # every worker process was replaced at least once
