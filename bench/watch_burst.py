"""What another caller waits through while one client opens 300 watches and writes 1 MB three times.

    python bench/watch_burst.py [--rounds 3] [--streams 64]

The store RPCs (``StoreService`` over a ``MemoryStore`` with its value helpers, as the router
serves them) run on a loopback grpc.aio server in this process, next to the ticker of
``loop_stall.py`` (how late a callback that asked to wake every millisecond runs, and how much
CPU the loop's thread spent before it could). A victim in a child process calls
``GetSession`` every 10 ms on its own connection; an attacker in another child process does
what ``attacks.py``'s 300-watchers window does (300 ``WatchVariables`` of one session at once:
16 admitted, 284 refused; then three 1 MB writes fanned out to the 16; then cancels), and
prints when each phase began. The table shows the victim's worst call per phase, and the
loop's worst stall and CPU ahead, with the server's per-connection stream bound off and at
``--streams`` (``--max-streams-per-connection``), alternated so drift hits both alike.

What it showed (docs/security.md, "300 watchers: what holds the other caller"): the victim's
worst call falls in the opening burst, while the loop itself is never held long: grpc.aio
accepts one new call per loop round trip, first come first served, so the victim's call
waits behind the attacker's 300.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import sys
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, median_rows, table
from loop_stall import _ticker

from snakepit.grpc_options import server_options
from snakepit.store import MemoryStore
from snakepit.store.offload import HelperConfig, ValueHelpers
from snakepit.store.service import StoreService, generic_handler

PHASES = ("opening", "writing", "watched", "cancel")

_VICTIM = """
import json, sys, time, grpc
from snakepit.protocol import pb, pb_grpc
with grpc.insecure_channel(sys.argv[1]) as channel:
    stub = pb_grpc.BridgeServiceStub(channel)
    stub.InitializeSession(pb.InitializeSessionRequest(session_id="victim"))
    print("ready", flush=True)
    samples, end = [], time.time() + float(sys.argv[2])
    while time.time() < end:
        at, started = time.time(), time.perf_counter()
        stub.GetSession(pb.GetSessionRequest(session_id="victim"), timeout=30)
        samples.append((at, (time.perf_counter() - started) * 1000))
        time.sleep(0.01)
print(json.dumps(samples), flush=True)
"""

_ATTACKER = """
import asyncio, sys, time, grpc
from snakepit.grpc_options import channel_options
from snakepit.protocol import pb, pb_grpc, to_pb
def mark(phase):
    print(phase, time.time(), flush=True)
async def main():
    async with grpc.aio.insecure_channel(sys.argv[1], options=channel_options(64)) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        await stub.InitializeSession(pb.InitializeSessionRequest(session_id="watched"))
        one_mb = pb.SetVariableRequest(session_id="watched", name="v", value=to_pb("x" * 10**6))
        await stub.SetVariable(one_mb)
        mark("opening")
        streams = [
            stub.WatchVariables(pb.WatchVariablesRequest(session_id="watched")) for _ in range(300)
        ]
        async def opened(stream):
            try:
                await asyncio.wait_for(stream.initial_metadata(), 30)
            except (grpc.aio.AioRpcError, TimeoutError):
                pass
        await asyncio.gather(*(opened(s) for s in streams))
        mark("writing")
        for _ in range(3):
            await stub.SetVariable(one_mb)
        mark("watched")
        await asyncio.sleep(2)
        mark("cancel")
        for stream in streams:
            stream.cancel()
        await asyncio.sleep(0.5)
        mark("end")
asyncio.run(main())
"""


async def one(streams: int) -> dict[str, float]:
    """The victim's worst call (ms) per attack phase, the loop's worst stall and CPU ahead."""
    store = MemoryStore()
    helpers = ValueHelpers(store.limits, HelperConfig())
    server = grpc.aio.server(options=server_options(max_streams_per_connection=streams))
    server.add_generic_rpc_handlers((generic_handler(StoreService(store, helpers=helpers)),))
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    await server.start()
    await helpers.check("", "", "warm", "warm", b"\n\x04null\x12\x04null")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    pipe = asyncio.subprocess.PIPE
    victim = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _VICTIM, target, "12", env=env, stdout=pipe
    )
    assert victim.stdout is not None
    await victim.stdout.readline()  # its session exists: its calls are small from here on
    stalls: list[float] = []
    held: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.ensure_future(_ticker(stalls, stop, held))
    quiet_from = time.time()
    await asyncio.sleep(1.0)
    attacker = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _ATTACKER, target, env=env, stdout=pipe
    )
    out, _ = await attacker.communicate()
    stop.set()
    await ticker
    marks = [(line.split()[0], float(line.split()[1])) for line in out.decode().splitlines()]
    samples = json.loads((await victim.communicate())[0].decode().splitlines()[-1])
    await server.stop(None)
    await helpers.close()
    if attacker.returncode != 0 or [name for name, _ in marks] != [*PHASES, "end"]:
        raise RuntimeError(f"the attacker failed ({attacker.returncode}): {marks}")
    result = {"quiet": max([ms for at, ms in samples if quiet_from <= at < marks[0][1]] or [0.0])}
    for (phase, start), (_, end) in itertools.pairwise(marks):
        result[phase] = max([ms for at, ms in samples if start <= at < end] or [0.0])
    result["tick late"], result["loop CPU ahead"] = max(stalls), max(held)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=64, help="the bound compared with none")
    args = parser.parse_args()
    load_before = os.getloadavg()
    runs: dict[int, list[dict[str, float]]] = {0: [], args.streams: []}
    for _ in range(args.rounds):
        for streams in runs:
            runs[streams].append(asyncio.run(one(streams)))
    keys = ["quiet", *PHASES, "tick late", "loop CPU ahead"]
    rows = median_rows("--max-streams-per-connection", runs, keys)
    print(f"medians of {args.rounds} rounds, alternated; load average before "
          f"{load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}")  # fmt: skip
    headers = ["bound", "victim worst ms: quiet", "300 opening", "3 x 1 MB", "watched 2 s"]
    print(table([*headers, "cancel", "loop: tick late worst", "CPU ahead worst"], rows))


if __name__ == "__main__":
    main()
