"""What a principal's calls waiting for its share cost HAProxy, and the other callers.

    python bench/share_wait.py [--waiting 0,100,500] [--rounds 2] [--seconds 8]

``snakepit serve`` on the HAProxy data path with tokens and ``--max-calls-per-principal 2``
(one worker of 4 slots). In each window a hog holds its two slots with long ``sleep`` calls
and keeps W more waiting in its line, which HAProxy holds in a Lua action that looks again
every 1-32 ms (``router/haproxy/principal_shares.py``); a victim, another principal, calls
``add`` one call at a time. Printed per W: HAProxy's CPU seconds per second of the window, the
serving process's (the Python router), and the victim's p50 / p99 / worst latency. The values
of W alternate round by round.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from _common import cpu_seconds, free_port, spawn, stop_all, table, wait_serving

from snakepit import AsyncClient

TOKENS = {"hog": "hog-token-" + "h" * 24, "victim": "victim-token-" + "v" * 24}
SHARE = 2


def haproxy_pid(parent: int) -> int:
    """The HAProxy the serving process started (its child named haproxy)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            name, rest = stat.read_text().split(") ", 1)
        except OSError:
            continue
        if name.endswith("(haproxy") and int(rest.split()[1]) == parent:
            return int(stat.parent.name)
    raise RuntimeError("no haproxy child: is haproxy installed?")


async def vouched(client: AsyncClient) -> None:
    """Call until the router has told HAProxy of this caller (calls_total is HAProxy's count)."""
    for _ in range(200):
        before = (await client.status())["calls_total"]
        await client.execute("add", a=1, b=2)
        if (await client.status())["calls_total"] > before:
            return
        await asyncio.sleep(0.05)
    raise RuntimeError("the router never vouched for the caller")


async def window(
    target: str, waiting: int, seconds: float, pids: tuple[int, int]
) -> tuple[float, float, list[float]]:
    """(HAProxy CPU s/s, router CPU s/s, victim latencies in ms) with ``waiting`` calls in line."""
    async with (
        AsyncClient(target, token=TOKENS["hog"], timeout=seconds + 30) as hog,
        AsyncClient(target, token=TOKENS["victim"], timeout=10) as victim,
    ):
        await vouched(hog)
        await vouched(victim)
        calls = [
            asyncio.ensure_future(hog.execute("sleep", seconds=seconds + 10))
            for _ in range(SHARE + waiting)
        ]
        await asyncio.sleep(1.0)  # every call in a slot or in the line
        before = [cpu_seconds(pid) for pid in pids]
        latencies: list[float] = []
        started = time.perf_counter()
        while time.perf_counter() - started < seconds:
            sent = time.perf_counter()
            await victim.execute("add", a=1, b=2)
            latencies.append((time.perf_counter() - sent) * 1000)
        elapsed = time.perf_counter() - started
        after = [cpu_seconds(pid) for pid in pids]
        for call in calls:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
        await asyncio.sleep(0.5)
    haproxy, router = ((b - a) / elapsed for a, b in zip(before, after, strict=True))
    return haproxy, router, latencies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--waiting", default="0,100,500")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    counts = [int(n) for n in args.waiting.split(",")]
    tokens = Path(tempfile.mkdtemp(prefix="snakepit-share-")) / "tokens"
    tokens.write_text("".join(f"{who}:{token}\n" for who, token in TOKENS.items()))
    port = free_port()
    target = f"127.0.0.1:{port}"
    serve = spawn(
        ["serve", "--port", str(port), "--workers", "1", "--worker-concurrency", "4",
         "--data-path", "haproxy", "--auth-tokens", str(tokens),
         "--max-calls-per-principal", str(SHARE), "--queue-size", "2000",
         "--queue-timeout", str(args.seconds + 30), "--max-call-seconds", "120"],
    )  # fmt: skip
    try:
        wait_serving(target, timeout=60)
        deadline = time.monotonic() + 60
        while True:
            try:
                pids = (haproxy_pid(serve.pid), serve.pid)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        results: dict[int, list[tuple[float, float, list[float]]]] = {n: [] for n in counts}
        for _ in range(args.rounds):
            for waiting in counts:
                results[waiting].append(asyncio.run(window(target, waiting, args.seconds, pids)))
    finally:
        stop_all([serve])
    rows = []
    for waiting in counts:
        for haproxy, router, latencies in results[waiting]:
            ordered = sorted(latencies)
            rows.append([
                str(waiting),
                f"{haproxy:.3f}",
                f"{router:.3f}",
                f"{statistics.median(ordered):.1f}",
                f"{ordered[int(len(ordered) * 0.99) - 1]:.1f}",
                f"{ordered[-1]:.1f}",
            ])  # fmt: skip
    print(
        table(
            ["waiting", "HAProxy CPU s/s", "router CPU s/s", "victim p50 ms", "p99", "worst"],
            rows,
        )
    )


if __name__ == "__main__":
    main()
