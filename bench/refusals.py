"""What a bare grpc.aio server spends refusing server-streaming calls: the floor under a burst.

    python bench/refusals.py [--calls 3000] [--rounds 2]

A server whose only handler refuses every call (RESOURCE_EXHAUSTED with a small trailing
detail, as the router refuses a watcher over its limit), run in a child process, gets
``--calls`` calls at once from one connection; the table shows its CPU per refused call, for
the two ways a handler can refuse: ``context.abort()`` (raises through grpc.aio's handler
machinery) and ``set_code()`` + return. The two alternate round by round.

Why (docs/security.md, "300 watchers"): grpc.aio accepts calls one per event-loop round trip,
first come first served, so a burst of N refused calls holds another caller's call for about N
times this cost, whatever the handler does. 300 refusals at ~0.2 ms each are ~60 ms of the
loop: more than the 50 ms the hardening issue allows, before snakepit's own work.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import cpu_seconds, free_port, table

SERVER = """
import asyncio, sys
import grpc
MODE = sys.argv[1]
async def main():
    async def refuse(request, context):
        context.set_trailing_metadata((("snakepit-error-bin", b"d" * 200),))
        if MODE == "abort":
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many watchers")
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details("too many watchers")
        return
        yield b""  # a server-streaming handler
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "bench.S", {"Watch": grpc.unary_stream_rpc_method_handler(refuse)}),))
    server.add_insecure_port("127.0.0.1:" + sys.argv[2])
    await server.start()
    await server.wait_for_termination()
asyncio.run(main())
"""


async def burst(address: str, calls: int) -> dict[str, int]:
    """``calls`` refused calls at once on one connection; their status codes, counted."""
    async with grpc.aio.insecure_channel(address) as channel:
        watch = channel.unary_stream("/bench.S/Watch")

        async def one() -> str:
            try:
                async for _ in watch(b""):
                    pass
                return "OK"
            except grpc.aio.AioRpcError as exc:
                return str(exc.code().name)

        return dict(Counter(await asyncio.gather(*(one() for _ in range(calls)))))


def measure(mode: str, calls: int) -> tuple[float, dict[str, int]]:
    """Microseconds of server CPU per refused call, and the codes the burst got."""
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, mode, str(port)])
    try:
        address = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        # Until the server refuses (not UNAVAILABLE: still starting); this also warms it up.
        while asyncio.run(burst(address, 10)) != {"RESOURCE_EXHAUSTED": 10}:
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {mode} server never answered")
            time.sleep(0.1)
        before = cpu_seconds(server.pid)
        codes = asyncio.run(burst(address, calls))
        return (cpu_seconds(server.pid) - before) / calls * 1e6, codes
    finally:
        server.kill()
        server.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # CPU time is read in clock ticks (10 ms): a burst must last many of them.
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    per_call: dict[str, list[float]] = {"abort": [], "set_code": []}
    seen: dict[str, dict[str, int]] = {}
    for _ in range(args.rounds):
        for mode in per_call:
            micros, codes = measure(mode, args.calls)
            per_call[mode].append(micros)
            seen[mode] = codes
    rows = [
        [
            f"context.{mode}()" if mode == "abort" else "set_code() + return",
            f"{statistics.median(values):.0f} us",
            " ".join(f"{v:.0f}" for v in values),
            f"{statistics.median(values) * 300 / 1000:.0f} ms",
            ", ".join(f"{code} {n}" for code, n in sorted(seen[mode].items())),
        ]
        for mode, values in per_call.items()
    ]
    print(f"{args.calls} refused server-streaming calls at once, bare grpc.aio {grpc.__version__}")
    headers = ["refused by", "server CPU per call", "rounds", "x 300 calls", "codes (last round)"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
