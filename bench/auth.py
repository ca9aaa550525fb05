"""What identity costs: small-call throughput with auth, and TLS + auth, ÷ neither, through the
router and direct.

    python bench/auth.py [--seconds S] [--rounds R] [--in-flight N] [--no-ghz]
                         [--tokenreview-kubeconfig FILE]

Per configuration one router and one worker (separate processes), all started at once and
measured in turns (round robin, R rounds) so drift hits them alike. Small ``add`` calls, N in
flight from one asyncio client, through the router and in direct mode (the client calls the
worker itself, with the routing table's ticket when auth is on). "TLS + auth" is what a secured
pool on Kubernetes runs: TLS on the router's port, mutual TLS with a pool CA inside the pool
and for a direct-mode client, and a bearer token. Printed: calls/s, the ratio to neither on the
same path, and the CPU router + worker spent per call (``/proc/PID/stat``).

Then the same with ghz (bench/ghz.py), a Go load generator, so the Python client is not what
limits the rate: ``add`` through the router (auth on: ghz sends the bearer token) and straight
to the worker (auth on: ghz sends a pool ticket, as a direct-mode client does).

The router rows run on both data paths: the Python router, and HAProxy (``--data-path
haproxy``: HAProxy terminates TLS and forwards the calls of callers the router has verified,
with a ticket; its CPU counts as the router's). The summary line puts HAProxy + TLS + auth next
to the Python router + TLS + auth and to a direct-mode client with TLS + auth (issue 11 meets
issue 12: the native data path with a secured pool's settings).

Then, in this process, the cost of one verification: a ticket verified for the first time (an
Ed25519 signature check: a worker's cache miss, once per ticket and worker), a cached one, a
static-token lookup, and signing a ticket (the router does it once per principal every five
minutes). Goal (issue 12): TLS + auth >= 0.85x neither on both paths.

With ``--tokenreview-kubeconfig``, the cost of one TokenReview cache miss: the round trip of a
real TokenReview to that cluster's kube-apiserver, for a token it minted (``kubectl create
token``), as the router's ``TokenReviewer`` sends it (bench/tokenreview_rtt.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import timeit
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import cpu_seconds, free_port, small_calls, spawn_pair, stop_all, table
from ghz import Ghz
from tokenreview_rtt import tokenreview_rtt

from snakepit import AsyncClient
from snakepit.protocol.messages import encode_request
from snakepit.security.localca import LocalCA, write_file, write_issued
from snakepit.security.tickets import (
    TICKET_KEY,
    TicketIssuer,
    TicketVerifier,
    new_private_key,
    private_key_pem,
    public_key_pem,
)
from snakepit.security.tls import CA_FILE, CERT_FILE, KEY_FILE, POOL_NAME
from snakepit.security.tokens import StaticTokens

TOKEN = "bench-token-0123456789abcdef"


@dataclass
class Config:
    name: str
    auth: bool
    direct: bool
    tls: Path | None = None  # the PKI directory (pki()); None: plaintext
    data_path: str = "python"  # the router's (--data-path)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    cpu_procs: list[Any] = field(default_factory=list)  # whose CPU counts: procs and HAProxy
    router: str = ""
    worker: str = ""
    ticket: str = ""
    ghz_rates: list[float] = field(default_factory=list)
    ghz_cpu_ms: list[float] = field(default_factory=list)

    def ghz_target(self) -> tuple[str, dict[str, str]]:
        """Where ghz calls and what proves it: the router and the token, or the worker and a
        ticket (what a direct-mode client sends)."""
        if self.direct:
            return f"127.0.0.1:{self.worker}", ({TICKET_KEY: self.ticket} if self.auth else {})
        return self.router, ({"authorization": f"Bearer {TOKEN}"} if self.auth else {})

    def ghz_tls(self) -> list[str] | None:
        """ghz's TLS flags: the pool CA, and in direct mode a client certificate."""
        if self.tls is None:
            return None
        ca = ["--cacert", str(self.tls / "pool" / CA_FILE), "--cname", POOL_NAME]
        if not self.direct:
            return ca
        client = self.tls / "client"
        return [*ca, "--cert", str(client / CERT_FILE), "--key", str(client / KEY_FILE)]

    def client_tls(self) -> dict[str, str]:
        """AsyncClient keywords: the pool CA and a client certificate from it (direct mode)."""
        if self.tls is None:
            return {}
        client = self.tls / "client"
        return {"ca": str(self.tls / "pool" / CA_FILE), "cert": str(client / CERT_FILE),
                "key": str(client / KEY_FILE)}  # fmt: skip

    rates: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)

    def start(self, directory: Path) -> None:
        worker_args: list[str] = []
        router_args: list[str] = []
        if self.auth:
            key = new_private_key()
            self.ticket = TicketIssuer(key).issue("bench", lifetime=3600)
            (directory / f"{self.name}.key").write_bytes(private_key_pem(key))
            (directory / f"{self.name}.pub").write_bytes(public_key_pem(key.public_key()))
            (directory / "tokens").write_text(f"bench:{TOKEN}\n")
            worker_args = ["--ticket-public-key", str(directory / f"{self.name}.pub")]
            router_args = ["--auth-tokens", str(directory / "tokens"), "--allow-direct", "bench",
                           "--ticket-key", str(directory / f"{self.name}.key")]  # fmt: skip
        credentials = None
        if self.tls is not None:
            pool, client = self.tls / "pool", self.tls / "client"
            worker_args += ["--pool-tls-dir", str(pool)]
            router_args += ["--pool-tls-dir", str(pool), "--tls-cert", str(pool / CERT_FILE),
                            "--tls-key", str(pool / KEY_FILE),
                            "--internal-port", str(free_port())]  # fmt: skip
            credentials = grpc.ssl_channel_credentials(
                *(p.read_bytes() for p in (pool / CA_FILE, client / KEY_FILE, client / CERT_FILE))
            )
        router_args += ["--data-path", self.data_path]
        self.procs, self.router = spawn_pair(worker_args, router_args, credentials)
        self.worker = self.procs[0].args[self.procs[0].args.index("--port") + 1]
        self.cpu_procs = [*self.procs]
        if self.data_path == "haproxy":
            self.cpu_procs += [
                child for child in psutil.Process(self.procs[1].pid).children()
                if child.name() == "haproxy"
            ]  # fmt: skip
            assert len(self.cpu_procs) == 3, "no haproxy child under the router"

    def close(self) -> None:
        stop_all(self.procs)


async def measure(config: Config, seconds: float, in_flight: int) -> None:
    token = TOKEN if config.auth else ""
    async with AsyncClient(
        config.router, token=token, direct=config.direct, **config.client_tls()
    ) as client:
        rate, cpu_ms = await small_calls(client, seconds, in_flight, config.cpu_procs)
    config.rates.append(rate)
    config.cpu_ms.append(cpu_ms)


def measure_ghz(ghz: Ghz, config: Config, seconds: float, in_flight: int) -> None:
    target, metadata = config.ghz_target()
    if config.direct:  # one worker takes 4 at once plus 16 waiting: more would be refused
        in_flight = min(in_flight, 16)
    before = sum(cpu_seconds(p.pid) for p in config.cpu_procs)
    result = ghz.run(
        target, seconds=seconds, concurrency=in_flight, metadata=metadata, tls=config.ghz_tls()
    )
    cpu = sum(cpu_seconds(p.pid) for p in config.cpu_procs) - before
    # ghz counts the calls its deadline cuts off at the end as errors: up to one per stream.
    if result.errors > in_flight:
        raise RuntimeError(f"{config.name}: {result.errors} calls failed under ghz")
    config.ghz_rates.append(result.rate)
    config.ghz_cpu_ms.append(cpu / max(1, result.count) * 1000)


def rows_of(configs: list[Config], rates: str, cpu: str) -> list[list[str]]:
    """One row per configuration, each against neither (no auth, no TLS) on the same path."""
    rows = []
    for c in configs:
        (baseline,) = (
            b for b in configs
            if (b.direct, b.data_path) == (c.direct, c.data_path) and not b.auth and not b.tls
        )  # fmt: skip
        mine, base = getattr(c, rates), getattr(baseline, rates)
        rows.append(
            [
                c.name,
                f"{statistics.median(mine):,.0f}",
                f"{statistics.median(mine) / statistics.median(base):.3f}",
                f"{statistics.median(getattr(c, cpu)):.3f}",
                " ".join(f"{r:,.0f}" for r in mine),
            ]
        )
    return rows


def summary(configs: list[Config], rates: str, cpu: str) -> str:
    """HAProxy + TLS + auth against the Python router and direct mode with the same settings."""
    by_name = {c.name: c for c in configs}
    native = by_name["router (haproxy), TLS + auth"]

    def ratio(other: str, what: str) -> float:
        mine, theirs = getattr(native, what), getattr(by_name[other], what)
        return statistics.median(mine) / statistics.median(theirs)

    return (
        f"HAProxy + TLS + auth: {ratio('router, TLS + auth', rates):.2f}x the calls/s of the "
        f"Python router + TLS + auth at {ratio('router, TLS + auth', cpu):.2f}x its CPU per call; "
        f"{ratio('direct, TLS + auth', rates):.2f}x direct mode + TLS + auth "
        f"(CPU per call {ratio('direct, TLS + auth', cpu):.2f}x, router + worker vs worker)"
    )


def pki(directory: Path) -> Path:
    """A pool CA, a pool certificate (router and worker) and a client certificate from it."""
    ca = LocalCA.generate("bench pool CA")
    root = directory / "tls"
    for name, issued in (
        ("pool", ca.issue(POOL_NAME, [POOL_NAME, "localhost", "127.0.0.1"])),
        ("client", ca.issue("bench client", server=False)),
    ):
        (root / name).mkdir(parents=True)
        write_file(root / name / CA_FILE, ca.cert_pem)
        write_issued(issued, root / name / CERT_FILE, root / name / KEY_FILE)
    return root


def micro(directory: Path) -> list[list[str]]:
    """Microseconds per verification step, in this process."""
    key = new_private_key()
    issuer = TicketIssuer(key)
    verifier = TicketVerifier(key.public_key())
    tickets = [issuer.issue(f"p{i}") for i in range(2000)]
    fresh = iter(tickets)
    miss = timeit.timeit(lambda: verifier.verify(next(fresh)), number=len(tickets))
    hit = timeit.timeit(lambda: verifier.verify(tickets[0]), number=20000)
    sign = timeit.timeit(lambda: issuer.issue("p"), number=2000)
    (directory / "many").write_text("".join(f"p{i}:token-{i:024d}\n" for i in range(100)))
    tokens = StaticTokens(directory / "many", recheck=3600)
    lookup = timeit.timeit(lambda: tokens.principal_of("token-" + "9" * 24), number=20000)
    return [
        ["ticket verified, cache miss (Ed25519)", f"{miss / len(tickets) * 1e6:.1f}"],
        ["ticket verified, cached", f"{hit / 20000 * 1e6:.2f}"],
        ["ticket signed", f"{sign / 2000 * 1e6:.1f}"],
        ["static token looked up among 100", f"{lookup / 20000 * 1e6:.1f}"],
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--in-flight", type=int, default=32)
    parser.add_argument("--no-ghz", action="store_true", help="skip the ghz rows")
    parser.add_argument(
        "--tokenreview-kubeconfig", help="time real TokenReviews against this cluster"
    )
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="bench-auth-"))
    tls = pki(directory)
    configs = [
        Config("router, neither", auth=False, direct=False),
        Config("router, auth", auth=True, direct=False),
        Config("router, TLS + auth", auth=True, direct=False, tls=tls),
        Config("router (haproxy), neither", auth=False, direct=False, data_path="haproxy"),
        Config(
            "router (haproxy), TLS + auth", auth=True, direct=False, tls=tls, data_path="haproxy"
        ),
        Config("direct, neither", auth=False, direct=True),
        Config("direct, auth", auth=True, direct=True),
        Config("direct, TLS + auth", auth=True, direct=True, tls=tls),
    ]
    try:
        for config in configs:
            config.start(directory)
        for _ in range(args.rounds):
            for config in configs:
                asyncio.run(measure(config, args.seconds, args.in_flight))
        if not args.no_ghz:
            ghz = Ghz(encode_request("add", {"a": 1, "b": 2}))
            try:
                for _ in range(args.rounds):
                    for config in configs:
                        measure_ghz(ghz, config, args.seconds, args.in_flight)
            finally:
                ghz.close()
    finally:
        for config in configs:
            config.close()
    headers = ["config", "calls/s", "÷ neither", "CPU ms/call (router+worker)", "rounds"]
    print(
        f"add, {args.in_flight} in flight, {args.rounds} rounds of {args.seconds:g} s (median); "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print("Python AsyncClient:")
    print(table(headers, rows_of(configs, "rates", "cpu_ms")))
    print(summary(configs, "rates", "cpu_ms"))
    if not args.no_ghz:
        print(
            "ghz (direct rows: straight to the worker, with a ticket when auth is on, 16 in flight):"
        )
        print(table(headers, rows_of(configs, "ghz_rates", "ghz_cpu_ms")))
        print(summary(configs, "ghz_rates", "ghz_cpu_ms"))
    print()
    print(table(["step", "µs"], micro(directory)))
    if args.tokenreview_kubeconfig:
        print()
        print(tokenreview_rtt(args.tokenreview_kubeconfig))
    else:
        print("\nTokenReview cache miss: not measured (pass --tokenreview-kubeconfig FILE)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
