"""ghz, a Go gRPC load generator, so the client is never what limits a benchmark.

A Python client spends more CPU per call than the server it measures; ghz does not. It is built
once per version with ``go install`` into ``$SNAKEPIT_CACHE/ghz-<version>`` (the Go toolchain
the local cluster already uses, ``/usr/local/go`` or ``go`` on PATH). Its proto parser predates
proto3 ``optional``, so it gets a protoset made by ``grpc_tools.protoc``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GHZ_VERSION = "v0.120.0"
CACHE = Path(os.environ.get("SNAKEPIT_CACHE", "/var/cache/snakepit"))
METHOD = "snakepit.bridge.v1.BridgeService.ExecuteTool"


def ghz_binary() -> str:
    """The cached ghz of ``GHZ_VERSION``, built on first use (a few minutes, once)."""
    target = CACHE / f"ghz-{GHZ_VERSION}"
    binary = target / "ghz"
    if binary.exists():
        return str(binary)
    go = shutil.which("go") or "/usr/local/go/bin/go"
    target.mkdir(parents=True, exist_ok=True)
    print(f"building ghz {GHZ_VERSION} into {target} (once)", file=sys.stderr)
    env = {**os.environ, "GOBIN": str(target), "GOFLAGS": "-mod=mod"}
    subprocess.run(
        ["nice", "-n", "10", go, "install", f"github.com/bojand/ghz/cmd/ghz@{GHZ_VERSION}"],
        env=env,
        check=True,
    )
    return str(binary)


def protoset(directory: Path) -> Path:
    out = directory / "bridge.protoset"
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", "--include_imports",
         f"--descriptor_set_out={out}", "snakepit/bridge/v1/bridge.proto"],
        check=True,
    )  # fmt: skip
    return out


@dataclass(frozen=True)
class Result:
    rate: float  # calls/s
    count: int
    errors: int
    p50_ms: float
    p99_ms: float
    error_kinds: tuple[tuple[str, int], ...] = ()  # ghz's errorDistribution: message, count
    latencies_ms: tuple[float, ...] = ()  # every call that ended OK (ghz's details), in order


class Ghz:
    """Runs ghz against a target with one fixed ``ExecuteTool`` request."""

    def __init__(self, request: bytes) -> None:
        self.binary = ghz_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="snakepit-ghz-")
        directory = Path(self._dir.name)
        self.protoset = protoset(directory)
        self.request_file = directory / "request.bin"
        self.request_file.write_bytes(request)

    def run(
        self,
        target: str,
        *,
        seconds: float,
        concurrency: int = 32,
        connections: int = 4,
        rps: int = 0,
        metadata: dict[str, str] | None = None,
        tls: list[str] | None = None,
    ) -> Result:
        """``tls``: ghz's TLS flags (``--cacert``, ``--cert``/``--key``, ``--cname``); None:
        plaintext."""
        security = ["--insecure"] if tls is None else tls
        args = [self.binary, *security, "--protoset", str(self.protoset), "--call", METHOD,
                "--binary-file", str(self.request_file), "--concurrency", str(concurrency),
                "--connections", str(connections), "--duration", f"{seconds}s",
                "--format", "json", "--skipFirst", str(concurrency),
                # The request is fixed bytes: no per-call template pass (a quarter of ghz's
                # CPU per call at saturation here, CPU the servers it measures then get).
                "--disable-template-functions", "--disable-template-data"]  # fmt: skip
        if rps:
            args += ["--rps", str(rps)]
        if metadata:
            args += ["--metadata", json.dumps(metadata)]
        report = json.loads(subprocess.run([*args, target], capture_output=True, check=True).stdout)
        latencies = {
            d["percentage"]: d["latency"] / 1e6 for d in report.get("latencyDistribution") or ()
        }
        kinds = report.get("errorDistribution") or {}
        errors = sum(kinds.values())
        # Every call's latency: a benchmark can then read a round's percentiles itself and
        # pool its rounds (``datapath.py`` prints both readings).
        each = tuple(
            d["latency"] / 1e6 for d in report.get("details") or () if d.get("status") == "OK"
        )
        return Result(
            rate=float(report["rps"]),
            count=int(report["count"]),
            errors=int(errors),
            p50_ms=latencies.get(50, 0.0),
            p99_ms=latencies.get(99, 0.0),
            error_kinds=tuple(sorted(kinds.items(), key=lambda kind: -kind[1])),
            latencies_ms=each,
        )

    def close(self) -> None:
        self._dir.cleanup()


def main(
    doc: str,
    run: Callable[..., str],
    setup: str,
    add_arguments: Callable[[argparse.ArgumentParser], object] | None = None,
) -> None:
    """A ghz benchmark's command line: ``--rounds``, ``--seconds``, ``--in-flight`` and any that
    ``add_arguments`` adds; prints what is measured, then ``run(rounds, seconds, in_flight,
    **the added ones)``'s report."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="length of each ghz run")
    parser.add_argument("--in-flight", type=int, default=32, help="concurrent calls")
    if add_arguments is not None:
        add_arguments(parser)
    args = vars(parser.parse_args())
    rounds, seconds, in_flight = args.pop("rounds"), args.pop("seconds"), args.pop("in_flight")
    print(f"small calls (add) with ghz, {in_flight} in flight, {rounds} rounds, "
          f"medians; {setup}")  # fmt: skip
    print(run(rounds, seconds, in_flight, **args))
