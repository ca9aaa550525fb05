"""The managed store's start script, run for real: password required, AOF on, secret not in argv."""

from __future__ import annotations

import os
import shutil
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

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def readiness_probe_passes(port: int, password: str) -> bool:
    """The StatefulSet's exec readiness probe, pointed at this server's port."""
    pool = parse_pool({"metadata": {"name": "p", "namespace": "n", "uid": "u"}, "spec": {}})
    sts = build_store_statefulset(pool, OperatorConfig())
    probe = sts["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["exec"]["command"]
    command = [*probe[:-1], probe[-1].replace("redis-cli ", f"redis-cli -p {port} ")]
    env = {"PATH": os.environ["PATH"], "REDISCLI_AUTH": password}
    return subprocess.run(command, env=env, capture_output=True, timeout=10).returncode == 0


def test_redis_script_requires_the_password_and_keeps_an_append_only_file(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    data.mkdir()
    script = (
        REDIS_SCRIPT.replace("/tmp/", f"{tmp_path}/")
        .replace("dir /data", f"dir {data}")
        .replace("port 6379", f"port {port}")
        .replace("bind * -::*", "bind 127.0.0.1")
    )
    password = "pw-" + os.urandom(8).hex()
    env = {"PATH": os.environ["PATH"], "REDIS_PASSWORD": password}
    server = subprocess.Popen(["sh", "-c", script], env=env, start_new_session=True)
    try:
        authed = redis.Redis(port=port, password=password, socket_timeout=2)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert authed.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "redis did not start"
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=2).ping()
        assert authed.config_get("appendonly") == {"appendonly": "yes"}
        authed.set("k", "v")
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
