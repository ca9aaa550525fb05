"""The Python router's half of a principal's share on the HAProxy data path (``share_sync``),
against a real HAProxy running the router's config: what it writes into HAProxy's table and
how its own calls wait. The two halves together, with workers and callers, are
``test_identity.py::test_a_principals_calls_over_its_share_wait_on_either_data_path``."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Iterator

import pytest

from snakepit.errors import DeadlineExceeded, ResourceExhausted
from snakepit.router.haproxy.config import HaproxySpec, build_config
from snakepit.router.haproxy.principal_shares import RUNNING_TABLE
from snakepit.router.haproxy.process import haproxy_binary, log_level
from snakepit.router.haproxy.runtime import RuntimeApi
from snakepit.router.haproxy.share_sync import HaproxyShares, principal_key
from tests.fixtures.processes import free_port

pytestmark = pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")


@pytest.fixture
def api() -> Iterator[RuntimeApi]:
    """A real HAProxy with the router's config and a share of 2, and its runtime API."""
    spec = HaproxySpec(
        host="127.0.0.1",
        port=free_port(),
        control_port=free_port(),
        admin_socket=f"abns@snakepit-shares-{free_port()}",
        calls_per_principal=2,
    )
    proc = subprocess.Popen(
        [str(haproxy_binary()), "-db", "-f", "/dev/stdin"],
        stdin=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdin is not None
    proc.stdin.write(build_config(spec).encode())
    proc.stdin.close()
    api = RuntimeApi(spec.admin_socket)

    async def up() -> bool:
        for _ in range(200):
            if await api.ping():
                return True
            await asyncio.sleep(0.02)
        return False

    try:
        assert asyncio.run(up())
        yield api
    finally:
        proc.kill()
        proc.wait()


async def _gpc0(api: RuntimeApi, principal: str) -> int:
    answer = await api.run(f"show table {RUNNING_TABLE} key {principal_key(principal)}")
    return int(answer.split("gpc0=")[1].split()[0]) if "gpc0=" in answer else 0


def test_the_python_halfs_calls_are_in_haproxys_table_and_wait_their_turn(
    api: RuntimeApi,
) -> None:
    async def run() -> None:
        shares = HaproxyShares(2, queue_size=1, queue_timeout=5.0, api=api)
        # Ten at once, one event loop: exactly two are let through (the count is read after
        # each await), the line takes one more and refuses the rest.
        first = [asyncio.ensure_future(shares.acquire("alice", None)) for _ in range(10)]
        await asyncio.sleep(0.3)
        done = [f for f in first if f.done()]
        through = [f for f in done if not f.exception()]
        refused = [f.exception() for f in done if f.exception()]
        assert len(through) == 2 and len(refused) == 7
        assert all(isinstance(e, ResourceExhausted) for e in refused)
        assert "principal 'alice' has 2 calls running and 1 waiting" in str(refused[0])
        assert await _gpc0(api, "alice") == 2  # HAProxy sees the Python half's two calls
        assert await shares.acquire("bob", None) is False  # another principal's own share
        (waiting,) = [f for f in first if not f.done()]
        shares.release("alice")
        assert await asyncio.wait_for(waiting, 1.0) is True  # it waited, then got the slot
        assert await _gpc0(api, "alice") == 2
        shares.release("alice")
        shares.release("alice")
        await asyncio.sleep(0.1)  # releases write in the background
        assert await _gpc0(api, "alice") == 0
        # A wait is bounded by the queue timeout, or the call's own deadline if sooner.
        for _ in range(2):
            await shares.acquire("carol", None)
        with pytest.raises(DeadlineExceeded, match=r"principal 'carol'.*max-calls-per-principal"):
            await shares.acquire("carol", 0.2)

    asyncio.run(run())


def test_a_caller_leaving_a_share_wait_is_not_an_error_in_the_router_log() -> None:
    """HAProxy calls that an ALERT (see ``log_level``); other alerts stay errors."""
    gone = "[ALERT]    (10389) : Lua function 'snakepit_share': aborting Lua processing on expired"
    assert log_level(gone + " timeout.") == logging.DEBUG
    assert log_level("[ALERT]    (1) : config : parsing [/dev/stdin:3]") == logging.ERROR
    assert log_level("[WARNING]  (1) : Server workers/s1 is UP") == logging.INFO
