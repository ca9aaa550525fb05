"""Who closes an aged connection: the router (a rare reset fails a call) or the client (none).

    python bench/connection_age.py [--seconds S] [--rounds R] [--threads N] [--age SECONDS]

Two router+worker pairs run at once. On one the router ages every connection out after
``--age`` and the clients keep theirs until it does (``max_connection_age=None``): what any gRPC
client meets. On the other the router's age is 60 s and the clients move to a new connection
every ``--age`` themselves (``Client(max_connection_age=...)``, client/rotation.py). N threads
send 1 MB tensor calls (1 MB back) through each in turns, R rounds of S seconds, so load drift
hits both alike. Printed: calls, failed calls by message, failures per 100,000 calls.

The race (docs/reliability.md, "What is left of the connection-close race") costs about one call
in 15,000 at a 50 ms age when the router closes; the claim under test is 0 when the client does.
Rare events need many calls: the defaults (2 x 6 rounds of 60 s) send about 40,000 calls a side
on this 2-core machine. Run it under ``nice`` beside other work: it counts failures, not speed.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import spawn_pair, stop_all, table

from snakepit import Client

ADAPTER = ("--adapter", "snakepit.examples.showcase:ShowcaseAdapter")
TENSOR = np.ones(2**20 // 8)  # 1 MB


def run_round(
    target: str, client_age: float | None, seconds: float, threads: int
) -> tuple[int, list[str]]:
    """Calls that succeeded, and the failures' messages, in one round."""
    deadline = time.monotonic() + seconds
    failures: list[str] = []

    def steady() -> int:
        done = 0
        with Client(target, timeout=30, max_connection_age=client_age) as client:
            while time.monotonic() < deadline:
                try:
                    client.execute("tensor_scale", x=TENSOR, factor=2.0)
                    done += 1
                except Exception as exc:  # counted: the point of the bench
                    failures.append(str(exc)[:120])
        return done

    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(lambda _: steady(), range(threads)))
    return done, failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--age", type=float, default=0.05)
    args = parser.parse_args()
    server_aged, server_target = spawn_pair(ADAPTER, ("--max-connection-age", str(args.age)))
    client_aged, client_target = spawn_pair(ADAPTER, ("--max-connection-age", "60"))
    sides = {
        f"router ages connections ({args.age} s)": (server_target, None),
        f"client reconnects first ({args.age} s)": (client_target, args.age),
    }
    calls = collections.Counter[str]()
    failures: dict[str, list[str]] = {name: [] for name in sides}
    try:
        for round_number in range(args.rounds):
            for name, (target, client_age) in sides.items():
                done, failed = run_round(target, client_age, args.seconds, args.threads)
                calls[name] += done
                failures[name] += failed
                print(f"round {round_number + 1} {name}: {done} calls, {len(failed)} failed",
                      flush=True)  # fmt: skip
    finally:
        stop_all(server_aged + client_aged)
    rows = []
    for name in sides:
        total = calls[name] + len(failures[name])
        per_100k = 100_000 * len(failures[name]) / max(total, 1)
        kinds = collections.Counter(failures[name]).most_common(2)
        rows.append([name, str(total), str(len(failures[name])), f"{per_100k:.1f}",
                     "; ".join(f"{n}x {m}" for m, n in kinds) or "-"])  # fmt: skip
    print(table(["who closes", "calls", "failed", "per 100k", "failures"], rows))


if __name__ == "__main__":
    main()
