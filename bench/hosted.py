"""Callback latency: a Python tool calling a tool hosted by the caller vs a plain tool call.

    python bench/hosted.py [--rounds 10] [--per-round 200] [--data-path auto|python|haproxy]

One ``snakepit serve --workers 1`` pool, children of this process; this process hosts
``lookup_price`` (``client.register_tool``). Interleaved round by round, in one session, one call
at a time:
- ``add``: a plain worker tool call (client -> router -> worker);
- ``relay add``: a tool calling a pool tool through the router (+ worker -> router -> worker);
- ``relay lookup_price``: a tool calling the caller-hosted tool (+ worker -> router -> this
  process over its RegisterTool stream, and back).
The callback round trip is ``relay lookup_price`` minus ``add``; target: within 1.5x of the
pool-tool round trip (``relay add`` minus ``add``), since both cross the router twice.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import free_port, spawn, table, wait_serving

from snakepit import Client


def lookup_price(item: str) -> float:
    return 0.5 if item == "apple" else 1.0


def sample(call: Callable[[], Any], count: int) -> list[float]:
    out = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        out.append((time.perf_counter() - started) * 1000)
    return out


def main(rounds: int, per_round: int, data_path: str = "auto") -> None:
    port = free_port()
    pool = spawn(["serve", "--workers", "1", "--port", str(port), "--data-path", data_path])
    address = f"127.0.0.1:{port}"
    try:
        wait_serving(address)
        with Client(address) as client, client.session() as session:
            client.register_tool("lookup_price", lookup_price)
            paths: dict[str, Callable[[], Any]] = {
                "add (plain worker tool call)": lambda: session.execute("add", a=1, b=2),
                "relay add (tool -> pool tool)": lambda: session.execute(
                    "relay", tool="add", arguments={"a": 1, "b": 2}
                ),
                "relay lookup_price (tool -> caller-hosted)": lambda: session.execute(
                    "relay", tool="lookup_price", arguments={"item": "apple"}
                ),
            }
            for call in paths.values():  # warm up every path
                sample(call, 50)
            samples: dict[str, list[float]] = {name: [] for name in paths}
            for _ in range(rounds):
                for name, call in paths.items():
                    samples[name] += sample(call, per_round)
    finally:
        pool.kill()
        pool.wait()
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    rows = []
    for name, values in samples.items():
        values.sort()
        rows.append([name, f"{p50[name]:.2f} ms", f"{values[int(0.99 * len(values))]:.2f} ms"])
    print(table(["path (one call at a time)", "p50", "p99"], rows))
    plain, nested, hosted = p50.values()
    print(f"\ncallback round trip (p50 relay lookup_price - add): {hosted - plain:.2f} ms")
    print(f"pool-tool round trip (p50 relay add - add):          {nested - plain:.2f} ms")
    print(f"ratio: {(hosted - plain) / (nested - plain):.2f}x  (target <= 1.5x)")
    print(f"samples per path: {rounds} rounds of {per_round}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=200)
    parser.add_argument(
        "--data-path", default="auto", help="the router's: auto (HAProxy if installed), python"
    )
    args = parser.parse_args()
    main(args.rounds, args.per_round, args.data_path)
