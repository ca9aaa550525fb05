"""Draw an autoscaling timeline (JSON from tests/e2e/test_autoscale_e2e.py) as a PNG.

    SNAKEPIT_AUTOSCALE_TIMELINE=/tmp/timeline.json pytest tests/e2e/test_autoscale_e2e.py
    python bench/plot_autoscaling.py /tmp/timeline.json docs/autoscaling-e2e.png

Needs matplotlib (``pip install .[plot]``); it is not a dependency of snakepit itself.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def plot(timeline: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [p for p in timeline["points"] if p["desired"] >= 0]
    t = [p["at"] for p in points]
    target = timeline["windows"]["target"]
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    series = [
        ([p["level"] for p in points], "#999999", 1.0, "-", "load: calls kept in flight"),
        (
            [math.ceil(p["level"] / target) for p in points],
            "#999999",
            1.0,
            ":",
            f"load / target ({target:g} per worker), rounded up",
        ),
        ([p["desired"] for p in points], "#d62728", 2.0, "-", "desired workers"),
        ([p["ready"] for p in points], "#1f77b4", 2.0, "-", "ready workers"),
    ]
    for values, color, width, style, label in series:
        ax.step(t, values, where="post", color=color, linewidth=width, linestyle=style, label=label)
    for at, label in timeline["marks"]:
        ax.axvline(at, color="#cccccc", linewidth=0.8)
        ax.text(at + 0.5, ax.get_ylim()[1] * 0.97, label, fontsize=8, va="top", color="#555555")
    windows = timeline["windows"]
    ax.set_title(
        f"SnakepitPool autoscaling on the local cluster (min 0, max 4; windows: up "
        f"{windows['up']} s, down {windows['down']} s, to zero after {windows['idle']} s idle)",
        fontsize=10,
    )
    ax.set_xlabel("seconds")
    ax.set_ylabel("calls / workers")
    ax.set_ylim(bottom=0)
    ax.legend(loc="upper right", fontsize=8)
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
