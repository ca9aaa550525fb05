"""Draw a soak run (``bench/soak.py --out F``): rate, p99, failures and RSS per minute.

python bench/plot_soak.py docs/soak.json docs/soak.png     (needs matplotlib)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(source: str, target: str) -> None:
    windows = json.loads(Path(source).read_text())["windows"]
    minutes = [w["minute"] for w in windows]
    fig, (calls, latency, memory) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    calls.plot(minutes, [w["ok_per_s"] for w in windows], label="successful calls/s")
    failed = [sum(w["failures"].values()) for w in windows]
    calls.bar(minutes, failed, width=0.4, color="tab:red", label="failed calls in the minute")
    calls.set_ylabel("calls")
    calls.legend(loc="lower right")
    calls.set_title("Soak: 32 sessions of mixed calls, one disruption a minute")
    latency.plot(minutes, [w["p50_ms"] for w in windows], label="p50, all calls")
    latency.plot(minutes, [w["p99_ms"] for w in windows], label="p99, all calls")
    latency.plot(minutes, [w["add_p99_ms"] for w in windows], label="p99, short calls")
    latency.set_ylabel("ms")
    latency.set_yscale("log")
    latency.legend(loc="upper right")
    for key, label in (
        ("router_rss_mb", "router (serve)"),
        ("workers_rss_mb", "4 workers"),
        ("redis_rss_mb", "redis-server"),
    ):
        memory.plot(minutes, [w[key] for w in windows], label=label)
    memory.set_ylabel("RSS, MB")
    memory.set_xlabel("minute")
    memory.legend(loc="center right")
    for axis in (calls, latency, memory):
        axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(target, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
