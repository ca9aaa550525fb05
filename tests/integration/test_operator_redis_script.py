"""The managed store's start script, run for real: password required, AOF on, secret not in argv,
and only the store's ACL user (no CONFIG, FLUSHALL, ACL...) - the default user is off."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest
import redis

from snakepit.operator.builders.store import REDIS_SCRIPT, build_store_statefulset
from snakepit.operator.config import OperatorConfig
from snakepit.operator.spec import parse_pool
from tests.fixtures.processes import free_port

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def readiness_probe_passes(port: int, password: str) -> bool:
    """The StatefulSet's exec readiness probe, pointed at this server's port. The server here is
    plaintext (the script run without its TLS files), so is the pool: a default pool's probe
    speaks TLS."""
    spec = {"tls": {"enabled": False}}
    pool = parse_pool({"metadata": {"name": "p", "namespace": "n", "uid": "u"}, "spec": spec})
    sts = build_store_statefulset(pool, OperatorConfig())
    probe = sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    command = [*probe[:-1], probe[-1].replace("redis-cli ", f"redis-cli -p {port} ")]
    env = {"PATH": os.environ["PATH"], "REDISCLI_AUTH": password}
    return subprocess.run(command, env=env, capture_output=True, timeout=10).returncode == 0


def local_script(tmp_path: Path, port: int) -> str:
    """The pod's script, pointed at a temp dir and a loopback port."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    script = REDIS_SCRIPT
    for pod_value, local_value in (
        ("/tmp/", f"{tmp_path}/"),
        ("dir /data", f"dir {data}"),
        ("port 6379", f"port {port}"),
        ("-p 6379", f"-p {port}"),  # the TLS reload loop's redis-cli
        ("bind * -::*", "bind 127.0.0.1"),
    ):
        # A literal the script no longer has would leave the pod's value in place (a server on
        # 6379 of this machine, data in /data): fail here instead.
        assert pod_value in script, f"the Redis script no longer says {pod_value!r}"
        script = script.replace(pod_value, local_value)
    return script


def start_script(tmp_path: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["sh", "-c", local_script(tmp_path, port)],
        env={"PATH": os.environ["PATH"], **env},
        start_new_session=True,
    )


def wait_ping(client: redis.Redis) -> None:
    deadline = time.monotonic() + 10
    while True:
        try:
            assert client.ping()
            return
        except redis.ConnectionError:
            assert time.monotonic() < deadline, "redis did not start"
            time.sleep(0.05)


@pytest.mark.parametrize(
    "password",
    ['pw"\nenable-debug-command yes\nrename-command FLUSHALL ""\n#', "", "pw with space"],
    ids=["config-injection", "empty", "space"],
)
def test_a_password_that_could_inject_config_is_refused(tmp_path: Path, password: str) -> None:
    proc = subprocess.run(
        ["sh", "-c", local_script(tmp_path, free_port())],
        env={"PATH": os.environ["PATH"], "REDIS_PASSWORD": password},
        capture_output=True,
        timeout=10,
    )
    assert proc.returncode == 64
    assert b"refusing to start" in proc.stderr
    assert not (tmp_path / "redis.conf").exists()  # nothing was written, nothing started


async def test_a_full_store_refuses_writes_as_resource_exhausted(tmp_path: Path) -> None:
    from snakepit.errors import ResourceExhausted
    from snakepit.store.redis import RedisStore

    port = free_port()
    password = "pw-" + os.urandom(8).hex()
    server = start_script(tmp_path, port, REDIS_PASSWORD=password, REDIS_MAXMEMORY="4000000")
    store = RedisStore(f"redis://snakepit@127.0.0.1:{port}/0", password=password, retry_timeout=2)
    try:
        wait_ping(redis.Redis(port=port, username="snakepit", password=password, socket_timeout=2))
        assert "maxmemory-policy noeviction\n" in (tmp_path / "redis.conf").read_text()
        await store.create_session("s")
        with pytest.raises(ResourceExhausted, match="out of memory"):
            for i in range(100):
                await store.set_variable("s", f"v{i}", "x" * 200_000)
        written = {v.name for v in await store.list_variables("s")}
        assert 0 < len(written) < 100
        values = [(await store.get_variable("s", n)).value for n in written]
        assert values == ["x" * 200_000] * len(written)  # every write whole or absent
    finally:
        await store.close()
        os.killpg(server.pid, 9)
        server.wait(10)


def test_redis_script_requires_the_password_and_keeps_an_append_only_file(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    password = "pw-" + os.urandom(8).hex()
    server = start_script(tmp_path, port, REDIS_PASSWORD=password)
    try:
        authed = redis.Redis(port=port, username="snakepit", password=password, socket_timeout=2)
        wait_ping(authed)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).ping()
        with pytest.raises(redis.AuthenticationError):  # the default user is off, password or not
            redis.Redis(port=port, password=password, socket_timeout=2).ping()
        for command in (("CONFIG", "GET", "*"), ("FLUSHALL",), ("ACL", "LIST"), ("KEYS", "*")):
            with pytest.raises(redis.exceptions.NoPermissionError):
                authed.execute_command(*command)
        assert "appendonly yes\n" in (tmp_path / "redis.conf").read_text()
        authed.set("sp:k", "v")
        time.sleep(1.2)  # appendfsync everysec
        assert any(data.rglob("*.aof")), "no append-only file written"
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        assert readiness_probe_passes(port, password)
        assert not readiness_probe_passes(port, "wrong")
        config = tmp_path / "redis.conf"
        assert stat.S_IMODE(config.stat().st_mode) == 0o600
    finally:
        os.killpg(server.pid, 9)
        server.wait(10)


def aof_bytes(data: Path) -> bytes:
    return b"".join(f.read_bytes() for f in sorted(data.rglob("*.aof")))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_the_store_s_writes_survive_a_restart_of_the_acl_only_redis(
    tmp_path: Path, sig: signal.Signals
) -> None:
    """The operator's Redis (default user off, the store's ACL user) restarted on its AOF keeps
    every session and variable. Redis replays the scripts' writes as MULTI/EXEC and re-checks
    those against the ``default`` user's rules (store/acl.py): with a ``default`` that may run
    nothing, this found the session gone, as the e2e Redis-pod deletion did."""
    from snakepit.store.redis import RedisStore

    port = free_port()
    data = tmp_path / "data"
    password = "pw-" + os.urandom(8).hex()
    server = start_script(tmp_path, port, REDIS_PASSWORD=password)
    store = RedisStore(f"redis://snakepit@127.0.0.1:{port}/0", password=password, retry_timeout=20)
    written = {f"v{i}": i * 1.5 for i in range(20)}
    try:
        wait_ping(redis.Redis(port=port, username="snakepit", password=password, socket_timeout=2))
        await store.create_session("survivor")
        for name, value in written.items():
            await store.set_variable("survivor", name, value)
        deadline = time.monotonic() + 10
        while b"v19" not in aof_bytes(data):  # appendfsync everysec: on disk within ~1 s
            assert time.monotonic() < deadline, "the last write never reached the AOF"
            await asyncio.sleep(0.05)
        os.killpg(server.pid, sig)
        server.wait(10)
        server = start_script(tmp_path, port, REDIS_PASSWORD=password)
        got = await store.get_variables("survivor", list(written))
        assert {name: v.value for name, v in got.items()} == written
        await store.set_variable("survivor", "after", 1.0)  # and it still takes writes
        assert (await store.get_variable("survivor", "after")).value == 1.0
    finally:
        await store.close()
        os.killpg(server.pid, 9)
        server.wait(10)


def served_serial(port: int) -> int:
    import ssl

    from cryptography import x509

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as sock,
        context.wrap_socket(sock) as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return int(x509.load_der_x509_certificate(der).serial_number)


def test_with_tls_redis_refuses_plaintext_and_reloads_a_renewed_certificate(
    tmp_path: Path,
) -> None:
    """The pod's TLS mode: TLS only, and a renewed Secret (same paths, new contents, as the
    kubelet updates a Secret volume) is served without a restart, the key written first."""
    from cryptography import x509

    from snakepit.security.localca import LocalCA, write_file, write_issued

    tls_dir = tmp_path / "tls"
    tls_dir.mkdir()
    ca = LocalCA.generate()
    write_file(tls_dir / "ca.crt", ca.cert_pem)
    write_issued(ca.issue("redis", ["127.0.0.1"]), tls_dir / "tls.crt", tls_dir / "tls.key")
    port = free_port()
    password = "pw-" + os.urandom(8).hex()
    server = start_script(
        tmp_path, port, REDIS_PASSWORD=password,
        REDIS_TLS_DIR=str(tls_dir), REDIS_TLS_RELOAD_SECONDS="0.2",
    )  # fmt: skip
    url = f"rediss://snakepit@127.0.0.1:{port}/0?ssl_ca_certs={tls_dir / 'ca.crt'}"
    try:
        wait_ping(redis.Redis.from_url(url, password=password, socket_timeout=2))
        with pytest.raises(redis.ConnectionError):
            redis.Redis(port=port, password=password, socket_timeout=2).ping()
        first = served_serial(port)
        renewed = ca.issue("redis", ["127.0.0.1"])
        write_issued(renewed, tls_dir / "tls.crt", tls_dir / "tls.key")
        expected = x509.load_pem_x509_certificate(renewed.cert_pem).serial_number
        deadline = time.monotonic() + 15
        while served_serial(port) != expected:
            assert time.monotonic() < deadline, "the renewed certificate was never served"
            time.sleep(0.1)
        assert first != expected
        assert redis.Redis.from_url(url, password=password, socket_timeout=2).ping()
    finally:
        os.killpg(server.pid, 9)
        server.wait(10)
