"""The security review's attacks against a live ``snakepit serve``, and what another caller feels.

    python bench/attacks.py [--src DIR] [--window S] [--only NAME,...] [--auth]
                            [--serve-arg=--FLAG=VALUE ...] [--attacker-nice N]

A victim process calls ``add`` through the router every 20 ms, and reads a session variable,
the whole time; each attack runs in its own window and the table shows the victim's worst and
p99 latency in that window next to a quiet window of the same length, plus whether the pool was
still fully ready afterwards. ``--src`` runs the pool from another source tree (e.g. an export
of an older commit), so before and after can be measured side by side on one machine:

    git archive 1e181ca src | tar -x -C /tmp/before && python bench/attacks.py --src /tmp/before/src

Attacks (docs/security.md): a ReDoS value against a ``(a+)+$`` pattern; one 100 MB write;
writes of 15 MB strings and bytes; 300 watchers of one 1 MB variable; 20,000 sessions from one
caller; 8 calls holding every worker slot (``sleep``). Every loop has a count and a time
limit; every process is a child of this one and is stopped by its own handle.

``--auth`` turns authentication on (``--auth-tokens``): the attacker and the victim are two
principals, and the pool runs with ``--max-calls-per-principal`` of all slots but two, so the
per-principal limits (sessions, calls in flight) are what the flood and the slot hog meet;
the "newcomer" after the session flood is then the victim. ``--serve-arg`` passes a flag on to
``snakepit serve`` (e.g. ``--serve-arg=--max-parsed-value-bytes=16777216`` so the 15 MB string
is accepted, as it was before the limits). The load average is printed before and after.

``--attacker-nice N`` lowers the attacking process's CPU priority once the pool and the victim
have started: in a real attack the attacker's CPU is its own machine's, while here its flood of
requests (it keeps 32 in flight) takes a core of this one from the pool and the victim. With
it, what remains of a window's latency is what the pool does, not what the attacker's client
costs this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, free_port, table

from snakepit import AsyncClient, Client
from snakepit.grpc_options import channel_options
from snakepit.protocol import pb, pb_grpc, to_pb

WORKERS = 2
CONCURRENCY = 4


# The principals of an ``--auth`` run and their tokens.
TOKENS = {"attacker": "attacker-token-" + "a" * 24, "victim": "victim-token-" + "v" * 24}
# With --auth: one principal may hold every slot but these.
SPARE_SLOTS = 2


class _Bearer:
    """Adds a token to every call of a raw stub (grpc.aio files an interceptor under its first
    kind only, so each kind is its own class below)."""

    def __init__(self, token: str) -> None:
        self.metadata = (("authorization", f"Bearer {token}"),)

    def _with_token(self, details: Any) -> Any:
        return details._replace(metadata=(*(details.metadata or ()), *self.metadata))


class _BearerUnary(_Bearer, grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


class _BearerStream(_Bearer, grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[misc]
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(self._with_token(details), request)


def bearer(token: str) -> list[Any]:
    return [_BearerUnary(token), _BearerStream(token)]


def victim(target: str, stop_file: Path, out_file: Path, token: str = "") -> None:
    """The other caller: small calls through the router until told to stop."""
    samples: list[tuple[float, float, bool]] = []
    client_ = Client(target, timeout=60, token=token or None)
    with client_ as client, client.session(keep=True) as session:
        session.set("v", 1)
        while not stop_file.exists():
            at, started = time.time(), time.perf_counter()  # a stall counts where it began
            ok = True
            try:
                client.execute("add", a=1, b=2)
                session.get("v")
            except Exception:
                ok = False
            samples.append((at, (time.perf_counter() - started) * 1000, ok))
            time.sleep(0.02)
    out_file.write_text(json.dumps(samples))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _status(call: Awaitable[Any]) -> str:
    try:
        await call
        return "OK"
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def redos(stub: pb_grpc.BridgeServiceStub, client: AsyncClient) -> str:
    await stub.InitializeSession(pb.InitializeSessionRequest(session_id="redos"))
    await stub.RegisterVariable(
        pb.RegisterVariableRequest(
            session_id="redos",
            name="v",
            type="string",
            value=to_pb("aaa"),
            constraints=pb.Constraints(pattern="(a+)+$"),
        )
    )
    evil = pb.SetVariableRequest(session_id="redos", name="v", value=to_pb("a" * 25 + "!"))
    results = [await _status(stub.SetVariable(evil, timeout=5)) for _ in range(3)]
    return f"3 writes of 26 chars: {', '.join(sorted(set(results)))}"


async def big_write(stub: pb_grpc.BridgeServiceStub, client: AsyncClient) -> str:
    await stub.InitializeSession(pb.InitializeSessionRequest(session_id="big"))
    value = pb.Value(type="string", json=b'"' + b"a" * (100 * 2**20) + b'"')
    request = pb.SetVariableRequest(session_id="big", name="v", value=value)
    return f"100 MB write: {await _status(stub.SetVariable(request, timeout=60))}"


async def limit_write(stub: pb_grpc.BridgeServiceStub, client: AsyncClient) -> str:
    """Writes of 15 MB: a string (parsed; the default limits refuse it) and bytes (copied;
    the largest kind of write they accept), each three times."""
    await stub.InitializeSession(pb.InitializeSessionRequest(session_id="limit"))
    text = pb.Value(type="string", json=b'"' + b"a" * (15 * 2**20) + b'"')
    raw = pb.Value(type="bytes", raw=b"a" * (15 * 2**20))
    outcomes = []
    for value in (text, raw):
        request = pb.SetVariableRequest(session_id="limit", name=value.type, value=value)
        results = [await _status(stub.SetVariable(request, timeout=60)) for _ in range(3)]
        outcomes.append(f"{value.type} {'/'.join(sorted(set(results)))}")
    return f"3 x 15 MB writes: {', '.join(outcomes)}"


async def watchers(stub: pb_grpc.BridgeServiceStub, client: AsyncClient) -> str:
    await stub.InitializeSession(pb.InitializeSessionRequest(session_id="watched"))
    one_mb = to_pb("x" * 1_000_000)
    await stub.SetVariable(pb.SetVariableRequest(session_id="watched", name="v", value=one_mb))
    streams = [
        stub.WatchVariables(pb.WatchVariablesRequest(session_id="watched")) for _ in range(300)
    ]

    async def opened(stream: Any) -> bool:
        try:
            await asyncio.wait_for(stream.initial_metadata(), 10)
            await asyncio.sleep(0.5)
            return not stream.done()
        except (grpc.aio.AioRpcError, TimeoutError):
            return False

    count = sum(await asyncio.gather(*(opened(s) for s in streams)))
    for _ in range(3):
        await stub.SetVariable(pb.SetVariableRequest(session_id="watched", name="v", value=one_mb))
    await asyncio.sleep(2)
    for stream in streams:
        stream.cancel()
    return f"300 watchers asked, {count} open; 3 writes of 1 MB"


async def sessions(stub: pb_grpc.BridgeServiceStub, client: AsyncClient) -> str:
    outcomes: dict[str, int] = {}
    created: list[str] = []
    pending = iter(range(20_000))
    deadline = time.monotonic() + 120

    async def worker() -> None:
        for _ in pending:
            if time.monotonic() > deadline:
                return
            try:
                reply = await stub.InitializeSession(pb.InitializeSessionRequest(), timeout=10)
                created.append(reply.session.session_id)
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            outcomes[code] = outcomes.get(code, 0) + 1

    await asyncio.gather(*(worker() for _ in range(32)))
    newcomer = NEWCOMER[0] if NEWCOMER else stub
    reply = newcomer.InitializeSession(pb.InitializeSessionRequest(session_id="new"), timeout=10)
    after = await _status(reply)
    if after == "OK":
        await newcomer.CleanupSession(pb.CleanupSessionRequest(session_id="new"))
    for sid in created:  # clean up so later attacks start from an empty store
        await stub.CleanupSession(pb.CleanupSessionRequest(session_id=sid))
    return f"20k creates: {outcomes}; a newcomer then gets {after}"


async def hog(stub: pb_grpc.BridgeServiceStub, client: AsyncClient) -> str:
    calls = [asyncio.ensure_future(client.execute("sleep", seconds=20)) for _ in range(8)]
    await asyncio.sleep(8)
    for call in calls:
        call.cancel()
    await asyncio.gather(*calls, return_exceptions=True)
    return "8 x sleep(20) with no deadline, cancelled after 8 s"


# With --auth: the victim's raw stub, which the session flood's "newcomer" uses.
NEWCOMER: list[pb_grpc.BridgeServiceStub] = []

ATTACKS: dict[str, Callable[[pb_grpc.BridgeServiceStub, AsyncClient], Awaitable[str]]] = {
    "redos": redos,
    "100MB-write": big_write,
    "15MB-writes": limit_write,
    "300-watchers": watchers,
    "20k-sessions": sessions,
    "slot-hog": hog,
}


def window_stats(samples: list[list[Any]], start: float, end: float) -> tuple[str, str, str]:
    """Worst and p99 latency of the victim's calls that began in the window; calls, failed."""
    inside = sorted(ms for t, ms, _ in samples if start <= t <= end)
    failed = sum(1 for t, _, ok in samples if start <= t <= end and not ok)
    if not inside:
        return "-", "-", "0/0"
    p99 = inside[int(0.99 * (len(inside) - 1))]
    return f"{inside[-1]:.1f}", f"{p99:.1f}", f"{len(inside)}/{failed}"


def ready_workers(target: str, token: str = "") -> str:
    with Client(target, token=token or None) as probe:
        for _ in range(100):
            try:
                ready = probe.status()["workers_ready"]
                if ready == WORKERS:
                    break
            except Exception as exc:
                ready = type(exc).__name__
            time.sleep(0.1)
    return f"{ready}/{WORKERS}"


Window = tuple[str, float, float, str, str, float]


def lower_priority(nice: int) -> None:
    """Every thread of this process ``nice`` steps nicer. ``os.nice`` changes the calling
    thread only (Linux), and gRPC's I/O threads, started by the readiness probe's channel
    before, kept receiving and sending the attack at full priority; threads started later
    inherit from these."""
    for task in Path("/proc/self/task").iterdir():
        tid = int(task.name)
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, tid, os.getpriority(os.PRIO_PROCESS, tid) + nice)


async def attack_all(
    target: str, serve_pid: int, names: list[str], quiet: float, auth: bool, nice: int = 0
) -> list[Window]:
    """A quiet window, then each attack in turn, with readiness and router growth after it."""
    if nice:
        lower_priority(nice)  # this process only: the pool and the victim were started before
    # The attacker's channel sends up to 512 MB: the server, not the client, must refuse.
    token = TOKENS["attacker"] if auth else ""
    interceptors = bearer(token) if auth else None
    options = channel_options(512)
    channel = grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    stub = pb_grpc.BridgeServiceStub(channel)
    victim_channel = None
    if auth:
        victim_channel = grpc.aio.insecure_channel(
            target, options=options, interceptors=bearer(TOKENS["victim"])
        )
        NEWCOMER.append(pb_grpc.BridgeServiceStub(victim_channel))
    start = time.time()
    await asyncio.sleep(quiet)
    windows: list[Window] = [("quiet", start, time.time(), "-", "", 0.0)]
    async with AsyncClient(target, token=token or None) as client:
        for name in names:
            before = rss_mb(serve_pid)
            start = time.time()
            try:
                outcome = await asyncio.wait_for(ATTACKS[name](stub, client), 180)
            except Exception as exc:
                outcome = f"attack failed: {type(exc).__name__}: {str(exc)[:80]}"
            grown = rss_mb(serve_pid) - before
            await asyncio.sleep(3)  # what the attack leaves behind counts too
            end = time.time()
            ready = await asyncio.to_thread(ready_workers, target, token)
            windows.append((name, start, end, outcome, ready, grown))
            await asyncio.sleep(2)
    await channel.close()
    if victim_channel is not None:
        await victim_channel.close()
    return windows


def run(args: argparse.Namespace) -> None:
    src = Path(args.src).resolve() if args.src else ROOT / "src"
    port = free_port()
    target = f"127.0.0.1:{port}"
    env = {**os.environ, "SNAKEPIT_LOG_LEVEL": "error", "PYTHONPATH": str(src)}
    argv = ["serve", "--port", str(port), "--workers", str(WORKERS)]
    argv += ["--worker-concurrency", str(CONCURRENCY), *args.serve_arg]
    tmp = Path(tempfile.mkdtemp(prefix="snakepit-attacks-"))
    token = ""
    if args.auth:
        tokens = tmp / "tokens.txt"
        tokens.write_text("".join(f"{who}:{tok}\n" for who, tok in TOKENS.items()))
        argv += ["--auth-tokens", str(tokens)]
        argv += ["--max-calls-per-principal", str(WORKERS * CONCURRENCY - SPARE_SLOTS)]
        token = TOKENS["attacker"]
    load_before = os.getloadavg()
    serve = subprocess.Popen(
        [sys.executable, "-m", "snakepit", *argv],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stop, out = tmp / "stop", tmp / "victim.json"
    victim_proc: subprocess.Popen[bytes] | None = None
    try:
        deadline = time.monotonic() + 60
        while ready_workers(target, token) != f"{WORKERS}/{WORKERS}":
            if time.monotonic() > deadline:
                raise TimeoutError("pool not ready")
        victim_proc = subprocess.Popen(
            [sys.executable, __file__, "--victim", target, str(stop), str(out)]
            + ([TOKENS["victim"]] if args.auth else [])
        )
        time.sleep(3)
        names = args.only.split(",") if args.only else list(ATTACKS)
        windows = asyncio.run(
            attack_all(target, serve.pid, names, args.window, args.auth, args.attacker_nice)
        )
    finally:
        stop.write_text("stop")
        if victim_proc is not None:
            victim_proc.wait(120)
        serve.terminate()
        try:
            serve.wait(30)
        except subprocess.TimeoutExpired:
            serve.kill()
    samples = json.loads(out.read_text()) if out.exists() else []
    rows = []
    for name, start, end, outcome, ready, grown in windows:
        worst, p99, failed = window_stats(samples, start, end)
        rows.append(
            [name, f"{end - start:.1f}", worst, p99, failed, ready, f"{grown:+.0f}", outcome]
        )
    print(f"source: {src}; serve {' '.join(argv[1:])}; attacker nice +{args.attacker_nice}")
    load_after = os.getloadavg()
    print("load average (1/5/15 min) before: {:.1f} {:.1f} {:.1f}".format(*load_before))
    print("load average (1/5/15 min) after:  {:.1f} {:.1f} {:.1f}".format(*load_after))
    headers = ["window", "s", "victim worst ms", "p99 ms", "calls/failed", "ready after"]
    print(table([*headers, "router RSS MB", "attack outcome"], rows))


def main() -> None:
    if len(sys.argv) in (5, 6) and sys.argv[1] == "--victim":
        victim(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), *sys.argv[5:])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--src", default="", help="run the pool from this source tree")
    parser.add_argument("--window", type=float, default=10.0, help="seconds of the quiet window")
    parser.add_argument("--only", default="", help=f"comma-separated subset of {list(ATTACKS)}")
    parser.add_argument(
        "--auth", action="store_true", help="attacker and victim as two authenticated principals"
    )
    parser.add_argument(
        "--serve-arg", action="append", default=[], help="a flag for snakepit serve (repeatable)"
    )
    parser.add_argument(
        "--attacker-nice", type=int, default=0, help="run the attacks this much nicer (0-19)"
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
