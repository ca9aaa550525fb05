"""How long one principal's flood of store calls holds the router's event loop, with and
without ``--max-store-calls-per-principal``, in one run.

    python bench/flood_stall.py [--creates 20000] [--concurrency 32] [--rounds 3] [--bound 8]

The store RPCs (``StoreService`` over a ``MemoryStore``, a gate with two token principals, as
the router serves them) run on a loopback grpc.aio server in this process, next to the ticker of
``loop_stall.py``: a task that asks to wake every millisecond, i.e. another caller's callback
becoming ready. A client in a child process sends ``--creates`` ``InitializeSession`` calls,
``--concurrency`` at a time, as one principal (the review's 20,000-session flood: after its
1,000 sessions every call is refused). Rounds alternate the bound on and off.

Two numbers per tick: how late it woke (wall), and how much CPU the loop's thread spent before
it could (``time.thread_time``): that CPU is work the loop did ahead of the other caller, the
product's share of the wait; the rest of the lateness is the machine not running this process
(on a shared 2-core machine, most of it). The table shows the worst and p99 of both.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, median_rows, table
from loop_stall import _ticker

from snakepit.grpc_options import server_options
from snakepit.router.shares import PrincipalShares
from snakepit.security.gate import AuthConfig, build_gate
from snakepit.store import MemoryStore
from snakepit.store.service import StoreService, generic_handler

TOKEN = "flooder-token-0123456789abcdef"
_CLIENT = """
import asyncio, sys, grpc
from snakepit.protocol import pb, pb_grpc
target, token, creates, concurrency = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
metadata = (("authorization", f"Bearer {token}"),)
async def main():
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        pending = iter(range(creates))
        async def worker():
            for _ in pending:
                try:
                    await stub.InitializeSession(pb.InitializeSessionRequest(), metadata=metadata)
                except grpc.aio.AioRpcError:
                    pass
        await asyncio.gather(*(worker() for _ in range(concurrency)))
asyncio.run(main())
"""


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[int(0.99 * (len(ordered) - 1))]


async def one(bound: int, creates: int, concurrency: int, tokens: str) -> dict[str, float]:
    gate = build_gate(AuthConfig(tokens_file=tokens))
    shares = PrincipalShares(
        bound, queue_size=1000, queue_timeout=30.0, flag="--max-store-calls-per-principal"
    )
    server = grpc.aio.server(options=server_options())
    service = StoreService(MemoryStore(), gate, shares=shares)
    server.add_generic_rpc_handlers((generic_handler(service),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    stalls: list[float] = []
    held: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.ensure_future(_ticker(stalls, stop, held))
    started, cpu = time.perf_counter(), time.thread_time()
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CLIENT,
        f"127.0.0.1:{port}",
        TOKEN,
        str(creates),
        str(concurrency),
        env=env,
    )
    code = await client.wait()
    elapsed, cpu = time.perf_counter() - started, time.thread_time() - cpu
    stop.set()
    await ticker
    await server.stop(None)
    if code != 0:
        raise RuntimeError(f"the client failed ({code})")
    return {
        "worst": max(stalls),
        "p99": _p99(stalls),
        "held worst": max(held),
        "held p99": _p99(held),
        "s": elapsed,
        "us/call": cpu / creates * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--creates", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bound", type=int, default=8)
    args = parser.parse_args()
    tokens = Path(tempfile.mkdtemp(prefix="snakepit-flood-")) / "tokens"
    tokens.write_text(f"flooder:{TOKEN}\n")
    load_before = os.getloadavg()
    runs: dict[int, list[dict[str, float]]] = {args.bound: [], 0: []}
    for _ in range(args.rounds):
        for bound in (args.bound, 0):
            result = asyncio.run(one(bound, args.creates, args.concurrency, str(tokens)))
            runs[bound].append(result)
    keys = ["worst", "p99", "held worst", "held p99", "s", "us/call"]
    rows = median_rows("--max-store-calls-per-principal", runs, keys)
    print(f"{args.creates} creates, {args.concurrency} at a time; medians of {args.rounds} rounds; "
          f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")  # fmt: skip
    headers = ["bound", "tick late worst ms", "p99 ms", "loop CPU ahead worst ms", "p99 ms"]
    print(table([*headers, "flood s", "loop CPU us per call"], rows))


if __name__ == "__main__":
    main()
