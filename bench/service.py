"""Calls through a pool's router Service on each data path, on the local cluster (issue 11).

    python bench/service.py [--rounds 3] [--seconds 5] [--in-flight 32] [--workers 2]

Brings the local cluster up if it is not running (``scripts/local-cluster``, images included, as
the e2e suite does; it waits for the machine's cluster lock), installs the chart into namespaces
of its own and applies two pools that differ only in ``spec.router.dataPath``: ``python`` and
``haproxy``, one router replica each, secured as by default (operator-issued TLS, a
ServiceAccount token checked with TokenReview). ghz (bench/ghz.py) calls ``add`` in one session
per connection through each router Service's cluster IP, the two pools round by round. Printed:
calls/s, p50/p99, CPU per call of the router pod (and of the HAProxy process in it) and of the
worker pods (their cgroups on this machine, where the local cluster's pods run), and HAProxy ÷
Python next to issue 11's targets. What it created is deleted at the end (``--keep`` leaves it).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import table
from ghz import Ghz

from localkube.config import Config
from localkube.providers import KubeCluster, make_provider, wait_until
from snakepit.protocol.messages import encode_request
from tests.fixtures.kube import DEFAULT_LOCK, ENV_LOCK

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("python", "haproxy")
PORT = 50051
AUDIENCE = "snakepit"
CGROUPS = Path("/sys/fs/cgroup")


@contextlib.contextmanager
def cluster_lock() -> Iterator[None]:
    """The lock every e2e session holds: one user of the machine's cluster at a time."""
    fd = os.open(os.environ.get(ENV_LOCK) or DEFAULT_LOCK, os.O_CREAT | os.O_RDWR, 0o666)
    print("waiting for the cluster lock", file=sys.stderr)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


def kube(cluster: KubeCluster, *args: str, stdin: str | None = None) -> str:
    return cluster.kubectl_run(*args, input=stdin).stdout


def install_operator(cluster: KubeCluster, operator_ns: str, pool_ns: str) -> None:
    """The chart, watching ``pool_ns`` only, with this tree's CRD and images."""
    kube(cluster, "apply", "--server-side", "--force-conflicts",
         "-f", str(ROOT / "charts/snakepit/crds/snakepitpools.yaml"))  # fmt: skip
    helm = Config().helm_bin
    prefix = cluster.image_prefix
    subprocess.run(
        [str(helm), "install", f"bench-{operator_ns}", str(ROOT / "charts/snakepit"),
         "--namespace", operator_ns, "--create-namespace", "--wait", "--timeout", "5m",
         "--set", f"image.repository={prefix}/operator",
         "--set", f"image.pullPolicy={cluster.pull_policy}",
         "--set", f"workerImage={prefix}/worker:dev", "--set", f"redisImage={prefix}/redis:dev",
         "--set", f"watch.namespaces={{{pool_ns}}}"],
        env=cluster.env, check=True, capture_output=True, timeout=600,
    )  # fmt: skip


def pool_manifest(name: str, path: str, workers: int, pull_policy: str) -> str:
    return json.dumps(
        {
            "apiVersion": "snakepit.dev/v1alpha1",
            "kind": "SnakepitPool",
            "metadata": {"name": name},
            "spec": {
                "replicas": workers,
                "imagePullPolicy": pull_policy,
                "router": {"replicas": 1, "dataPath": path},
            },
        }
    )


def ready(cluster: KubeCluster, ns: str, name: str, workers: int) -> bool:
    pool = json.loads(kube(cluster, "-n", ns, "get", "spp", name, "-o", "json"))
    status = pool.get("status", {})
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    return conditions.get("Ready") == "True" and status.get("readyReplicas") == workers


def pod_uids(cluster: KubeCluster, ns: str, pool: str, component: str) -> list[str]:
    selector = f"snakepit.dev/pool={pool},app.kubernetes.io/component={component}"
    pods = json.loads(kube(cluster, "-n", ns, "get", "pods", "-l", selector, "-o", "json"))
    return [p["metadata"]["uid"] for p in pods["items"] if p["status"].get("phase") == "Running"]


def cpu_seconds(uids: list[str]) -> float:
    """CPU time of these pods so far, from their cgroups: v1 ``cpuacct`` (the local cluster's
    kubelet, cgroupfs driver) or v2 ``cpu.stat`` (systemd or cgroupfs names)."""
    return sum(_pod_cpu_seconds(uid) for uid in uids)


def _pod_cpu_seconds(uid: str) -> float:
    directory = _pod_cgroup(uid)
    if (directory / "cpuacct.usage").exists():
        return int((directory / "cpuacct.usage").read_text()) / 1e9
    stat = (directory / "cpu.stat").read_text().split()
    return int(stat[stat.index("usage_usec") + 1]) / 1e6


def _pod_cgroup(uid: str) -> Path:
    v1 = CGROUPS / "cpuacct" / "kubepods"
    for directory in v1.glob(f"**/pod{uid}") if v1.is_dir() else ():
        return directory
    names = (f"pod{uid}", f"pod{uid.replace('-', '_')}")
    for directory in CGROUPS.glob("kubepods*/**/*pod*"):
        if any(name in directory.name for name in names):
            return directory
    raise RuntimeError(f"no cgroup for pod {uid} under {CGROUPS}")


def process_cpu_seconds(uids: list[str], command: str) -> float:
    """CPU time so far of the processes named ``command`` in these pods (``/proc/PID/stat``):
    the router pod's HAProxy, apart from its Python router."""
    total = 0.0
    for uid in uids:
        for procs in _pod_cgroup(uid).glob("**/cgroup.procs"):
            for pid in procs.read_text().split():
                with contextlib.suppress(OSError):
                    if Path(f"/proc/{pid}/comm").read_text().strip() != command:
                        continue
                    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                    total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def credentials(cluster: KubeCluster, ns: str, pool: str, directory: Path) -> tuple[Path, str]:
    """The pool's CA (what ghz trusts) and a token of the namespace's ``default`` account."""

    def issued() -> bytes:
        secret = json.loads(
            kube(cluster, "-n", ns, "get", "secret", "snakepit-certs", "-o", "json")
        )
        key = f"{pool}.ca.crt"
        return base64.b64decode(secret["data"][key]) if key in secret.get("data", {}) else b""

    ca = directory / f"{pool}-ca.pem"
    ca.write_bytes(wait_until(f"the CA of {pool}", issued, timeout=300))
    token = kube(cluster, "-n", ns, "create", "token", "default", "--audience", AUDIENCE).strip()
    return ca, token


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each ghz run")
    parser.add_argument("--in-flight", type=int, default=32, help="concurrent calls")
    parser.add_argument("--workers", type=int, default=2, help="worker pods of each pool")
    parser.add_argument("--keep", action="store_true", help="leave the namespaces")
    args = parser.parse_args()
    with cluster_lock():
        cluster = make_provider(os.environ.get("SNAKEPIT_E2E_CLUSTER") or "local", Config()).ensure(
            "node"
        )
        ns = f"bench-service-{uuid.uuid4().hex[:6]}"
        operator_ns = f"{ns}-system"
        kube(cluster, "create", "namespace", ns)
        try:
            run(cluster, ns, operator_ns, args)
        finally:
            if not args.keep:
                for namespace in (ns, operator_ns):
                    cluster.kubectl_run(
                        "delete", "namespace", namespace, "--wait=false", check=False
                    )
                subprocess.run(
                    [str(Config().helm_bin), "uninstall", f"bench-{operator_ns}",
                     "--namespace", operator_ns, "--ignore-not-found"],
                    env=cluster.env, capture_output=True, check=False,
                )  # fmt: skip


def run(cluster: KubeCluster, ns: str, operator_ns: str, args: argparse.Namespace) -> None:
    started = time.monotonic()
    install_operator(cluster, operator_ns, ns)
    for path in PATHS:
        kube(cluster, "-n", ns, "apply", "-f", "-",
             stdin=pool_manifest(path, path, args.workers, cluster.pull_policy))  # fmt: skip
    wait_until(
        "both pools Ready", lambda: all(ready(cluster, ns, p, args.workers) for p in PATHS), 600
    )
    print(f"operator and pools ready in {time.monotonic() - started:.0f} s", file=sys.stderr)
    for path in PATHS:
        logs = kube(cluster, "-n", ns, "logs", f"deploy/{path}-router")
        said = next((line for line in logs.splitlines() if "data path:" in line), "")
        print(f"{path} pool's router: {said.strip()[:160]}", file=sys.stderr)
        if f"data path: {path}" not in said:
            raise SystemExit(f"the {path} pool's router does not run the {path} data path")
    ghz = Ghz(encode_request("add", {"a": 1, "b": 2}))
    results: dict[str, list[dict[str, float]]] = {path: [] for path in PATHS}
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        targets = {}
        for path in PATHS:
            # The cluster IP where this machine routes to it, else a port-forward.
            address = stack.enter_context(cluster.service_address(ns, f"{path}-router", PORT))
            ca, token = credentials(cluster, ns, path, Path(tmp))
            tls = ["--cacert", str(ca), "--cname", f"{path}-router.{ns}.svc"]
            targets[path] = (address, tls, {"authorization": f"Bearer {token}"})
        try:
            for path in PATHS:  # warm: connections, TokenReview caches, HAProxy's maps
                address, tls, metadata = targets[path]
                ghz.run(
                    address, seconds=1.0, concurrency=args.in_flight, tls=tls, metadata=metadata
                )
            for _ in range(args.rounds):
                for path in PATHS:
                    address, tls, metadata = targets[path]
                    router = pod_uids(cluster, ns, path, "router")
                    workers = pod_uids(cluster, ns, path, "worker")
                    before = (
                        cpu_seconds(router),
                        cpu_seconds(workers),
                        process_cpu_seconds(router, "haproxy"),
                    )
                    result = ghz.run(
                        address,
                        seconds=args.seconds,
                        concurrency=args.in_flight,
                        tls=tls,
                        metadata=metadata,
                    )
                    after = (
                        cpu_seconds(router),
                        cpu_seconds(workers),
                        process_cpu_seconds(router, "haproxy"),
                    )
                    calls = result.count
                    # ghz counts the calls its end of run cuts off as errors: up to one per
                    # stream in flight ("use of closed network connection").
                    if result.errors > args.in_flight:
                        raise SystemExit(f"{path}: {result.errors} errors: {result.error_kinds}")
                    results[path].append(
                        {
                            "calls/s": result.rate,
                            "p50": result.p50_ms,
                            "p99": result.p99_ms,
                            "router": (after[0] - before[0]) / calls * 1e6,
                            "worker": (after[1] - before[1]) / calls * 1e6,
                            "haproxy": (after[2] - before[2]) / calls * 1e6,
                        }
                    )
        finally:
            ghz.close()
    print_results(results, args)


def print_results(results: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> None:
    def med(path: str, key: str) -> float:
        return statistics.median(r[key] for r in results[path])

    rows = [
        [path, f"{med(path, 'calls/s'):.0f}", f"{med(path, 'p50'):.2f}", f"{med(path, 'p99'):.2f}",
         f"{med(path, 'router'):.0f}", f"{med(path, 'haproxy'):.0f}",
         f"{med(path, 'worker'):.0f}",
         " ".join(f"{r['calls/s']:.0f}" for r in results[path])]
        for path in PATHS
    ]  # fmt: skip
    print(
        f"\nthrough the router Service, add, {args.in_flight} in flight, {args.workers} workers, "
        f"medians of {args.rounds} interleaved rounds of {args.seconds:g} s"
    )
    print(table(["data path", "calls/s", "p50 ms", "p99 ms", "router µs CPU/call",
                 "of which HAProxy", "workers µs CPU/call", "each round calls/s"],
                rows))  # fmt: skip
    ratio = med("haproxy", "calls/s") / med("python", "calls/s")
    cpu = med("haproxy", "router") / med("haproxy", "worker")
    print(f"haproxy ÷ python calls/s: {ratio:.2f}x")
    print(f"router CPU ÷ worker CPU per call: haproxy {cpu:.2f}x (target ≤ 0.25x), "
          f"python {med('python', 'router') / med('python', 'worker'):.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
