"""Draw an autoscaling timeline (JSON from tests/e2e/test_autoscale_e2e.py) as a PNG.

    SNAKEPIT_AUTOSCALE_TIMELINE=/tmp/timeline.json pytest tests/e2e/test_autoscale_e2e.py
    python bench/plot_autoscaling.py /tmp/timeline.json docs/autoscaling.png     (needs matplotlib)

Like bench/plot_soak.py, matplotlib is not a dependency of snakepit or of its tests: install it
where you draw (``pip install matplotlib``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def plot(timeline: dict[str, Any], out: Path) -> None:
    points = [p for p in timeline["points"] if p["desired"] >= 0]
    t = [p["at"] for p in points]
    windows = timeline["windows"]
    fig, ax = plt.subplots(figsize=(10, 5.2), dpi=110)
    read = [(p["at"], p["load"]) for p in points if p["load"] >= 0]
    ax.step(t, [p["level"] for p in points], where="post", color="#999999", linewidth=1.2,
            label="load offered: calls kept in flight")  # fmt: skip
    ax.plot([a for a, _ in read], [v for _, v in read], ".", color="#2ca02c", markersize=3,
            label="load read by the autoscaler (in flight + queued, all routers)")  # fmt: skip
    ax.step(t, [p["desired"] for p in points], where="post", color="#d62728", linewidth=2.0,
            label=f"desired workers (target {windows['target']:g} calls each)")  # fmt: skip
    applied = timeline.get("deployment") or []
    if applied:
        end = t[-1]
        ax.step([a for a, _ in applied] + [end], [n for _, n in applied] + [applied[-1][1]],
                where="post", color="#ff7f0e", linewidth=1.2, linestyle="--",
                label="worker Deployment replicas (applied by the operator)")  # fmt: skip
    ax.step(t, [p["ready"] for p in points], where="post", color="#1f77b4", linewidth=2.0,
            label="ready workers")  # fmt: skip
    ax.step(t, [p["total"] for p in points], where="post", color="#1f77b4", linewidth=1.0,
            linestyle=":", label="worker pods (terminating included)")  # fmt: skip
    top = max(max(p["level"], p["total"], p["desired"]) for p in points) + 1.5
    ax.set_ylim(0, top)
    for i, (at, label) in enumerate(timeline["marks"]):
        ax.axvline(at, color="#cccccc", linewidth=0.8)
        ax.text(at + 1, top * (0.97 - 0.06 * (i % 2)), label, fontsize=8, va="top", color="#555555")
    cold = timeline["results"].get("cold start")
    ax.set_title(
        f"SnakepitPool autoscaling on the local cluster: min 0, max 4; windows up {windows['up']} s,"
        f" down {windows['down']} s, zero after {windows['idle']} s idle\n"
        f"{timeline['calls']} calls, {timeline['failed']} failed"
        + (f"; cold start of the last call {cold:.1f} s" if cold is not None else ""),
        fontsize=10,
    )
    ax.set_xlabel("seconds")
    ax.set_ylabel("calls / workers")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=3, fontsize=8, frameon=False)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out)


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    plot(json.loads(Path(argv[1]).read_text()), Path(argv[2]))
    print(f"wrote {argv[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
