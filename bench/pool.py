"""Pool benchmarks: straight to a worker vs through the router vs direct mode; scaling with workers.

    python bench/pool.py [--seconds S] [--rounds R]

Every process is a child of this one. First the ghz run of ``datapath.py`` (the bare grpc.aio
floor, a worker, the router on each data path; issue 11 targets), then, side by side (issue 4
targets):
- small calls (``add``), latency p50/p99 one at a time and throughput with many in flight:
  direct mode >= 0.9x and the router >= 0.6x the straight-to-worker throughput;
- I/O-bound calls (``sleep(0.05)``) with 1, 2, 4, 8 workers: >= 0.9 * N x one worker;
- ``snakepit serve --workers 8`` ready within 3 s.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, spawn, table, wait_serving
from datapath import run as data_paths

from snakepit import AsyncClient, Client


def latency(client: Client, calls: int) -> tuple[float, float]:
    samples = []
    for i in range(calls):
        started = time.perf_counter()
        client.execute("add", a=i, b=1)
        samples.append((time.perf_counter() - started) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.99 * len(samples))]


async def throughput(call: Callable[[], Awaitable[Any]], in_flight: int, seconds: float) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await call()
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(in_flight)))
    return done / (time.perf_counter() - started)


class Pool:
    """N workers and a router, all children of this process."""

    def __init__(self, workers: int, concurrency: int) -> None:
        self.router_port = free_port()
        self.worker_ports = [free_port() for _ in range(workers)]
        self.procs: list[subprocess.Popen[bytes]] = []
        for i, port in enumerate(self.worker_ports):
            self.procs.append(spawn(["worker", "--host", "127.0.0.1", "--port", str(port), "--worker-id", f"w{i}",
                                     "--concurrency", str(concurrency)]))  # fmt: skip
        entries = ",".join(f"w{i}=127.0.0.1:{p}" for i, p in enumerate(self.worker_ports))
        self.procs.append(spawn(["router", "--host", "127.0.0.1", "--port", str(self.router_port),
                                 "--workers", entries, "--worker-concurrency", str(concurrency)]))  # fmt: skip
        for port in [*self.worker_ports, self.router_port]:
            wait_serving(f"127.0.0.1:{port}")
        with Client(self.router) as client:
            deadline = time.monotonic() + 30
            while client.status()["workers_ready"] < workers and time.monotonic() < deadline:
                time.sleep(0.05)

    @property
    def router(self) -> str:
        return f"127.0.0.1:{self.router_port}"

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


BARE_PROXY = """
import asyncio, sys, grpc
from grpc_health.v1 import health, health_pb2_grpc
async def main():
    upstream = grpc.aio.insecure_channel(sys.argv[2]).unary_unary(
        "/snakepit.bridge.v1.BridgeService/ExecuteTool")
    async def forward(request, context):
        metadata = tuple((k, v) for k, v in context.invocation_metadata() if k != "user-agent")
        return await upstream(request, timeout=context.time_remaining(), metadata=metadata)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "snakepit.bridge.v1.BridgeService",
        {"ExecuteTool": grpc.unary_unary_rpc_method_handler(forward)}),))
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    server.add_insecure_port("127.0.0.1:" + sys.argv[1])
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


def small_calls(seconds: float, in_flight: int) -> list[list[str]]:
    pool = Pool(1, concurrency=256)
    proxy_port = free_port()
    worker = f"127.0.0.1:{pool.worker_ports[0]}"
    pool.procs.append(subprocess.Popen([sys.executable, "-c", BARE_PROXY, str(proxy_port), worker]))
    wait_serving(f"127.0.0.1:{proxy_port}")
    targets = {
        "straight to the worker": (worker, False),
        "through the router": (pool.router, False),
        "direct mode": (pool.router, True),
        "(floor: bare grpc.aio pass-through proxy)": (f"127.0.0.1:{proxy_port}", False),
    }
    rows: list[list[str]] = []
    base = 0.0
    try:
        for name, (target, direct) in targets.items():
            with Client(target, direct=direct) as client:
                latency(client, 100)  # warm up
                p50, p99 = latency(client, 1000)

            async def run(target: str = target, direct: bool = direct) -> float:
                async with AsyncClient(target, direct=direct) as aclient:
                    await throughput(lambda: aclient.execute("add", a=1, b=2), in_flight, 0.5)
                    return await throughput(
                        lambda: aclient.execute("add", a=1, b=2), in_flight, seconds
                    )

            rate = asyncio.run(run())
            base = base or rate
            rows.append(
                [name, f"{p50:.2f} ms", f"{p99:.2f} ms", f"{rate:.0f}/s", f"{rate / base:.2f}x"]
            )
    finally:
        pool.close()
    return rows


def io_bound(seconds: float, concurrency: int) -> list[list[str]]:
    rows: list[list[str]] = []
    one = 0.0
    for workers in (1, 2, 4, 8):
        pool = Pool(workers, concurrency=concurrency)
        try:

            async def run(pool: Pool = pool, workers: int = workers) -> float:
                async with AsyncClient(pool.router) as aclient:
                    call = lambda: aclient.execute("sleep", seconds=0.05)  # noqa: E731
                    await throughput(call, workers * concurrency, 0.3)
                    return await throughput(call, workers * concurrency, seconds)

            rate = asyncio.run(run())
        finally:
            pool.close()
        one = one or rate
        rows.append(
            [str(workers), f"{rate:.0f}/s", f"{rate / one:.2f}x", f"{rate / (one * workers):.2f}"]
        )
    return rows


def serve_ready(workers: int) -> float:
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "snakepit", "serve", "--workers", str(workers), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if b"pool ready" in line:
                return time.perf_counter() - started
        raise RuntimeError("snakepit serve exited before it was ready")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each throughput run")
    parser.add_argument("--in-flight", type=int, default=32, help="concurrent small calls")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the ghz run")
    args = parser.parse_args()

    print(f"small calls (add) with ghz, {args.in_flight} in flight, {args.rounds} rounds "
          "interleaved, medians; one worker behind both router data paths")  # fmt: skip
    print(data_paths(args.rounds, args.seconds, args.in_flight))

    print(f"\nsmall calls (add) from the Python client: latency one at a time; throughput with "
          f"{args.in_flight} in flight")  # fmt: skip
    print(
        table(
            ["path", "p50", "p99", "throughput", "vs straight"],
            small_calls(args.seconds, args.in_flight),
        )
    )

    print("\nI/O-bound calls (sleep 0.05 s) through the router, 4 in flight per worker")
    print(table(["workers", "throughput", "vs 1 worker", "efficiency"], io_bound(args.seconds, 4)))

    times = [serve_ready(8) for _ in range(3)]
    print(f"\nsnakepit serve --workers 8 ready in {min(times):.2f} s (best of 3; all: "
          + ", ".join(f"{t:.2f}" for t in times) + ")")  # fmt: skip


if __name__ == "__main__":
    main()
