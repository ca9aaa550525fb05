"""Tensor throughput with and without grpc's BDP probes on the client channel (issue 10).

    python bench/bdp_probe.py [--rounds R] [--seconds S] [--mb M] [--in-flight N]

Channels send no BDP probe PINGs (``grpc_options.channel_options``): a probe unread when a server
closes an aged-out connection turned the close into a reset that dropped an answer. The probes
only tune the flow-control window, so this measures what turning them off costs where a pool
runs: M MB each way (``tensor_scale``) through a router and one worker, N calls in flight, the
two settings interleaved round by round in one run. Target: off >= 0.95x on.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import spawn_pair, stop_all, table

from snakepit import AsyncClient
from snakepit.client import base
from snakepit.grpc_options import Options, channel_options


def _options(probes: bool) -> Options:
    """The client's channel options with BDP probes as asked."""
    kept = [(k, v) for k, v in channel_options() if k != "grpc.http2.bdp_probe"]
    return [*kept, ("grpc.http2.bdp_probe", int(probes))]


async def _rate(target: str, probes: bool, seconds: float, tensor: np.ndarray, n: int) -> float:
    """Calls per second of ``n`` concurrent tensor calls, probes on or off."""
    base.channel_options = lambda *a, **k: _options(probes)  # type: ignore[assignment]
    try:
        async with AsyncClient(target, timeout=60) as client:
            await client.execute("tensor_scale", x=tensor, factor=2.0)  # connect, warm up
            deadline = time.monotonic() + seconds
            done = 0

            async def loop() -> None:
                nonlocal done
                while time.monotonic() < deadline:
                    await client.execute("tensor_scale", x=tensor, factor=2.0)
                    done += 1

            started = time.monotonic()
            await asyncio.gather(*(loop() for _ in range(n)))
            return done / (time.monotonic() - started)
    finally:
        base.channel_options = channel_options


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--mb", type=float, default=1.0)
    parser.add_argument("--in-flight", type=int, default=4)
    args = parser.parse_args()
    tensor = np.ones(int(args.mb * 2**20 / 8))
    procs, router = spawn_pair()
    rates: dict[bool, list[float]] = {True: [], False: []}
    try:
        for _ in range(args.rounds):
            for probes in (True, False):
                rate = asyncio.run(_rate(router, probes, args.seconds, tensor, args.in_flight))
                rates[probes].append(rate)
    finally:
        stop_all(procs)
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(
        table(
            ["BDP probes", "calls/s (median)", "rounds"],
            [
                ["on (grpc default)", f"{on:.1f}", " ".join(f"{r:.1f}" for r in rates[True])],
                ["off (snakepit)", f"{off:.1f}", " ".join(f"{r:.1f}" for r in rates[False])],
            ],
        )
    )
    print(f"off/on = {off / on:.2f} (target >= 0.95)")


if __name__ == "__main__":
    main()
