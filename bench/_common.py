"""Helpers the benchmarks share: child processes of this one, and a plain-text table."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from snakepit.security.tls import POOL_NAME

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def spawn(args: Sequence[str], **env: str) -> subprocess.Popen[bytes]:
    """``python -m snakepit ARGS`` as a child of this process (quiet logs)."""
    environment = {**os.environ, "SNAKEPIT_LOG_LEVEL": "warning", **env}
    environment["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(ROOT / "src"), environment.get("PYTHONPATH")])
    )
    return subprocess.Popen([sys.executable, "-m", "snakepit", *args], env=environment)


def wait_serving(
    address: str, timeout: float = 30.0, credentials: grpc.ChannelCredentials | None = None
) -> None:
    """Wait until ``address`` answers health checks (over TLS with ``credentials``)."""
    deadline = time.monotonic() + timeout
    options = [("grpc.ssl_target_name_override", POOL_NAME)] if credentials else []
    channel = (
        grpc.secure_channel(address, credentials, options)
        if credentials
        else grpc.insecure_channel(address)
    )
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=0.5).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.02)
    raise TimeoutError(f"{address} not serving after {timeout}s")


TICK = os.sysconf("SC_CLK_TCK")


def spawn_pair(
    worker_args: Sequence[str] = (),
    router_args: Sequence[str] = (),
    credentials: grpc.ChannelCredentials | None = None,
    **env: str,
) -> tuple[list[subprocess.Popen[bytes]], str]:
    """One worker (id w0) and a router in front of it, both serving: (processes, router).
    ``credentials``: how to reach them when they serve TLS (a pool member's)."""
    worker, router = free_port(), free_port()
    procs = [
        spawn(["worker", "--host", "127.0.0.1", "--port", str(worker), "--worker-id", "w0",
               *worker_args], **env),
        spawn(["router", "--host", "127.0.0.1", "--port", str(router),
               "--workers", f"w0=127.0.0.1:{worker}", *router_args], **env),
    ]  # fmt: skip
    try:
        for port in (worker, router):
            wait_serving(f"127.0.0.1:{port}", credentials=credentials)
    except BaseException:  # e.g. another process took the free port first: leave nothing behind
        stop_all(procs)
        raise
    return procs, f"127.0.0.1:{router}"


def stop_all(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        proc.wait(timeout=20)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds process ``pid`` has used (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


async def small_calls(
    client: Any, seconds: float, in_flight: int, procs: Sequence[subprocess.Popen[bytes]]
) -> tuple[float, float]:
    """``add`` calls through ``client`` (an AsyncClient), ``in_flight`` at once for ``seconds``
    after a warm-up: (calls/s, CPU ms per call that ``procs`` spent)."""
    while (await client.status())["workers_ready"] < 1:  # noqa: ASYNC110 - polling a remote pool
        await asyncio.sleep(0.05)
    for _ in range(50):
        await client.execute("add", a=1, b=2)
    done = 0
    stop = time.perf_counter() + seconds
    cpu_before = sum(cpu_seconds(p.pid) for p in procs)

    async def loop() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await client.execute("add", a=1, b=2)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(in_flight)))
    elapsed = time.perf_counter() - started
    cpu = sum(cpu_seconds(p.pid) for p in procs) - cpu_before
    return done / elapsed, cpu / done * 1000


def median_rows(
    flag: str, runs: dict[int, list[dict[str, float]]], keys: Sequence[str]
) -> list[list[str]]:
    """One table row per setting of ``flag``: the median over its rounds of each of ``keys``."""
    return [
        [f"{flag} {setting}"] + [f"{statistics.median(r[k] for r in results):.1f}" for k in keys]
        for setting, results in runs.items()
    ]


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


class RedisServer:
    """A redis-server child with its AOF in ``directory``; ``stop`` + ``start`` keeps its port
    and data, as a restarted pod would."""

    def __init__(self, directory: Path, fsync: str = "everysec") -> None:
        self.directory, self.fsync, self.port = directory, fsync, free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> None:
        import redis

        argv = [shutil.which("redis-server") or "redis-server", "--port", str(self.port),
                "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", "",
                "--appendonly", "yes", "--appendfsync", self.fsync]  # fmt: skip
        self.process = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self, sig: int = signal.SIGKILL) -> None:
        assert self.process is not None
        self.process.send_signal(sig)
        self.process.wait()
