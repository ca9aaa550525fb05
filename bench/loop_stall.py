"""How long large writes hold the router's event loop: value helpers on vs off, in one run.

    python bench/loop_stall.py [--mb 15] [--writes 3] [--rounds 3]

The store RPCs (``StoreService`` over a ``MemoryStore``, as the router serves them) run on a
loopback grpc.aio server in this process, next to a ticker task that asks to wake every
millisecond and records how late each wake-up is: the loop's stalls, which every other caller
of that router would wait through. A client in a child process writes ``--writes`` values of
``--mb`` MB (a string, then bytes) and reads each back. Rounds alternate helpers on and off so
drift hits both alike; the table shows, per kind of value, the longest stall, the total time
the loop was held in stalls above 5 ms, and the CPU time the loop's thread spent per write
(``time.thread_time``: what the write cost the loop, whatever else the machine was doing).
Unlike ``attacks.py`` this leaves out what the machine's load does to another process's
latency: it is the loop alone.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, table

from snakepit.grpc_options import server_options
from snakepit.store import MemoryStore
from snakepit.store.limits import StoreLimits
from snakepit.store.offload import HelperConfig, ValueHelpers
from snakepit.store.service import StoreService, generic_handler

MiB = 1 << 20
_CLIENT = """
import sys, grpc
from snakepit.grpc_options import channel_options
from snakepit.protocol import pb, pb_grpc
target, kind, mb, writes = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
size = mb * 2**20
value = (
    pb.Value(type="string", json=b'"' + b"a" * size + b'"')
    if kind == "string"
    else pb.Value(type="bytes", raw=b"a" * size)
)
with grpc.insecure_channel(target, options=channel_options(256)) as channel:
    stub = pb_grpc.BridgeServiceStub(channel)
    stub.InitializeSession(pb.InitializeSessionRequest(session_id="s", get_or_create=True))
    for _ in range(writes):
        stub.SetVariable(pb.SetVariableRequest(session_id="s", name=kind, value=value))
        stub.GetVariable(pb.GetVariableRequest(session_id="s", name=kind))
"""


async def _ticker(
    stalls: list[float], stop: asyncio.Event, held: list[float] | None = None
) -> None:
    """Ask to wake every millisecond; record how late each wake-up is (ms) and, in ``held``,
    how much CPU the loop's thread spent meanwhile (ms): lateness the loop's own work explains
    is the product's, the rest is the machine not running this process."""
    while not stop.is_set():
        asked, cpu = time.perf_counter(), time.thread_time()
        await asyncio.sleep(0.001)
        stalls.append((time.perf_counter() - asked - 0.001) * 1000)
        if held is not None:
            held.append((time.thread_time() - cpu) * 1000)


async def one(
    kind: str, helpers_on: bool, mb: int, writes: int, *, tick: bool = True
) -> tuple[list[float], float]:
    """The loop's stalls (ms) while a client writes and reads back ``writes`` values, and the
    loop thread's CPU time per write (ms); without ``tick`` no stalls are recorded (the ticker
    costs the loop CPU in proportion to the run's wall time, which the machine's load sets)."""
    limits = StoreLimits(max_value_bytes=(mb + 1) * MiB, max_parsed_value_bytes=(mb + 1) * MiB)
    helpers = ValueHelpers(limits, HelperConfig()) if helpers_on else None
    server = grpc.aio.server(options=server_options(256))
    store = MemoryStore(limits=limits)
    server.add_generic_rpc_handlers((generic_handler(StoreService(store, helpers=helpers)),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    if helpers is not None:  # started before the measurement: start-up is not a stall
        await helpers.check("", "", "warm", "warm", b"\n\x04null\x12\x04null")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    stalls: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.ensure_future(_ticker(stalls, stop) if tick else stop.wait())
    cpu = time.thread_time()
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CLIENT, f"127.0.0.1:{port}", kind, str(mb), str(writes), env=env
    )
    code = await client.wait()
    cpu = (time.thread_time() - cpu) * 1000 / writes
    stop.set()
    await ticker
    await server.stop(None)
    if helpers is not None:
        await helpers.close()
    if code != 0:
        raise RuntimeError(f"the client failed ({code})")
    return stalls, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=15)
    parser.add_argument("--writes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()
    worst: dict[tuple[str, bool], list[float]] = {}
    held: dict[tuple[str, bool], list[float]] = {}
    cpu: dict[tuple[str, bool], list[float]] = {}
    for _ in range(args.rounds):
        for kind in ("string", "bytes"):
            for on in (True, False):
                stalls, _ = asyncio.run(one(kind, on, args.mb, args.writes))
                worst.setdefault((kind, on), []).append(max(stalls))
                held.setdefault((kind, on), []).append(sum(s for s in stalls if s > 5))
                _, per_write = asyncio.run(one(kind, on, args.mb, args.writes, tick=False))
                cpu.setdefault((kind, on), []).append(per_write)
    rows = []
    for kind in ("string", "bytes"):
        on_w, off_w = statistics.median(worst[kind, True]), statistics.median(worst[kind, False])
        on_h, off_h = statistics.median(held[kind, True]), statistics.median(held[kind, False])
        on_c, off_c = statistics.median(cpu[kind, True]), statistics.median(cpu[kind, False])
        rows.append(
            [
                f"{args.writes} x {args.mb} MB {kind} (write + read)",
                f"{off_w:.1f}",
                f"{on_w:.1f}",
                f"{off_h:.0f}",
                f"{on_h:.0f}",
                f"{off_c:.1f}",
                f"{on_c:.1f}",
            ]
        )
    print(f"medians of {args.rounds} rounds; load average before {load_before[0]:.1f}, "
          f"after {os.getloadavg()[0]:.1f}")  # fmt: skip
    headers = ["writes", "worst stall ms: on the loop", "helpers", "held >5 ms: on the loop"]
    headers += ["helpers", "loop CPU ms per write: on the loop", "helpers"]
    print(table(headers, rows))


if __name__ == "__main__":
    main()
