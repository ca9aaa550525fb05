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
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import free_port, spawn, table, wait_serving

from snakepit import AsyncClient
from tests.fixtures.jaeger import Jaeger, jaeger_binary

TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


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
        worker, router = free_port(), free_port()
        self.procs.append(spawn(["worker", "--host", "127.0.0.1", "--port", str(worker),
                                 "--worker-id", "w0", *metrics], **env))  # fmt: skip
        self.procs.append(spawn(["router", "--host", "127.0.0.1", "--port", str(router),
                                 "--workers", f"w0=127.0.0.1:{worker}", *metrics], **env))  # fmt: skip
        for port in (worker, router):
            wait_serving(f"127.0.0.1:{port}")
        self.router = f"127.0.0.1:{router}"

    def close(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait(timeout=20)


async def measure(config: Config, seconds: float, in_flight: int) -> None:
    async with AsyncClient(config.router) as client:
        while (await client.status())["workers_ready"] < 1:  # noqa: ASYNC110 - polling a remote pool
            await asyncio.sleep(0.05)
        for _ in range(50):  # warm up
            await client.execute("add", a=1, b=2)
        done = 0
        stop = time.perf_counter() + seconds
        cpu_before = sum(cpu_seconds(p.pid) for p in config.procs)

        async def loop() -> None:
            nonlocal done
            while time.perf_counter() < stop:
                await client.execute("add", a=1, b=2)
                done += 1

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(in_flight)))
        elapsed = time.perf_counter() - started
        cpu = sum(cpu_seconds(p.pid) for p in config.procs) - cpu_before
    config.rates.append(done / elapsed)
    config.cpu_ms.append(cpu / done * 1000)


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
