"""What TLS costs small calls: calls/s and CPU per call with TLS ÷ plaintext, through the
router and straight to a worker (direct mode), measured with ghz, interleaved round by round.

    python bench/tls.py [--rounds R] [--seconds S] [--in-flight N]

Two identical pools of one worker and one router: one plaintext, one with TLS on the router's
port and mutual TLS with a pool CA inside the pool (the router dials its worker with its pool
certificate; a direct-mode client presents a client certificate the worker trusts). Goal
(issue 12): TLS >= 0.85x plaintext calls/s on both paths. ghz keeps its connections (the router
asks clients to reconnect every 5 s, so handshakes are part of the price, as in production).
CPU per call comes from ``/proc/PID/stat`` of each server process over the run.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import datapath
from _common import free_port, spawn, table
from datapath import Sample, measure
from ghz import Ghz
from ghz import main as ghz_main

from snakepit import Client
from snakepit.errors import SnakepitError
from snakepit.protocol.messages import encode_request
from snakepit.security.localca import LocalCA, write_file, write_issued
from snakepit.security.tls import CA_FILE, CERT_FILE, KEY_FILE, POOL_NAME

NAMES = [POOL_NAME, "localhost", "127.0.0.1"]


@dataclass
class Target(datapath.Target):
    tls: list[str] | None = None  # ghz flags; None: plaintext


class Setup:
    def __init__(self, directory: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        ca = LocalCA.generate("bench CA")
        pool = directory / "pool"
        pool.mkdir()
        write_file(pool / CA_FILE, ca.cert_pem)
        write_issued(ca.issue(POOL_NAME, NAMES), pool / CERT_FILE, pool / KEY_FILE)
        client = directory / "client"
        client.mkdir()
        write_issued(ca.issue("bench client", server=False), client / CERT_FILE, client / KEY_FILE)
        ca_file = str(pool / CA_FILE)
        self.targets: list[Target] = []
        for tls in (False, True):
            label = "TLS" if tls else "plaintext"
            worker_port, router_port = free_port(), free_port()
            pool_args = ["--pool-tls-dir", str(pool)] if tls else []
            worker = spawn(["worker", "--host", "127.0.0.1", "--port", str(worker_port),
                            "--worker-id", "w0", "--concurrency", "64", *pool_args])  # fmt: skip
            router_tls = ["--tls-cert", str(pool / CERT_FILE), "--tls-key", str(pool / KEY_FILE),
                          "--internal-port", str(free_port()), *pool_args] if tls else []  # fmt: skip
            router = spawn(["router", "--host", "127.0.0.1", "--port", str(router_port),
                            "--workers", f"w0=127.0.0.1:{worker_port}",
                            "--worker-concurrency", "64", *router_tls])  # fmt: skip
            self.procs += [worker, router]
            address = f"127.0.0.1:{router_port}"
            with Client(address, ca=ca_file if tls else None, timeout=30) as probe:
                while True:
                    try:
                        if probe.status()["workers_ready"] >= 1:
                            break
                    except SnakepitError:
                        pass  # not serving yet
            server_tls = ["--cacert", ca_file] if tls else None
            mutual = [*(server_tls or []), "--cert", str(client / CERT_FILE),
                      "--key", str(client / KEY_FILE), "--cname", POOL_NAME] if tls else None  # fmt: skip
            self.targets += [
                Target(f"router, {label}", address, {"router": router.pid, "worker": worker.pid},
                       server_tls),
                Target(f"direct, {label}", f"127.0.0.1:{worker_port}", {"worker": worker.pid},
                       mutual),
            ]  # fmt: skip

    def close(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def run(rounds: int, seconds: float, in_flight: int) -> str:
    with tempfile.TemporaryDirectory(prefix="snakepit-bench-tls-") as tmp:
        setup = Setup(Path(tmp))
        ghz = Ghz(encode_request("add", {"a": 1, "b": 2}))
        samples: dict[str, list[Sample]] = defaultdict(list)
        try:
            for target in setup.targets:  # warm up
                ghz.run(target.address, seconds=1, concurrency=in_flight, tls=target.tls)
            for _ in range(rounds):
                for target in setup.targets:
                    sample = measure(ghz, target, seconds, in_flight, target.tls)[0]
                    samples[target.name].append(sample)
        finally:
            ghz.close()
            setup.close()
    return report(setup.targets, samples)


def report(targets: list[Target], samples: dict[str, list[Sample]]) -> str:
    rate = {t.name: statistics.median(s.rate for s in samples[t.name]) for t in targets}
    cpu = {
        t.name: {r: statistics.median(s.cpu_per_10k[r] for s in samples[t.name]) for r in t.pids}
        for t in targets
    }
    rows = [
        [t.name, f"{rate[t.name]:.0f}/s",
         ", ".join(f"{role} {v:.2f}" for role, v in cpu[t.name].items()),
         f"{max(s.error_share for s in samples[t.name]):.1%}"]
        for t in targets
    ]  # fmt: skip
    lines = [table(["path", "calls/s", "CPU s per 10k calls", "errors"], rows), ""]
    for path in ("router", "direct"):
        plain, tls = f"{path}, plaintext", f"{path}, TLS"
        cpu_ratio = sum(cpu[tls].values()) / max(1e-9, sum(cpu[plain].values()))
        lines.append(
            f"{path}: TLS / plaintext calls/s {rate[tls] / rate[plain]:.2f}x (goal >= 0.85), "
            f"CPU per call {cpu_ratio:.2f}x"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    ghz_main(__doc__, run, "one worker, one router per pool")
