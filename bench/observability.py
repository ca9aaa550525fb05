"""What metrics and tracing cost: throughput through the router with them on ÷ off.

    python bench/observability.py [--seconds S] [--rounds R] [--in-flight N]

One worker and one router per configuration, all started at once and measured in turns (round
robin, R rounds) so drift hits them alike. Small ``add`` calls through the router, N in flight
from one asyncio client. Printed per configuration: calls/s, its ratio to "off", and the CPU
the router and the worker spent per call (``/proc/PID/stat``).

Configurations: off; metrics (``--metrics-port`` on both, nothing scraping); tracing at 100 %
and at 1 % (``parentbased_traceidratio``) exporting to a real Jaeger (scripts/setup builds it;
without it the tracing rows are skipped); metrics + tracing 1 %.
Goals (issue 14): metrics >= 0.95x, 1 % tracing >= 0.9x.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import small_calls, spawn_pair, stop_all, table

from snakepit import AsyncClient
from tests.fixtures.jaeger import Jaeger, jaeger_binary


@dataclass
class Config:
    name: str
    metrics: bool = False
    sampling: float | None = None  # None: tracing off
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    router: str = ""
    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    def start(self, otlp: str | None) -> None:
        env: dict[str, str] = {}
        if self.sampling is not None and otlp:
            env = {
                "OTEL_EXPORTER_OTLP_ENDPOINT": otlp,
                "OTEL_EXPORTER_OTLP_INSECURE": "true",
                "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
                "OTEL_TRACES_SAMPLER_ARG": str(self.sampling),
            }
        metrics = ["--metrics-port", "0"] if self.metrics else []
        self.procs, self.router = spawn_pair(metrics, metrics, **env)

    def close(self) -> None:
        stop_all(self.procs)


async def measure(config: Config, seconds: float, in_flight: int) -> None:
    async with AsyncClient(config.router) as client:
        rate, cpu_ms = await small_calls(client, seconds, in_flight, config.procs)
    config.rates.append(rate)
    config.cpu_ms.append(cpu_ms)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=32)
    args = parser.parse_args()

    configs = [Config("off"), Config("metrics", metrics=True)]
    jaeger = None
    if jaeger_binary().exists():
        jaeger = Jaeger(Path(tempfile.mkdtemp(prefix="bench-jaeger-")))
        configs += [
            Config("tracing 100%", sampling=1.0),
            Config("tracing 1%", sampling=0.01),
            Config("metrics + tracing 1%", metrics=True, sampling=0.01),
        ]
    else:
        print(f"({jaeger_binary()} missing: tracing rows skipped; run scripts/setup)")
    try:
        for config in configs:
            config.start(jaeger.otlp_endpoint if jaeger else None)
        for _ in range(args.rounds):
            for config in configs:
                asyncio.run(measure(config, args.seconds, args.in_flight))
    finally:
        for config in configs:
            config.close()
        if jaeger is not None:
            jaeger.stop()
    base = statistics.median(configs[0].rates)
    rows = [
        [
            c.name,
            f"{statistics.median(c.rates):,.0f}",
            f"{statistics.median(c.rates) / base:.3f}",
            f"{statistics.median(c.cpu_ms):.3f}",
            " ".join(f"{r:,.0f}" for r in c.rates),
        ]
        for c in configs
    ]
    print(
        f"add through the router, {args.in_flight} in flight, {args.rounds} rounds of "
        f"{args.seconds:g} s (median)"
    )
    print(table(["config", "calls/s", "÷ off", "CPU ms/call (router+worker)", "rounds"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
