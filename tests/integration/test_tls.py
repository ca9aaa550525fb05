"""TLS on every hop, on real processes: ``snakepit serve`` with TLS and mutual TLS, a router and
workers with the pool CA, rogue workers, mismatched clients, and certificates replaced under load.

Every listener is probed as an attacker would: in plaintext, and over TLS without the right
client certificate. A hop that works while its listener refuses both is a TLS hop.
"""

from __future__ import annotations

import asyncio
import datetime
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
import redis
from cryptography import x509

from snakepit import AsyncClient, Client
from snakepit.errors import FailedPrecondition, SnakepitError, Unavailable
from snakepit.protocol import method_path, pb
from snakepit.security.localca import LocalCA, write_file, write_issued
from snakepit.security.tls import CA_FILE, CERT_FILE, KEY_FILE, POOL_NAME, TlsFiles
from tests.fixtures.processes import (
    Proc,
    ProcessFactory,
    free_port,
    health_status,
    wait_for,
    wait_serving,
)
from tests.fixtures.processes import child_env as env_with
from tests.fixtures.redis import RedisFactory
from tests.support.load import MixedLoad

LOCAL_NAMES = ["localhost", "127.0.0.1"]


@dataclass
class Pki:
    """A public CA (server and client certificates), a pool CA (its directory in the shape of
    a Kubernetes TLS Secret) and a rogue CA nobody trusts."""

    root: Path
    public: LocalCA
    pool: LocalCA
    rogue: LocalCA

    @property
    def ca(self) -> str:
        return str(self.root / "ca.pem")

    def path(self, name: str) -> str:
        return str(self.root / name)

    def issue_public(self, name: str, *, client: bool = False) -> None:
        issued = self.public.issue(f"snakepit {name}", [] if client else LOCAL_NAMES)
        write_issued(issued, self.root / f"{name}.pem", self.root / f"{name}-key.pem")

    def pool_dir(
        self, name: str, ca: LocalCA | None = None, *, trusted: LocalCA | None = None
    ) -> Path:
        """A pool member's files: a certificate from ``ca`` (default the pool CA) naming the
        pool, and the CA it trusts (default the pool CA)."""
        directory = self.root / name
        directory.mkdir(exist_ok=True)
        write_file(directory / CA_FILE, (trusted or self.pool).cert_pem)
        self.renew(directory, ca)
        return directory

    def renew(self, directory: Path, ca: LocalCA | None = None) -> x509.Certificate:
        issued = (ca or self.pool).issue(POOL_NAME, [POOL_NAME, *LOCAL_NAMES])
        write_issued(issued, directory / CERT_FILE, directory / KEY_FILE)
        return x509.load_pem_x509_certificate(issued.cert_pem)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def make_pki(tmp_path: Path) -> Pki:
    root = tmp_path / "pki"
    root.mkdir()
    pki = Pki(
        root,
        LocalCA.generate("public CA"),
        LocalCA.generate("pool CA"),
        LocalCA.generate("rogue CA"),
    )
    write_file(root / "ca.pem", pki.public.cert_pem)
    pki.issue_public("server")
    pki.issue_public("client", client=True)
    return pki


def served_serial(address: str, client_dir: Path | None = None) -> int:
    """The serial number of the certificate a TLS server presents now (a new connection)."""
    host, port = address.rsplit(":", 1)
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if client_dir is not None:
        context.load_cert_chain(client_dir / CERT_FILE, client_dir / KEY_FILE)
    import socket

    with (
        socket.create_connection((host, int(port)), timeout=5) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def refused(target: str, **tls: str) -> SnakepitError:
    """The error a ping to ``target`` gets with these client keywords (it must fail)."""
    with Client(target, timeout=20, **tls) as client, pytest.raises(SnakepitError) as info:
        client.ping()
    return info.value


def start_tls_pool(
    procs: ProcessFactory,
    pki: Pki,
    workers: int = 2,
    *router_args: str,
    log_level: str = "warning",
    impostors: tuple[Proc, ...] = (),
    worker_args: tuple[str, ...] = (),
    token: str = "",
) -> tuple[Proc, list[Proc], Path]:
    """Workers and a router, the pool's hops mutual TLS with the pool CA (one directory each,
    as pods mount a Secret), the router's port TLS with the public server certificate; the
    router is also told that ``impostors`` are workers. ``token``: what the router wants."""
    internal = free_port()
    started = []
    for i in range(workers):
        directory = pki.pool_dir(f"worker-{i}")
        started.append(
            procs.worker(
                "--store",
                "router",
                "--router",
                f"127.0.0.1:{internal}",
                "--pool-tls-dir",
                str(directory),
                "--tls-client-ca",
                pki.ca,
                *worker_args,
                worker_id=f"worker-{i}",
                wait=False,
                env={"SNAKEPIT_LOG_LEVEL": log_level},
            )
        )
    router_dir = pki.pool_dir("router")
    entries = [*started, *impostors]
    router = tls_router(procs, pki, entries, *router_args, internal=internal, log_level=log_level)
    with Client(router.address, ca=pki.ca, timeout=5, token=token) as client:
        wait_for(lambda: len(_ready(client)) == workers, timeout=30)
    return router, started, router_dir


def tls_router(
    procs: ProcessFactory,
    pki: Pki,
    workers: list[Proc],
    *args: str,
    internal: int = 0,
    log_level: str = "warning",
) -> Proc:
    """A router with TLS on its port and the pool's mutual TLS (its files in ``router``)."""
    port = free_port()
    entries = ",".join(f"{w.extra['worker_id']}={w.address}" for w in workers)
    return procs.start(
        "router",
        ["router", "--host", "127.0.0.1", "--port", str(port), "--workers", entries,
         "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server-key.pem"),
         "--pool-tls-dir", str(pki.root / "router"), "--internal-port", str(internal or free_port()),
         *args],
        f"127.0.0.1:{port}",
        wait=False,
        env={"SNAKEPIT_LOG_LEVEL": log_level},
    )  # fmt: skip


def test_serve_with_mutual_tls_runs_every_hop_over_tls(
    procs: ProcessFactory, tmp_path: Path, data_path: str
) -> None:
    generated = tmp_path / "tls"
    pool = procs.serve(
        "--tls-generate", str(generated), "--tls-client-ca", str(generated / "ca.pem")
    )
    mtls = {
        "ca": str(generated / "ca.pem"),
        "cert": str(generated / "client.pem"),
        "key": str(generated / "client-key.pem"),
    }
    with Client(pool.address, timeout=20, **mtls) as client:
        assert client.execute("add", a=1, b=2) == 3
        with client.session() as session:
            # worker -> router: the store (the counter lives in the session) and ctx.call_tool
            assert session.execute("counter_increment") == 1
            assert session.execute("counter_increment") == 2
            assert session.execute("nested_add", a=2, b=3) == 5
        status = client.status()
        workers = [w["address"] for w in status["workers"]]
        routed = status["calls_total"]
    # direct mode: client -> worker, mutual TLS with the client CA the workers also trust
    with Client(pool.address, timeout=20, direct=True, **mtls) as direct:
        assert [direct.execute("add", a=i, b=1) for i in range(5)] == [1, 2, 3, 4, 5]
        assert list(direct.stream("count", n=3)) == [0, 1, 2]

    async def direct_async() -> list[object]:
        async with AsyncClient(pool.address, timeout=20, direct=True, **mtls) as client:
            return [await client.execute("add", a=1, b=1), await client.execute("echo", value="x")]

    assert asyncio.run(direct_async()) == [2, "x"]
    with Client(pool.address, timeout=20, **mtls) as client:
        assert client.status()["calls_total"] == routed  # none of them went through the router

    # Every listener refuses plaintext, and TLS without a client certificate it trusts.
    for address in [pool.address, *workers]:
        assert "speaks TLS" in str(refused(address))
        assert "client certificate" in str(refused(address, ca=str(generated / "ca.pem")))


def test_serve_generates_a_ca_and_the_cli_uses_it(procs: ProcessFactory, tmp_path: Path) -> None:
    generated = tmp_path / "tls"
    pool = procs.serve("--tls-generate", str(generated))
    assert {p.name for p in generated.iterdir()} >= {"ca.pem", "server.pem", "client.pem"}
    assert (generated / "server-key.pem").stat().st_mode & 0o077 == 0
    cli = [sys.executable, "-m", "snakepit", "call", "add", "a=1", "b=2", "--target", pool.address]
    by_flag = subprocess.run(
        [*cli, "--ca", str(generated / "ca.pem")],
        env=env_with(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert by_flag.returncode == 0, by_flag.stderr
    assert by_flag.stdout.strip() == "3.0"
    by_env = subprocess.run(
        cli,
        env=env_with(SNAKEPIT_TLS_CA=str(generated / "ca.pem")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert by_env.stdout.strip() == "3.0", by_env.stderr
    plain = subprocess.run(cli, env=env_with(), capture_output=True, text=True, timeout=60)
    assert plain.returncode == 1
    assert "speaks TLS, but this client connects in plaintext" in plain.stderr
    missing = subprocess.run(
        [*cli, "--ca", str(generated / "nope.pem")], env=env_with(), capture_output=True, text=True,
        timeout=60,
    )  # fmt: skip
    assert missing.returncode == 1
    assert f"TLS CA file {generated / 'nope.pem'} does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


async def test_plaintext_and_tls_mismatch_is_one_clear_error(
    procs: ProcessFactory, pki: Pki
) -> None:
    tls_pool = procs.serve(
        "--tls-cert", pki.path("server.pem"), "--tls-key", pki.path("server-key.pem")
    )
    plain_pool = procs.serve()
    # Deadlines far longer than the answer: a hang would show as DEADLINE_EXCEEDED.
    error = refused(tls_pool.address)
    assert isinstance(error, Unavailable)
    assert f"{tls_pool.address} speaks TLS, but this client connects in plaintext" in str(error)
    error = refused(plain_pool.address, ca=pki.ca)
    assert isinstance(error, Unavailable)
    assert "answered in plaintext, but this client uses TLS" in str(error)
    error = refused(tls_pool.address, ca=str(pki.pool_dir("other", pki.rogue) / CA_FILE))
    assert "not signed by a CA this client trusts" in str(error)
    async with AsyncClient(tls_pool.address, timeout=20) as client:
        with pytest.raises(Unavailable, match="speaks TLS"):
            await client.ping()
    async with AsyncClient(tls_pool.address, timeout=20, ca=pki.ca) as client:
        assert await client.execute("add", a=1, b=1) == 2


def test_a_rogue_worker_without_a_pool_certificate_gets_no_call(
    procs: ProcessFactory, pki: Pki, data_path: str
) -> None:
    # Two impostors at addresses the router was told are workers: one with a certificate that
    # names the pool but comes from another CA, one in plaintext.
    rogue_dir = pki.pool_dir("rogue", pki.rogue, trusted=pki.rogue)
    rogue = procs.worker("--pool-tls-dir", str(rogue_dir), worker_id="rogue", wait=False)
    plain = procs.worker(worker_id="plain")
    router, workers, _ = start_tls_pool(procs, pki, 1, impostors=(rogue, plain))
    with Client(router.address, ca=pki.ca, timeout=10) as client:
        assert _ready(client) == {"worker-0"}
        served = {client.execute("whoami")["worker_id"] for _ in range(40)}
        with client.session() as session:
            served |= {session.execute("whoami")["worker_id"] for _ in range(5)}
        states = {w["worker_id"]: w["state"] for w in client.status()["workers"]}
    assert served == {"worker-0"}
    assert states["rogue"] == states["plain"] == "unreachable"
    # ... and a caller with the rogue certificate gets nothing from a real worker.
    error = refused(
        workers[0].address,
        ca=str(rogue_dir / CA_FILE),
        cert=str(rogue_dir / CERT_FILE),
        key=str(rogue_dir / KEY_FILE),
    )
    assert isinstance(error, Unavailable)


def _ready(client: Client) -> set[str]:
    try:
        return {w["worker_id"] for w in client.status()["workers"] if w["state"] == "ready"}
    except SnakepitError:
        return set()


def test_certificates_replaced_under_load_fail_no_call(
    procs: ProcessFactory, pki: Pki, data_path: str
) -> None:
    # Clients reconnect every second, so the router's renewed certificate is used all along.
    router, workers, router_dir = start_tls_pool(
        procs, pki, 2, "--max-connection-age", "1", log_level="info"
    )
    worker_dirs = [pki.root / f"worker-{i}" for i in range(2)]
    before = served_serial(router.address)
    with MixedLoad(
        router.address, sessions=16, client_options={"ca": pki.ca}, tensor_mb=0.5
    ) as load:
        time.sleep(1.0)
        with load.window("certificates replaced") as window:
            for _ in range(3):
                pki.issue_public("server")
                for directory in [router_dir, *worker_dirs]:
                    renewed = pki.renew(directory)
                time.sleep(1.5)
    print(window.summary())
    window.check(min_calls=30)
    load.check_no_acknowledged_write_lost()
    assert served_serial(router.address) != before
    assert served_serial(workers[1].address, router_dir) == renewed.serial_number
    assert "redialling workers" in router.logs()  # router -> workers
    if data_path == "haproxy":  # HAProxy's copies: the public pair, the pool pair (and CA)
        assert router.logs().count("haproxy TLS file renewed") >= 4
    # workers -> router: each worker redials on its first store call after a renewal, so make
    # sure each serves one (a loaded machine may have given one worker none in the window).
    time.sleep(1.1)
    with Client(router.address, ca=pki.ca, timeout=30) as client:
        served: set[str] = set()
        for _ in range(50):
            with client.session() as session:
                session.execute("counter_increment")
                served.add(session.execute("whoami")["worker_id"])
            if len(served) == 2:
                break
    wait_for(lambda: all("TLS files renewed; redialled" in w.logs() for w in workers), timeout=10)


def test_a_pool_ca_rotated_step_by_step_under_load_fails_no_call(
    procs: ProcessFactory, pki: Pki, data_path: str
) -> None:
    """The operator's CA rotation (builders/carotation.py), its three published states written
    into each member's files one directory after another, as the kubelet updates pods one by
    one: old+new CA trusted, then leaves from the new CA, then the new CA alone. Calls through
    the router (router -> workers and workers -> router: mutual TLS with the pool CA) keep
    succeeding all along, and at the end a leaf of the old CA gets no handshake."""
    from snakepit.operator.builders.carotation import CaRotation, rotation_step

    router, workers, router_dir = start_tls_pool(
        procs, pki, 2, "--max-connection-age", "1", log_level="info"
    )
    dirs = [router_dir, *(pki.root / f"worker-{i}" for i in range(2))]
    old_leaf_dir = pki.pool_dir("old-member")  # a member that never gets the new CA
    state = CaRotation(pki.pool)
    settle = datetime.timedelta(seconds=2)
    phases = []
    with MixedLoad(router.address, sessions=16, client_options={"ca": pki.ca}) as load:
        time.sleep(1.0)
        with load.window("pool CA rotated") as window:
            for request in ("rotate", "rotate", "rotate"):
                now = datetime.datetime.now(datetime.UTC)
                moved = rotation_step(
                    state, now + settle, request=request, settle=settle,
                    new_ca=lambda: LocalCA.generate("pool CA, next"),
                )  # fmt: skip
                assert moved is not None
                for directory in dirs:  # pod by pod
                    if moved.current is not state.current:
                        pki.renew(directory, moved.current)
                    write_file(directory / CA_FILE, moved.trusted())
                    time.sleep(0.5)
                state = moved
                phases.append(state.phase)
                time.sleep(2.0)  # every process has reloaded (checks: 0.5 s and 1 s)
    print(window.summary())
    assert phases == ["published", "switched", "steady"]
    window.check(min_calls=30)
    load.check_no_acknowledged_write_lost()
    if data_path == "haproxy":
        # HAProxy 2.6 cannot take a new CA at run time: each step handed over to a new HAProxy
        # (docs/architecture.md), and the old ones have finished their calls and gone.
        assert router.logs().count("haproxy replaced for a new CA") >= 3
        children = psutil.Process(router.process.pid).children
        wait_for(lambda: [c.name() for c in children()].count("haproxy") == 1, timeout=40)
    new_ca = state.current.cert
    for directory in dirs:
        assert x509.load_pem_x509_certificates((directory / CA_FILE).read_bytes()) == [new_ca]
        leaf = x509.load_pem_x509_certificate((directory / CERT_FILE).read_bytes())
        leaf.verify_directly_issued_by(new_ca)
    error = refused(  # a member still on an old-CA leaf gets nothing from a worker
        workers[0].address,
        ca=str(router_dir / CA_FILE),
        cert=str(old_leaf_dir / CERT_FILE),
        key=str(old_leaf_dir / KEY_FILE),
    )
    assert isinstance(error, Unavailable)


def lookup_price(item: str) -> float:
    return {"apple": 0.5, "pear": 0.75}[item]


def test_the_store_over_tls_and_hosted_calls_between_routers_over_mutual_tls(
    procs: ProcessFactory, pki: Pki, redis_server_factory: RedisFactory
) -> None:
    """Two routers share a Redis that speaks only TLS; the workers call router B, the
    application's tool is hosted on router A, so B forwards over the pool's mutual TLS (a
    session's tool and a pool-wide one, whose record B reads from the TLS store)."""
    server = redis_server_factory(tls=TlsFiles.from_dir(pki.pool_dir("redis")), appendonly=False)
    plain = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
    with pytest.raises(redis.ConnectionError):
        plain.ping()  # plaintext gets nothing from the store
    plain.close()

    router_b, workers, _ = start_tls_pool(procs, pki, 2, "--store", server.url)
    router_a = tls_router(procs, pki, workers, "--store", server.url)
    with Client(router_a.address, ca=pki.ca, timeout=20) as client:
        wait_for(lambda: len(_ready(client)) == 2, timeout=30)
        client.register_tool("lookup_price", lookup_price)
        with client.session() as session:
            session.set("v", 41)
            assert session.execute("counter_increment") == 1  # worker -> router B -> Redis
            assert session.execute("relay", tool="lookup_price", arguments={"item": "pear"}) == 0.75
            with Client(router_b.address, ca=pki.ca, timeout=20) as other:
                via_b = other.session(session.id, keep=True)
                assert via_b.get("v") == 41
                assert (
                    via_b.execute("relay", tool="lookup_price", arguments={"item": "apple"}) == 0.5
                )
                # A pool-wide tool on router A, for a session of a client of router B.
                client.register_tool("shared_price", lookup_price, pool_wide=True)
                with other.session() as theirs:
                    shared = theirs.execute(
                        "relay", tool="shared_price", arguments={"item": "pear"}
                    )
                    assert shared == 0.75
            with redis.Redis.from_url(server.url) as tls:
                assert any(session.id.encode() in key for key in tls.keys("*"))


def test_a_store_with_an_untrusted_certificate_is_refused(
    procs: ProcessFactory, pki: Pki, redis_server_factory: RedisFactory
) -> None:
    server = redis_server_factory(
        tls=TlsFiles.from_dir(pki.pool_dir("redis", pki.rogue, trusted=pki.rogue)), appendonly=False
    )
    wrong_ca = f"rediss://127.0.0.1:{server.port}/0?ssl_ca_certs={pki.ca}"
    pool = procs.serve("--store", wrong_ca)
    # Failed at once (a retry cannot change a certificate), and saying why.
    with Client(pool.address, timeout=60) as client, pytest.raises(FailedPrecondition) as info:
        client.session()
    assert "refused the TLS connection" in str(info.value)
    assert "CERTIFICATE_VERIFY_FAILED" in str(info.value)


def test_probes_use_a_plaintext_port_that_serves_health_and_nothing_else(
    procs: ProcessFactory, pki: Pki
) -> None:
    health_port = free_port()
    worker = procs.worker(
        "--pool-tls-dir", str(pki.pool_dir("probed")), "--health-port", str(health_port),
        worker_id="probed", wait=False,
    )  # fmt: skip
    health = f"127.0.0.1:{health_port}"
    wait_serving(health, timeout=30, process=worker.process)  # a plaintext grpc.health.v1 check
    assert health_status(worker.address) is None  # the worker's own port: TLS only
    with grpc.insecure_channel(health) as channel:
        ping = channel.unary_unary(method_path("Ping"))
        with pytest.raises(grpc.RpcError) as info:
            ping(pb.PingRequest().SerializeToString(), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
