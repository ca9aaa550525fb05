"""Reading router replicas for the autoscaler: real router processes, a dead address, a held call.

On both data paths: on HAProxy's, GetPoolStatus adds HAProxy's running and queued calls to the
Python router's, and a call that finds no worker is held by the Python router (where the
autoscaler hears of it) rather than refused.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from snakepit import AsyncClient
from snakepit.autoscale.routers import RouterSet
from snakepit.security.localca import LocalCA, write_file, write_issued
from tests.fixtures.processes import ProcessFactory, free_port, wait_for

TOKEN = "app-token-0123456789abcdef"
DATA_PATHS = pytest.mark.parametrize("data_path", ["python", "haproxy"])
INFO = {"SNAKEPIT_LOG_LEVEL": "info"}  # the router logs its data path at start


@DATA_PATHS
async def test_load_is_summed_and_a_silent_router_makes_it_incomplete(
    procs: ProcessFactory, data_path: str
) -> None:
    worker = procs.worker(concurrency=4)
    a = procs.router([worker], "--data-path", data_path, env=INFO)
    b = procs.router([worker], "--data-path", data_path, env=INFO)
    assert all(f"data path: {data_path}" in r.logs() for r in (a, b))
    routers = RouterSet(on_starved=lambda: None)
    try:
        assert await routers.read() == (0.0, False)  # nothing discovered yet: unknown
        routers.set_routers([a.address, b.address])
        assert await routers.read() == (0.0, True)
        async with AsyncClient(a.address) as ca, AsyncClient(b.address) as cb:
            calls = [ca.execute("sleep", seconds=1.0) for _ in range(2)]
            calls.append(cb.execute("sleep", seconds=1.0))
            running = asyncio.gather(*calls)
            assert await _read_until(routers, (3.0, True)) == (3.0, True)
            routers.set_routers([a.address, b.address, f"127.0.0.1:{free_port()}"])
            load, complete = await routers.read()
            assert (load, complete) == (3.0, False)  # the silent one is not read as zero
            await running
    finally:
        await routers.close()


@DATA_PATHS
async def test_a_held_call_is_heard_at_once(procs: ProcessFactory, data_path: str) -> None:
    # The router's only worker is not running: the call is held in its queue.
    router = procs.router([f"w0=127.0.0.1:{free_port()}"], "--data-path", data_path, env=INFO)
    assert f"data path: {data_path}" in router.logs()
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


async def test_a_secured_router_is_read_from_its_metrics_and_health_ports(
    procs: ProcessFactory, tmp_path: Path
) -> None:
    """A router with TLS and tokens (a default pool on Kubernetes) answers GetPoolStatus only to
    callers it knows, and the autoscaler is none: it reads the load from /metrics and hears a
    held call on the plaintext health port, holding no credential."""
    tokens = tmp_path / "tokens"
    tokens.write_text(f"app:{TOKEN}\n")
    ca = LocalCA.generate("pool CA")
    write_file(tmp_path / "ca.pem", ca.cert_pem)
    write_issued(
        ca.issue("router", ["localhost", "127.0.0.1"]), tmp_path / "cert.pem", tmp_path / "key.pem"
    )
    metrics, health = free_port(), free_port()
    # The router's only worker is not running: calls are held in its queue.
    port = free_port()
    router = procs.start(
        "router",
        ["router", "--host", "127.0.0.1", "--port", str(port), "--store", "memory",
         "--workers", f"w0=127.0.0.1:{free_port()}", "--auth-tokens", str(tokens),
         "--tls-cert", str(tmp_path / "cert.pem"), "--tls-key", str(tmp_path / "key.pem"),
         "--metrics-port", str(metrics), "--health-port", str(health)],
        f"127.0.0.1:{port}",
        wait=False,
    )  # fmt: skip
    await asyncio.to_thread(wait_for, lambda: _answers(health), 30)
    heard = asyncio.Event()
    routers = RouterSet(on_starved=heard.set, metrics_port=metrics, health_port=health)
    plain = RouterSet(on_starved=lambda: None)  # what the operator did before: refused
    routers.set_routers([router.address])
    plain.set_routers([router.address])
    try:
        assert await routers.read() == (0.0, True)
        assert await plain.read() == (0.0, False)  # a secured router does not answer it
        await asyncio.sleep(0.3)  # the health stream is open
        options = {"ca": str(tmp_path / "ca.pem"), "token": TOKEN}
        async with AsyncClient(router.address, **options) as client:
            held = [
                asyncio.ensure_future(client.execute("add", a=1, b=2, timeout=5)) for _ in range(2)
            ]
            await asyncio.wait_for(heard.wait(), 3)
            # The first held call wakes the autoscaler; the second may reach the queue a moment
            # later on a loaded machine.
            assert await _read_until(routers, (2.0, True)) == (2.0, True)  # queued counts as load
            for call in held:
                call.cancel()
    finally:
        await routers.close()
        await plain.close()


async def _read_until(
    routers: RouterSet, expected: tuple[float, bool], within: float = 5.0
) -> tuple[float, bool]:
    """Read the routers until they report `expected` or `within` seconds pass; the last reading.

    Calls sent at once reach a router's queue one by one: a single read right after sending
    them can see fewer on a loaded machine (CI saw 1 of 2), which says nothing about the counting."""
    deadline = time.monotonic() + within
    reading = await routers.read()
    while reading != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        reading = await routers.read()
    return reading


def _answers(port: int) -> bool:
    """Whether the plaintext health port answers (the router is up)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return True
