"""Reading router replicas for the autoscaler: real router processes, a dead address, a held call."""

from __future__ import annotations

import asyncio
import time

from snakepit import AsyncClient
from tests.fixtures.processes import ProcessFactory, free_port


async def test_load_is_summed_and_a_silent_router_makes_it_incomplete(
    procs: ProcessFactory,
) -> None:
    from snakepit.autoscale.routers import RouterSet

    worker = procs.worker(concurrency=4)
    a = procs.router([worker])
    b = procs.router([worker])
    routers = RouterSet(on_starved=lambda: None)
    try:
        assert await routers.read() == (0.0, False)  # nothing discovered yet: unknown
        routers.set_routers([a.address, b.address])
        assert await routers.read() == (0.0, True)
        async with AsyncClient(a.address) as ca, AsyncClient(b.address) as cb:
            calls = [ca.execute("sleep", seconds=1.0) for _ in range(2)]
            calls.append(cb.execute("sleep", seconds=1.0))
            running = asyncio.gather(*calls)
            await asyncio.sleep(0.4)
            assert await routers.read() == (3.0, True)
            routers.set_routers([a.address, b.address, f"127.0.0.1:{free_port()}"])
            load, complete = await routers.read()
            assert (load, complete) == (3.0, False)  # the silent one is not read as zero
            await running
    finally:
        await routers.close()


async def test_a_held_call_is_heard_at_once(procs: ProcessFactory) -> None:
    from snakepit.autoscale.routers import RouterSet

    # The router's only worker is not running: the call is held in its queue.
    router = procs.router([f"w0=127.0.0.1:{free_port()}"])
    heard = asyncio.Event()
    routers = RouterSet(on_starved=heard.set)
    routers.set_routers([router.address])
    try:
        await asyncio.sleep(0.3)  # the health stream is open
        async with AsyncClient(router.address) as client:
            held = asyncio.ensure_future(client.execute("add", a=1, b=2, timeout=5))
            started = time.monotonic()
            await asyncio.wait_for(heard.wait(), 2)
            print(f"held call heard after {(time.monotonic() - started) * 1000:.0f} ms")
            assert await routers.read() == (1.0, True)  # queued counts as load
            held.cancel()
    finally:
        await routers.close()
