"""The HAProxy data path's own pieces against a real HAProxy: config, ring, runtime API."""

from __future__ import annotations

import asyncio
import base64
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest

from snakepit.protocol import SERVICE_NAME, pb
from snakepit.protocol.messages import encode_request
from snakepit.router.haproxy.config import HaproxySpec, build_config
from snakepit.router.haproxy.process import haproxy_binary
from snakepit.router.haproxy.replies import error_headers
from snakepit.router.haproxy.runtime import RuntimeApi
from snakepit.router.haproxy.tlsfiles import HaproxyFiles
from snakepit.router.ring import HashRing, server_id
from snakepit.security.localca import LocalCA, write_file, write_issued
from snakepit.security.tls import CA_FILE, CERT_FILE, KEY_FILE, POOL_NAME, TlsFiles
from tests.fixtures.processes import (
    Proc,
    ProcessFactory,
    free_port,
    start_pool,
    wait_for,
    wait_ready,
)
from tests.fixtures.prometheus import scrape, value

pytestmark = pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")


@pytest.mark.parametrize(
    ("host", "queue_size", "queue_timeout", "call_log", "log_requests"),
    [
        ("127.0.0.1", 1000, 30.0, "", False),
        ("::", 2, 0.5, "abns@snakepit-calllog-check", False),
        ("127.0.0.1", 1000, 30.0, "abns@snakepit-calllog-check", True),
    ],
)
def test_the_built_config_is_one_haproxy_accepts(
    host: str, queue_size: int, queue_timeout: float, call_log: str, log_requests: bool
) -> None:
    spec = HaproxySpec(
        host=host,
        port=free_port(),
        control_port=free_port(),
        admin_socket="abns@snakepit-config-check",
        queue_size=queue_size,
        queue_timeout=queue_timeout,
        call_log=call_log,
        log_requests=log_requests,
        watchers_per_session=16,
        calls_per_principal=4,
        max_message_bytes=64 << 20,
    )
    checked = subprocess.run(
        [str(haproxy_binary()), "-c", "-f", "/dev/stdin"],
        input=build_config(spec).encode(),
        capture_output=True,
    )
    assert checked.returncode == 0, checked.stderr.decode()
    assert b"[WARNING]" not in checked.stderr, checked.stderr.decode()


@pytest.mark.parametrize(("client_ca", "strict"), [(False, False), (True, False), (True, True)])
def test_the_config_with_tls_and_auth_is_one_haproxy_accepts(
    tmp_path: Path, client_ca: bool, strict: bool
) -> None:
    """HAProxy's TLS copies and auth map, made from a router's files the way the router makes
    them, and the config that names them. With strict affinity (``tools_via_router``) HAProxy
    vouches for no caller and sends no tool call to a worker: the Python router does both."""
    ca = LocalCA.generate("pool CA")
    pool = tmp_path / "pool"
    pool.mkdir()
    write_file(pool / CA_FILE, ca.cert_pem)
    write_issued(ca.issue(POOL_NAME, [POOL_NAME]), pool / CERT_FILE, pool / KEY_FILE)
    public = TlsFiles(str(pool / CERT_FILE), str(pool / KEY_FILE), str(pool / CA_FILE))
    files = HaproxyFiles(
        TlsFiles.from_dir(pool), public if client_ca else replace(public, ca=""), auth=True
    )
    try:
        spec = HaproxySpec(
            host="127.0.0.1",
            port=free_port(),
            control_port=free_port(),
            admin_socket="abns@snakepit-config-check",
            tls=files.tls_spec(),
            auth_map=files.map_path,
            watchers_per_session=16,
            calls_per_principal=4,
            max_message_bytes=64 << 20,
            tools_via_router=strict,
        )
        config = build_config(spec)
        assert ("verify required" in config.split("bind")[1].split("\n")[0]) is client_ca
        assert ("acl fast always_false" in config) is strict
        assert ("set-var(txn.ticket)" in config) is not strict
        files.write()
        assert {p.stat().st_mode & 0o777 for p in files.dir.iterdir()} == {0o600}
        checked = subprocess.run(
            [str(haproxy_binary()), "-c", "-f", "/dev/stdin"],
            input=config.encode(),
            capture_output=True,
        )
        assert checked.returncode == 0, checked.stderr.decode()
        assert b"[WARNING]" not in checked.stderr, checked.stderr.decode()
        files.clear()
        assert list(files.dir.iterdir()) == []
    finally:
        files.remove()
    assert not files.dir.exists()


def test_an_haproxy_error_reply_carries_the_snakepit_error_detail() -> None:
    from snakepit.errors import ResourceExhausted

    headers = error_headers(ResourceExhausted("queue full", not_started=True)).split()
    assert headers[headers.index("grpc-status") + 1] == str(
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    )
    detail = pb.ErrorDetail.FromString(base64.b64decode(headers[-1]))
    assert (detail.type, detail.message, detail.not_started) == (
        "ResourceExhausted",
        "queue full",
        True,
    )


@pytest.mark.parametrize(
    ("pointed", "message"),
    [
        (True, "failed to connect to a worker (connection refused)"),
        (False, "no worker was up to take the call"),
    ],
)
def test_a_call_haproxy_could_not_place_is_unavailable_and_not_started(
    tmp_path: Path, pointed: bool, message: str
) -> None:
    """HAProxy's 503 for a call it never got to a worker, as a gRPC answer the caller may send
    again: a worker it could not connect to (slot 1 on a closed port, health checks off so the
    slot stays up), or no worker up when it picked one (every slot in maintenance). The second
    happens to the router only when the last worker goes down between the frontend's test that
    hands such calls to the Python router and the pick, so that test is taken out here."""
    from snakepit.protocol.status import error_from_rpc

    port, closed = free_port(), free_port()
    spec = HaproxySpec(
        host="127.0.0.1", port=port, control_port=closed, admin_socket=f"abns@test-503-{port}"
    )
    lines = []
    for line in build_config(spec).split("\n"):
        if "nbsrv(workers) eq 0" in line:
            continue
        if pointed and line.startswith("  default-server "):
            line = line.replace(" disabled", "").split(" check ")[0]
        if pointed and line.startswith("  server s1 "):
            line = f"  server s1 127.0.0.1:{closed} id 1"
        lines.append(line)
    config = tmp_path / "haproxy.cfg"
    config.write_text("\n".join(lines))
    haproxy = subprocess.Popen(
        [str(haproxy_binary()), "-db", "-f", str(config)], stderr=subprocess.DEVNULL
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=10)
            execute = channel.unary_unary(f"/{SERVICE_NAME}/ExecuteTool")
            with pytest.raises(grpc.RpcError) as refused:
                execute(encode_request("add", {"a": 1, "b": 2}), timeout=10)
    finally:
        haproxy.kill()
        haproxy.wait()
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    error = error_from_rpc(refused.value)
    assert message in error.message
    assert error.not_started


def test_haproxy_sends_each_session_where_the_python_ring_says(
    procs: ProcessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Direct-mode clients and the Python data path compute HAProxy's own choice."""
    monkeypatch.setenv("SNAKEPIT_DATA_PATH", "haproxy")
    router, workers = start_pool(procs, 3)
    ring = HashRing([str(w.extra["worker_id"]) for w in workers])
    from snakepit import Client

    with Client(router.address) as client:
        for i in range(150):
            session = client.session(f"ring-{i}-{'x' * (i % 7)}", keep=True)
            assert session.execute("whoami")["worker_id"] == ring.preferred(session.id)


def test_workers_whose_ring_ids_clash_still_get_the_sessions_the_python_ring_gives_them(
    procs: ProcessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ring ids are 1..1024 (HAProxy's server slots), so two names can want the same one: both
    sides settle the clash in name order."""
    monkeypatch.setenv("SNAKEPIT_DATA_PATH", "haproxy")
    names = ["clash-158", "clash-304", "other"]
    assert server_id(names[0]) == server_id(names[1])
    workers = [procs.worker(worker_id=name) for name in names]
    router = procs.router(workers)
    wait_ready(router.address, len(names))
    ring = HashRing(names)
    from snakepit import Client

    with Client(router.address) as client:
        seen = set()
        for i in range(150):
            session = client.session(f"clash-{i}", keep=True)
            seen.add(worker := session.execute("whoami")["worker_id"])
            assert worker == ring.preferred(session.id)
    assert seen == set(names)


def test_a_worker_haproxy_cannot_be_pointed_at_does_not_hold_up_the_others(
    procs: ProcessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A host name that does not resolve (listed first) is skipped, logged and retried."""
    monkeypatch.setenv("SNAKEPIT_DATA_PATH", "haproxy")
    worker = procs.worker(worker_id="good")
    router = procs.router(["bad=no-such-host.invalid:50051", worker])
    wait_ready(router.address, 1)
    from snakepit import Client

    with Client(router.address) as client:
        assert client.execute("add", a=1, b=2) == 3
    assert "haproxy server not pointed at a worker" in router.logs()


def _established(port: int) -> int:
    """TCP connections established to local ``port`` (every client of the server there)."""
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            for line in list(lines)[1:]:
                local, state = line.split()[1], line.split()[3]
                count += state == "01" and int(local.rpartition(":")[2], 16) == port
    return count


def test_calls_in_flight_to_a_worker_share_its_connections(
    procs: ProcessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """32 calls in flight through HAProxy reach their worker as HTTP/2 streams on one or two
    connections, not one connection per call (what HAProxy 2.6 does for a server added at run
    time: docs/architecture.md)."""
    monkeypatch.setenv("SNAKEPIT_DATA_PATH", "haproxy")
    router, (worker,) = start_pool(procs, 1, concurrency=32)
    worker_port = int(worker.address.rpartition(":")[2])
    from snakepit import AsyncClient

    async def run() -> tuple[int, list[float]]:
        async with AsyncClient(router.address) as client:
            calls = [asyncio.ensure_future(client.execute("sleep", seconds=2.0)) for i in range(32)]
            for _ in range(150):
                if (await client.status())["in_flight"] == 32:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("32 calls never were in flight at once")
            connections = _established(worker_port)
            return connections, await asyncio.gather(*calls)

    connections, results = asyncio.run(run())
    assert results == [2.0] * 32
    # HAProxy's, plus the Python router's own (health watch, store calls from the worker).
    assert connections <= 4, f"{connections} connections to the worker for 32 calls"


def test_large_calls_waiting_for_a_busy_worker_do_not_stall_their_connection(
    procs: ProcessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three 2 MB calls and a small one at once on one client connection, to one worker with one
    slot: the calls that wait must not stop the connection. Through HAProxy's own queue they did
    (HAProxy 2.6 stops reading a connection at a stream whose buffer is full, and refills that
    stream's window as it buffers): the first call's body never arrived and every call waited out
    ``timeout queue`` (docs/architecture.md, "Large request bodies")."""
    monkeypatch.setenv("SNAKEPIT_DATA_PATH", "haproxy")
    router, _ = start_pool(procs, 1, "--queue-timeout", "10", concurrency=1)
    tensor = np.arange(2**20 // 8 * 2, dtype=np.float64)
    from snakepit import AsyncClient

    async def run() -> list[object]:
        async with AsyncClient(router.address, timeout=60) as client:
            calls = [client.execute("tensor_scale", x=tensor, factor=2.0) for _ in range(3)]
            return await asyncio.gather(*calls, client.execute("add", a=1, b=2))

    *scaled, added = asyncio.run(run())
    assert added == 3
    for result in scaled:
        assert np.array_equal(result, tensor * 2.0)  # type: ignore[arg-type]


def test_the_runtime_api_answers_on_an_abstract_socket() -> None:
    name = f"abns@snakepit-test-{free_port()}"
    config = f"global\n  stats socket {name} level admin\n"
    proc = subprocess.Popen(
        [str(shutil.which("haproxy") or haproxy_binary()), "-db", "-f", "/dev/stdin"],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    proc.stdin.write(config.encode())
    proc.stdin.close()
    try:

        async def ping() -> bool:
            api = RuntimeApi(name)
            for _ in range(200):
                if await api.ping():
                    return True
                await asyncio.sleep(0.02)
            return False

        assert asyncio.run(ping())
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize(
    ("flags", "said"),
    [
        (("--data-path", "python"), "data path: python (asked for)"),
        # the default (the tests' environment pins python: see tests/fixtures/processes.py)
        (("--data-path", "auto"), "data path: haproxy"),
        # strict affinity: HAProxy in front, the Python router carries the tool calls
        (("--data-path", "auto", "--affinity", "strict"), "strict affinity: tool calls through"),
    ],
)
def test_serve_says_which_data_path_it_uses(
    procs: ProcessFactory, flags: tuple[str, ...], said: str
) -> None:
    from snakepit import Client

    pool = procs.serve(*flags, workers=1)
    assert said in pool.logs()
    with Client(pool.address) as client:
        assert client.execute("add", a=1, b=2) == 3


def _router_behind_wrapped_haproxy(
    procs: ProcessFactory, tmp_path: Path, before: str, *, wait: bool = True
) -> tuple[Proc, int]:
    """A router (memory store, one worker, a health port) whose HAProxy is started by a shell
    wrapper that runs ``before`` first: (router, its health port)."""
    wrapper = tmp_path / "wrapped-haproxy"
    wrapper.write_text(f'#!/bin/sh\n{before}\nexec {haproxy_binary()} "$@"\n')
    wrapper.chmod(0o755)
    worker = procs.worker(worker_id="w0")
    health, port = free_port(), free_port()
    router = procs.start(
        "router",
        ["router", "--host", "127.0.0.1", "--port", str(port), "--store", "memory",
         "--workers", f"w0={worker.address}", "--data-path", "haproxy",
         "--health-port", str(health)],
        f"127.0.0.1:{port}",
        env={"SNAKEPIT_HAPROXY": str(wrapper)},
        wait=wait,
    )  # fmt: skip
    return router, health


def _port_open(port: int) -> bool:
    import socket

    with socket.socket() as probe:
        probe.settimeout(0.2)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_the_health_port_is_serving_only_once_haproxy_takes_calls(
    procs: ProcessFactory, tmp_path: Path
) -> None:
    """The kubelet probes a TLS router pod on its plaintext health port (the overall service),
    which the Python router serves; HAProxy binds the pool port a moment later. SERVING before
    then made the pod Ready while its port refused connections: a router pod deleted under
    load on kind failed 262 calls with "Connection refused" through the router Service. Here
    HAProxy starts 2 s late (a wrapper sleeps before it), and the health port must not say
    SERVING before the pool port takes a call."""
    import time

    from grpc_health.v1.health_pb2 import HealthCheckResponse

    from snakepit import Client
    from tests.fixtures.processes import health_status

    serving, not_serving = HealthCheckResponse.SERVING, HealthCheckResponse.NOT_SERVING
    router, health = _router_behind_wrapped_haproxy(procs, tmp_path, "sleep 2", wait=False)
    port = int(router.address.rsplit(":", 1)[1])

    def port_open() -> bool:
        return _port_open(port)

    seen_not_serving = False
    deadline = time.monotonic() + 30
    while (status := health_status(f"127.0.0.1:{health}", timeout=0.3)) != serving:
        assert time.monotonic() < deadline, router.logs()[-2000:]
        seen_not_serving |= status == not_serving
        time.sleep(0.02)
    assert port_open(), "the health port said SERVING before HAProxy listened"
    assert seen_not_serving, "the health port never answered NOT_SERVING while HAProxy started"
    with Client(f"127.0.0.1:{port}") as client:
        assert client.execute("add", a=1, b=2) == 3


def test_the_health_and_metrics_ports_listen_where_the_pool_port_does(
    procs: ProcessFactory,
) -> None:
    """With HAProxy on the pool port, the Python router's own gRPC port is loopback only, but its
    plaintext health port (kubelet probes of a TLS pool) and metrics port (Prometheus) are not
    behind HAProxy: they listen on the router's host. On loopback they failed every startup
    probe of a router pod."""
    import psutil

    health, metrics, port = free_port(), free_port(), free_port()
    router = procs.start(
        "router",
        ["router", "--host", "0.0.0.0", "--port", str(port), "--store", "memory",
         "--workers", f"w0=127.0.0.1:{free_port()}", "--data-path", "haproxy",
         "--health-port", str(health), "--metrics-port", str(metrics)],
        f"127.0.0.1:{port}",
    )  # fmt: skip
    assert router.process is not None

    def listening() -> dict[int, str]:
        found = psutil.Process(router.process.pid).net_connections(kind="tcp")
        return {c.laddr.port: c.laddr.ip for c in found if c.status == psutil.CONN_LISTEN}

    wait_for(lambda: {health, metrics} <= set(listening()))
    bound = listening()
    wildcard = {"0.0.0.0", "::"}  # gRPC binds a wildcard host dual-stack
    assert bound[health] in wildcard and bound[metrics] in wildcard, bound


def test_a_compressed_call_is_counted_with_its_tool_unknown(
    procs: ProcessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HAProxy reads the tool name from the request body for the router's metrics; a gzip
    message is no protobuf to read, so it counts as ``unknown`` (not a name read from
    compressed bytes), and a plain one by its name."""
    from snakepit import Client
    from snakepit.protocol import method_path
    from snakepit.protocol.messages import encode_request

    monkeypatch.setenv("SNAKEPIT_DATA_PATH", "haproxy")
    port = free_port()
    router, _ = start_pool(procs, 1, "--metrics-port", str(port))
    with grpc.insecure_channel(router.address, compression=grpc.Compression.Gzip) as channel:
        execute = channel.unary_unary(method_path("ExecuteTool"))
        assert execute(encode_request("echo", {"value": "x" * 300}), timeout=10)
    with Client(router.address) as client:
        assert client.execute("add", a=1, b=2) == 3
    calls = "snakepit_router_calls_total"
    wait_for(lambda: value(scrape(port), calls, tool="add", code="OK") == 1)
    samples = scrape(port)
    assert value(samples, calls, tool="unknown", code="OK") == 1
    assert sum(v for (name, _), v in samples.items() if name == calls) == 2


def test_calls_are_still_counted_after_haproxy_is_restarted(
    procs: ProcessFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router restarts a HAProxy that died with the same call log, and points its slots
    again: calls keep counting by tool and by worker (its counters start again, ours go on)."""
    import signal

    import psutil

    from snakepit import Client

    monkeypatch.setenv("SNAKEPIT_DATA_PATH", "haproxy")
    port = free_port()
    router, _ = start_pool(procs, 1, "--metrics-port", str(port))
    calls = "snakepit_router_calls_total"
    attempts = "snakepit_router_worker_call_duration_seconds_count"
    with Client(router.address) as client:
        for _ in range(5):
            assert client.execute("add", a=1, b=2) == 3
        wait_for(lambda: value(scrape(port), calls, tool="add", code="OK") == 5)
        assert router.process is not None
        (haproxy,) = [
            p for p in psutil.Process(router.process.pid).children() if p.name() == "haproxy"
        ]
        haproxy.send_signal(signal.SIGKILL)
        haproxy.wait(timeout=10)

        def served() -> bool:
            try:
                return bool(client.execute("add", a=1, b=2) == 3)
            except Exception:
                return False

        wait_for(served, timeout=30, interval=0.2)  # a new HAProxy, its slot pointed again
        for _ in range(5):
            assert client.execute("whoami")["worker_id"] == "worker-0"
    wait_for(lambda: value(scrape(port), calls, tool="whoami", code="OK") == 5)
    assert value(scrape(port), attempts, worker="worker-0") >= 5 + 1 + 5


@pytest.mark.parametrize("data_path", ["python", "haproxy"])
def test_ctrl_c_in_the_terminal_of_serve_lets_the_calls_in_flight_finish(
    procs: ProcessFactory, data_path: str
) -> None:
    """Ctrl-C sends SIGINT to the terminal's whole process group: serve drains its calls, and
    HAProxy, in a process group of its own, is stopped softly after that rather than hard by the
    signal itself (which cut every call in flight)."""
    import os
    import signal
    import threading
    import time

    from snakepit import Client

    pool = procs.serve("--data-path", data_path, workers=1)
    assert f"data path: {data_path}" in pool.logs()
    answers: list[object] = []
    with Client(pool.address, timeout=20) as client:
        assert client.execute("add", a=1, b=2) == 3
        call = threading.Thread(target=lambda: answers.append(client.execute("sleep", seconds=1.5)))
        call.start()
        time.sleep(0.5)  # the call is running on the worker
        os.killpg(pool.pid, signal.SIGINT)
        call.join(timeout=20)
    assert answers and answers[0] is not None, pool.logs()[-2000:]
    assert pool.wait(timeout=30) == 0


def test_the_health_port_is_not_serving_while_haproxy_is_down(
    procs: ProcessFactory, tmp_path: Path
) -> None:
    """HAProxy dies and the router starts another: until it listens, the pool port refuses
    connections, so the health port (what the kubelet probes) says NOT_SERVING, and SERVING
    again once the new one takes calls. Before, it stayed SERVING: a router whose HAProxy
    crash-looped stayed Ready. The new HAProxy starts 2 s late here (a wrapper sleeps before
    every start but the first), so the window is long enough to see."""
    import signal

    import psutil
    from grpc_health.v1.health_pb2 import HealthCheckResponse

    from snakepit import Client
    from tests.fixtures.processes import health_status

    serving, not_serving = HealthCheckResponse.SERVING, HealthCheckResponse.NOT_SERVING
    started = tmp_path / "started-once"
    router, health = _router_behind_wrapped_haproxy(
        procs, tmp_path, f"if [ -e {started} ]; then sleep 2; fi; touch {started}"
    )
    port = int(router.address.rsplit(":", 1)[1])

    def status() -> int:
        return health_status(f"127.0.0.1:{health}", timeout=0.3)

    def port_open() -> bool:
        return _port_open(port)

    wait_for(lambda: status() == serving, timeout=30)
    assert router.process is not None
    (haproxy,) = [p for p in psutil.Process(router.process.pid).children() if p.name() == "haproxy"]
    haproxy.send_signal(signal.SIGKILL)
    haproxy.wait(timeout=10)
    wait_for(lambda: status() == not_serving, timeout=5, interval=0.02)
    assert not port_open(), "the pool port took connections with no HAProxy behind it"
    wait_for(lambda: status() == serving, timeout=30, interval=0.02)
    assert port_open(), "the health port said SERVING before the new HAProxy listened"
    with Client(f"127.0.0.1:{port}") as client:
        assert client.execute("add", a=1, b=2) == 3
