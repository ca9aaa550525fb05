"""What a crash of the session store (kill -9) loses, and what not losing it costs.

For each ``appendfsync`` mode (``everysec``, the Redis default, and ``always``), interleaved
round by round: 32 writers increment their own session counter through ``RedisStore`` (the
store the router and workers use), the server is killed with SIGKILL at a random instant,
restarted on its AOF, and every counter is compared with the increments that were
acknowledged. Prints acknowledged writes lost per crash and increments/s per mode.

    python bench/redis_durability.py [--rounds 5] [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
from pathlib import Path

from _common import RedisServer, table

from snakepit.errors import SnakepitError
from snakepit.store.redis import RedisStore

WRITERS = 32


async def one_round(fsync: str, seconds: float) -> tuple[int, float]:
    """Acknowledged increments lost by one kill -9, and increments/s before it."""
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(Path(tmp), fsync)
        server.start()
        store = RedisStore(f"redis://127.0.0.1:{server.port}/0", retry_timeout=0.5)
        acked = [0] * WRITERS
        for i in range(WRITERS):
            await store.create_session(f"s{i}")

        async def writer(i: int) -> None:
            while True:
                try:
                    await store.increment(f"s{i}", "n", 1)
                except SnakepitError:
                    return  # the server is gone
                acked[i] += 1

        tasks = [asyncio.create_task(writer(i)) for i in range(WRITERS)]
        run_for = seconds * (0.5 + random.random())
        await asyncio.sleep(run_for)
        rate = sum(acked) / run_for
        server.stop()
        await asyncio.gather(*tasks)
        await store.close()
        server.start()
        after = RedisStore(f"redis://127.0.0.1:{server.port}/0")
        lost = 0
        for i in range(WRITERS):
            try:
                kept = (await after.get_variable(f"s{i}", "n")).value
            except SnakepitError:
                kept = 0
            lost += max(0, acked[i] - int(kept))
        await after.close()
        server.stop()
        return lost, rate


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3.0)
    args = parser.parse_args()
    results: dict[str, list[tuple[int, float]]] = {"everysec": [], "always": []}
    for _ in range(args.rounds):
        for fsync in results:
            results[fsync].append(await one_round(fsync, args.seconds))
    rows = []
    for fsync, runs in results.items():
        lost = [r[0] for r in runs]
        rates = [r[1] for r in runs]
        rows.append([fsync, str(lost), f"{max(lost)}", f"{statistics.median(rates):.0f}"])
    print(f"kill -9 of redis-server under {WRITERS} writers, {args.rounds} rounds per mode")
    print(table(["appendfsync", "acked writes lost per crash", "max", "increments/s"], rows))
    always = statistics.median(r[1] for r in results["always"])
    everysec = statistics.median(r[1] for r in results["everysec"])
    print(f"throughput always / everysec: {always / everysec:.2f}x")


if __name__ == "__main__":
    asyncio.run(main())
