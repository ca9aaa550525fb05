"""Per-operation latency of the session store: RedisStore vs raw redis-py, and MemoryStore.

Starts its own redis-server (a child of this process, on a free loopback port, in a temp dir,
stopped on exit) and measures, in the same run and interleaved round by round so drift hits
both sides alike:

  get        raw GET                     vs  RedisStore.get_variable
  set        raw SET                     vs  RedisStore.set_variable  (typed, validated, versioned)
  increment  raw INCR                    vs  RedisStore.increment
  batch-100  one raw pipeline of 100 SET vs  RedisStore.set_variables with 100 values
  mget-100   one raw pipeline of 100 GET vs  RedisStore.get_variables of 100 names

Targets: single operations within 1.3x of raw (p50), a batch of 100 within 2x of one raw
pipeline. Run: ``python bench/store.py [--rounds 10] [--per-round 300]``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import redis
import redis.asyncio as aioredis

from snakepit.store import MemoryStore, SessionStore
from snakepit.store.redis import RedisStore

Op = Callable[[], Awaitable[object]]
TARGETS = {"get": 1.3, "set": 1.3, "increment": 1.3, "batch-100": 2.0, "mget-100": 2.0}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not on PATH (apt-get install redis-server)")
    port = free_port()
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
            "--save", "", "--appendonly", "no", "--daemonize", "no"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                sys.exit("redis-server did not start")
            time.sleep(0.01)
    client.close()
    return proc, port


async def sample(op: Op, count: int, into: list[float]) -> None:
    clock = time.perf_counter
    for _ in range(count):
        start = clock()
        await op()
        into.append(clock() - start)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1e6


async def prepare(store: SessionStore) -> None:
    await store.create_session("bench", ttl=3600)
    await store.set_variable("bench", "x", 0.5)
    await store.set_variable("bench", "n", 0)
    await store.set_variables("bench", {f"v{i}": float(i) for i in range(100)})


def store_ops(store: SessionStore) -> dict[str, Op]:
    batch = {f"v{i}": i + 0.25 for i in range(100)}
    names = list(batch)
    return {
        "get": lambda: store.get_variable("bench", "x"),
        "set": lambda: store.set_variable("bench", "x", 0.75),
        "increment": lambda: store.increment("bench", "n"),
        "batch-100": lambda: store.set_variables("bench", batch),
        "mget-100": lambda: store.get_variables("bench", names),
    }


def raw_ops(client: aioredis.Redis) -> dict[str, Op]:
    async def batch_set() -> object:
        async with client.pipeline(transaction=False) as pipe:
            for i in range(100):
                pipe.set(f"raw:v{i}", b"0.25")
            return await pipe.execute()

    async def batch_get() -> object:
        async with client.pipeline(transaction=False) as pipe:
            for i in range(100):
                pipe.get(f"raw:v{i}")
            return await pipe.execute()

    return {
        "get": lambda: client.get("raw:x"),
        "set": lambda: client.set("raw:x", b"0.75"),
        "increment": lambda: client.incr("raw:n"),
        "batch-100": batch_set,
        "mget-100": batch_get,
    }


async def run(rounds: int, per_round: int) -> int:
    with tempfile.TemporaryDirectory(prefix="snakepit-bench-") as tmp:
        proc, port = start_redis(Path(tmp))
        try:
            return await measure(port, rounds, per_round)
        finally:
            proc.terminate()
            proc.wait(timeout=10)


async def measure(port: int, rounds: int, per_round: int) -> int:
    url = f"redis://127.0.0.1:{port}/0"
    raw = aioredis.Redis.from_url(url)
    await raw.set("raw:x", b"0.5")
    rstore = RedisStore(url)
    mstore = MemoryStore()
    for store in (rstore, mstore):
        await prepare(store)
    sides = {"raw": raw_ops(raw), "redis": store_ops(rstore), "memory": store_ops(mstore)}
    times: dict[tuple[str, str], list[float]] = {}
    for name in TARGETS:
        count = per_round if not name.endswith("100") else max(20, per_round // 10)
        for ops in sides.values():  # warm up connections, script cache, caches
            await sample(ops[name], 20, [])
        for _ in range(rounds):
            for side, ops in sides.items():
                await sample(ops[name], count, times.setdefault((side, name), []))
    # The floor of any scripted operation: an empty script called with get_variable's arguments,
    # against raw GET, interleaved the same way.
    noop = raw.register_script("return 1")
    keys, args = ["sp:{bench}", "sp:sessions"], ["bench", "x"]
    floor: list[float] = []
    floor_get: list[float] = []
    for _ in range(rounds):
        await sample(lambda: noop(keys=keys, args=args), per_round, floor)
        await sample(sides["raw"]["get"], per_round, floor_get)
    await rstore.close()
    await raw.aclose()

    header = (
        f"{'operation':<10} {'raw p50':>9} {'raw p99':>9} {'store p50':>10} {'store p99':>10} "
        f"{'ratio p50':>9} {'target':>7} {'memory p50':>11} {'memory p99':>11}"
    )
    print("latency in microseconds; store = RedisStore, raw = redis-py commands, same server")
    print(header)
    print("-" * len(header))
    missed = 0
    for name, target in TARGETS.items():
        r, s, m = times[("raw", name)], times[("redis", name)], times[("memory", name)]
        ratio = statistics.median(s) / statistics.median(r)
        ok = ratio <= target
        missed += not ok
        print(
            f"{name:<10} {pct(r, 0.5):9.0f} {pct(r, 0.99):9.0f} {pct(s, 0.5):10.0f} "
            f"{pct(s, 0.99):10.0f} {ratio:8.2f}x {target:6.1f}x{'' if ok else '!'} "
            f"{pct(m, 0.5):11.1f} {pct(m, 0.99):11.1f}"
        )
    floor_ratio = statistics.median(floor) / statistics.median(floor_get)
    print(
        f"floor: EVALSHA of an empty script with get's arguments, p50 {pct(floor, 0.5):.0f} us "
        f"= {floor_ratio:.2f}x raw GET"
    )
    print(f"samples per cell: {rounds} rounds of {per_round} (batches: {max(20, per_round // 10)})")
    return missed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=300)
    args = parser.parse_args()
    missed = asyncio.run(run(args.rounds, args.per_round))
    print("all targets met" if not missed else f"{missed} target(s) missed (marked !)")


if __name__ == "__main__":
    main()
