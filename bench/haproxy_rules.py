"""What the router's HAProxy rules cost per call: snakepit's haproxy.cfg against variants.

    python bench/haproxy_rules.py [--rounds R] [--seconds S] [--in-flight N]

One worker; in front of it one HAProxy per variant of the config ``build_config`` makes (its
first slot pointed at the worker, as the Python router would through the runtime API), plus a
minimal config (the one issue 11 measured: ``balance hdr``, ``hash-type consistent``, HTTP/2
both sides) and the worker straight. ghz calls ``add`` through each in turn, round by round.
The proxy's CPU per call is read from ``/proc/PID/stat``; the issue's target is the router's
CPU per call <= 0.25x the worker's. No Python router runs here, so what differs between the
HAProxy rows is HAProxy's rules alone.

When ``nginx`` is installed (``apt-get install nginx-core``; scripts/setup does not install
it, nothing but this bench uses it), one more row measures nginx's gRPC proxy set up like the
minimal config: the other well-kept native proxy Debian ships, side by side with HAProxy
(issue 11 asks for that comparison; docs/architecture.md records the choice).
"""

from __future__ import annotations

import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import free_port, spawn, table, wait_serving
from datapath import Sample, Target, measure
from ghz import Ghz
from ghz import main as ghz_main

from snakepit.grpc_options import DEFAULT_MAX_MESSAGE_MB
from snakepit.protocol.messages import encode_request
from snakepit.router.haproxy.config import HaproxySpec, build_config, call_log_answer_lines
from snakepit.router.haproxy.process import haproxy_binary


def snakepit_config(port: int, worker_port: int, name: str) -> str:
    """The router's haproxy.cfg with slot 1 on the worker and the idle slots left out."""
    spec = HaproxySpec(
        host="127.0.0.1",
        port=port,
        control_port=free_port(),
        admin_socket=f"abns@bench-rules-{name}",
        worker_concurrency=64,
        watchers_per_session=16,
        max_message_bytes=DEFAULT_MAX_MESSAGE_MB << 20,  # as the router sets it
    )
    lines = []
    for line in build_config(spec).split("\n"):
        slot = re.match(r"  server s(\d+) 0\.0\.0\.0:0 ", line)
        if slot is None:
            lines.append(line.replace(" disabled ", " "))
        elif slot.group(1) == "1":
            lines.append(f"  server s1 127.0.0.1:{worker_port} id 1")
    return "\n".join(lines)


def minimal_config(port: int, worker_port: int, name: str) -> str:
    return "\n".join([
        "global", "  maxconn 4096", f"  stats socket abns@bench-rules-{name} mode 600 level admin",
        "defaults", "  mode http", "  timeout connect 2s", "  timeout client 24h",
        "  timeout server 24h",
        "frontend snakepit", f"  bind 127.0.0.1:{port} proto h2", "  default_backend workers",
        "backend workers", "  balance hdr(snakepit-session-id)", "  hash-type consistent",
        "  http-reuse always", f"  server s1 127.0.0.1:{worker_port} proto h2 maxconn 64", "",
    ])  # fmt: skip


def nginx_config(port: int, worker_port: int, directory: Path) -> str:
    """nginx as close to ``minimal_config`` as it goes: consistent hashing on the session
    header, HTTP/2 both sides, kept connections to the worker. One process that serves
    (``master_process off``), so its pid is the one whose CPU is read. nginx has no queue and
    no bounded load; it forwards each call on a connection of its own to the worker (no
    multiplexing upstream), so ``keepalive`` keeps up to 64 of them."""
    return "\n".join([
        "worker_processes 1;", "daemon off;", "master_process off;",
        f"pid {directory}/nginx.pid;", f"error_log {directory}/nginx-error.log warn;",
        "events { worker_connections 4096; }",
        "http {", "  access_log off;", "  http2_max_requests 100000000;",
        *(f"  {kind}_temp_path {directory}/nginx-{kind};"
          for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")),
        "  upstream workers {", "    hash $http_snakepit_session_id consistent;",
        f"    server 127.0.0.1:{worker_port} max_conns=64;",
        "    keepalive 64;", "    keepalive_requests 100000000;", "  }",
        f"  server {{ listen 127.0.0.1:{port} http2; location / {{ grpc_pass grpc://workers; }} }}",
        "}", "",
    ])  # fmt: skip


def _without(pattern: str) -> Callable[[str], str]:
    return lambda config: "\n".join(
        line for line in config.split("\n") if not re.search(pattern, line)
    )


STRAIGHT = "straight to the worker"
NGINX = "nginx, set up as minimal"

# Variants of snakepit's config: each takes out (or adds) one thing.
VARIANTS: dict[str, Callable[[str], str]] = {
    "snakepit's": lambda config: config,
    "no wait-for-body": _without(r"wait-for-body"),
    "no message-size rule": _without(r"at-least 5 if|bytes\(1,4\)"),
    "no hash-balance-factor": _without(r"hash-balance-factor"),
    "no health checks": lambda config: re.sub(r"check inter .*mark-down", "", config),
    "default buffers and window": _without(r"tune\.bufsize|initial-window-size"),
    # The call log's read of each answer's length (on with metrics, which this config is not).
    "with the answer's length read": lambda config: config.replace(
        "backend workers\n", "\n".join(["backend workers", *call_log_answer_lines("on"), ""]), 1
    ),
    "larger poll batches": lambda config: config.replace(
        "global\n", "global\n  tune.maxpollevents 1024\n  tune.runqueue-depth 400\n", 1
    ),
}


def run(rounds: int, seconds: float, in_flight: int) -> str:
    binary = haproxy_binary()
    if binary is None:
        raise SystemExit("haproxy is not installed (scripts/setup installs it)")
    worker_port = free_port()
    worker = spawn(["worker", "--host", "127.0.0.1", "--port", str(worker_port),
                    "--worker-id", "w0", "--concurrency", "64"])  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = [worker]
    targets: list[Target] = []
    ghz = Ghz(encode_request("add", {"a": 1, "b": 2}))
    samples: dict[str, list[Sample]] = defaultdict(list)
    with tempfile.TemporaryDirectory() as directory:
        try:
            wait_serving(f"127.0.0.1:{worker_port}")
            builders = {name: snakepit_config for name in VARIANTS} | {"minimal": minimal_config}
            for index, (name, build) in enumerate(builders.items()):
                port = free_port()
                config = build(port, worker_port, str(index))
                if name in VARIANTS:
                    config = VARIANTS[name](config)
                path = Path(directory) / f"{index}.cfg"
                path.write_text(config)
                haproxy = subprocess.Popen(
                    [binary, "-f", str(path), "-db"], stderr=subprocess.DEVNULL
                )
                procs.append(haproxy)
                pids = {"proxy": haproxy.pid, "worker": worker.pid}
                targets.append(Target(name, f"127.0.0.1:{port}", pids))
            nginx = shutil.which("nginx")
            if nginx is not None:
                port = free_port()
                path = Path(directory) / "nginx.conf"
                path.write_text(nginx_config(port, worker_port, Path(directory)))
                proxy = subprocess.Popen([nginx, "-c", str(path)], stderr=subprocess.DEVNULL)
                procs.append(proxy)
                pids = {"proxy": proxy.pid, "worker": worker.pid}
                targets.append(Target(NGINX, f"127.0.0.1:{port}", pids))
            straight = Target(STRAIGHT, f"127.0.0.1:{worker_port}", {"worker": worker.pid})
            targets.append(straight)
            time.sleep(1.0)
            for target in targets:  # warm up every path once
                ghz.run(target.address, seconds=1, concurrency=in_flight)
            for _ in range(rounds):
                for target in targets:
                    samples[target.name].append(measure(ghz, target, seconds, in_flight)[0])
        finally:
            ghz.close()
            for proc in procs:
                proc.kill()
                proc.wait()
    straight_rate = statistics.median(s.rate for s in samples[STRAIGHT])
    rows = []
    for name, of_target in samples.items():
        rate = statistics.median(s.rate for s in of_target)
        proxy_cpu = statistics.median(s.cpu_per_10k.get("proxy", 0.0) for s in of_target)
        worker_cpu = statistics.median(s.cpu_per_10k["worker"] for s in of_target)
        rows.append([
            name, f"{rate:.0f}/s", f"{rate / straight_rate:.2f}x", f"{proxy_cpu:.2f}",
            f"{worker_cpu:.2f}", f"{proxy_cpu / worker_cpu:.2f}x" if proxy_cpu else "",
        ])  # fmt: skip
    missing = "" if NGINX in samples else "\n(no nginx row: nginx is not installed)"
    return table(["proxy: HAProxy config, or nginx", "calls/s", "vs straight", "proxy CPU s/10k",
                  "worker CPU s/10k", "proxy / worker (target <= 0.25)"], rows) + missing  # fmt: skip


if __name__ == "__main__":
    ghz_main(__doc__ or "", run, "one worker, one HAProxy per config variant, and nginx")
