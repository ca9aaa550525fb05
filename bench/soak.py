"""A long run under mixed load with a disruption every minute: does anything drift or leak?

A local pool (``snakepit serve``, 4 workers, the Redis store on a real redis-server with its
AOF) takes the mixed load of ``tests/support/load.py`` (32 sessions: short, long, streaming,
tensor and write calls). Every ``--every`` seconds one disruption, in turn:

- SIGTERM a worker (planned: a recycle or a scale-down; must fail no call);
- SIGKILL a worker (unplanned: may fail only the calls running on it, with UNAVAILABLE);
- restart redis-server gracefully (calls wait for it);
- SIGKILL redis-server and start it again on its AOF (calls wait; no acknowledged write lost).

Each minute is one window: calls, failures by kind, p50/p99, and the RSS of the router (the
serve process), the workers and Redis. At the end every acknowledged write is checked. Writes
``--out`` (JSON); ``bench/plot_soak.py`` draws it.

    python bench/soak.py --minutes 30 --out docs/soak.json [--data-path python]

The router's data path is ``serve``'s default (``auto``: HAProxy where it is installed) unless
``--data-path`` names one; the figures in docs/reliability.md were taken on the Python router.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import psutil
from _common import ROOT, RedisServer, free_port, spawn, table

sys.path.insert(0, str(ROOT))
from tests.support.load import MixedLoad

DISRUPTIONS = ("SIGTERM a worker", "SIGKILL a worker", "restart Redis", "SIGKILL Redis")


def rss_mb(process: psutil.Process) -> float:
    try:
        return float(process.memory_info().rss) / 2**20
    except psutil.Error:
        return 0.0


def workers_of(serve: subprocess.Popen[bytes]) -> list[psutil.Process]:
    return [p for p in psutil.Process(serve.pid).children() if "worker" in p.cmdline()]


def disrupt(kind: str, serve: subprocess.Popen[bytes], store: RedisServer) -> None:
    if kind == "SIGTERM a worker":
        workers_of(serve)[0].send_signal(signal.SIGTERM)
    elif kind == "SIGKILL a worker":
        workers_of(serve)[0].send_signal(signal.SIGKILL)
    elif kind == "restart Redis":
        store.stop(signal.SIGTERM)
        store.start()
    else:
        store.stop(signal.SIGKILL)
        store.start()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--every", type=float, default=60)
    parser.add_argument("--out", default="soak.json")
    parser.add_argument(
        "--data-path", default="auto", help="the router's: auto (HAProxy if installed), python"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = RedisServer(Path(tmp))
        store.start()
        port = free_port()
        serve = spawn(["serve", "--port", str(port), "--workers", "4",
                       "--store", f"redis://127.0.0.1:{store.port}/0",
                       "--data-path", args.data_path])  # fmt: skip
        target = f"127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while len(workers_of(serve)) < 4 and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(3)
        windows = []
        try:
            with MixedLoad(target, sessions=32, tensor_mb=1.0) as load:
                ends = time.monotonic() + args.minutes * 60
                turn = 0
                while time.monotonic() < ends:
                    kind = DISRUPTIONS[turn % len(DISRUPTIONS)]
                    turn += 1
                    started = time.monotonic()
                    with load.window(kind) as window:
                        time.sleep(args.every / 2)
                        disrupt(kind, serve, store)
                        time.sleep(max(0.0, args.every - (time.monotonic() - started)))
                    assert store.process is not None
                    row = {
                        "minute": round((started - (ends - args.minutes * 60)) / 60, 2),
                        "disruption": kind,
                        "calls": len(window.calls),
                        "ok_per_s": round(window.rate, 1),
                        "failures": dict(Counter(f.split(":")[0] for f in window.failures)),
                        "p50_ms": round(window.percentile_ms(0.5), 1),
                        "p99_ms": round(window.percentile_ms(0.99), 1),
                        "add_p99_ms": round(window.percentile_ms(0.99, "add"), 1),
                        "router_rss_mb": round(rss_mb(psutil.Process(serve.pid)), 1),
                        "workers_rss_mb": round(sum(rss_mb(w) for w in workers_of(serve)), 1),
                        "redis_rss_mb": round(rss_mb(psutil.Process(store.process.pid)), 1),
                    }
                    windows.append(row)
                    print(json.dumps(row), flush=True)
                load.check_no_acknowledged_write_lost()
                lost = "none"
        except AssertionError as exc:
            lost = f"CHECK FAILED: {exc}"
        finally:
            serve.send_signal(signal.SIGINT)
            serve.wait(timeout=60)
            store.stop(signal.SIGTERM)
    Path(args.out).write_text(json.dumps({"windows": windows, "lost_writes": lost}, indent=1))
    columns = ("minute", "disruption", "calls", "ok_per_s", "failures", "p50_ms", "p99_ms",
               "router_rss_mb", "workers_rss_mb", "redis_rss_mb")  # fmt: skip
    headers = list(columns)
    rows = [[str(w[c] if w[c] != {} else 0) for c in columns] for w in windows]
    print(table(headers, rows))
    print(f"acknowledged writes lost: {lost}")
    os.sync()


if __name__ == "__main__":
    main()
