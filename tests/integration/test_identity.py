"""Identity on real processes: a router with --auth-tokens and workers that need pool tickets.

One pool per module (router + 2 workers as separate processes, the store through the router), so
the test can hold the pool's signing key and forge tickets: expired, for another pool, signed by
another key. Every refusal is checked for its status code and for a message that says what was
expected without echoing the credential.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import pytest

from snakepit import Client
from snakepit.client import hosted_call
from snakepit.client.sync import Session
from snakepit.errors import (
    AlreadyExists,
    DeadlineExceeded,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from snakepit.protocol import method_path, pb
from snakepit.protocol.messages import encode_request
from snakepit.router.haproxy.config import LARGE_BODY
from snakepit.security.tickets import (
    TICKET_KEY,
    TicketIssuer,
    new_private_key,
    private_key_pem,
    public_key_pem,
)
from snakepit.security.tls import POOL_NAME
from tests.fixtures.processes import ProcessFactory, child_env, start_pool, wait_for

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef00"
ROOT = "root-token-0123456789abcdef0"
CAROL = "carol-token-0123456789abcdef"
QUOTA = "quota-token-0123456789abcdef"
SESSIONS_PER_PRINCIPAL = 12
CALLS_PER_PRINCIPAL = 3  # of the pool's 8 slots (2 workers x 4)
AUDIENCE = "pool-a"
ADAPTER = "tests.support.adapters:IdentityProbeAdapter"


class Pool:
    def __init__(self, procs: ProcessFactory, tmp: Path) -> None:
        self.key = new_private_key()
        key_file = tmp / "ticket.key"
        key_file.write_bytes(private_key_pem(self.key))
        public_file = tmp / "ticket.pub"
        public_file.write_bytes(public_key_pem(self.key.public_key()))
        self.tokens = tmp / "tokens"
        self.tokens.write_text(
            f"# principals of the test pool\nalice:{ALICE}\nbob:{BOB}  # no direct mode\n"
            f"root:{ROOT}\nquota:{QUOTA}\n"
        )
        self.router, self.workers = start_pool(
            procs,
            2,
            "--auth-tokens", str(self.tokens),
            "--admin", "root",
            "--allow-direct", "alice",
            "--allow-pool-tools", "alice",
            "--ticket-key", str(key_file),
            "--ticket-audience", AUDIENCE,
            "--max-sessions-per-principal", str(SESSIONS_PER_PRINCIPAL),
            "--max-calls-per-principal", str(CALLS_PER_PRINCIPAL),
            adapter=ADAPTER,
            worker_args=("--ticket-public-key", str(public_file), "--ticket-audience", AUDIENCE),
            token=ROOT,
        )  # fmt: skip
        self.address = self.router.address

    def client(self, token: str = "", **kw: Any) -> Client:
        return Client(self.address, token=token, **kw)

    def ticket(self, principal: str, *, audience: str = AUDIENCE, lifetime: float = 60.0) -> str:
        return TicketIssuer(self.key, audience=audience).issue(principal, lifetime=lifetime)


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    tmp = tmp_path_factory.mktemp("identity")
    procs = ProcessFactory(tmp)
    try:
        yield Pool(procs, tmp)
    finally:
        procs.close()


def _raw(address: str, method: str, request: bytes, metadata: tuple[tuple[str, str], ...]) -> Any:
    with grpc.insecure_channel(address) as channel:
        return channel.unary_unary(method_path(method))(request, metadata=metadata, timeout=10)


def _refused(call: Any, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    assert caught.value.code() == code, caught.value
    return str(caught.value.details())


# Authentication at the router -------------------------------------------------------------
def test_each_token_is_its_own_principal_and_reaches_tools_only_as_a_name(pool: Pool) -> None:
    for token, name in ((ALICE, "alice"), (BOB, "bob"), (ROOT, "root")):
        with pool.client(token) as client, client.session() as session:
            seen = session.execute("whoami")
            assert seen["principal"] == name
            everything = repr(seen)
            assert token not in everything
            assert "Bearer" not in everything and "authorization" not in everything


def test_missing_wrong_and_malformed_credentials_are_unauthenticated(pool: Pool) -> None:
    with pool.client("") as client:
        with pytest.raises(Unauthenticated, match="Bearer <token>"):
            client.execute("add", a=1, b=2)
        with pytest.raises(Unauthenticated, match="Bearer <token>"):
            client.session()
    wrong = "not-a-token-of-this-pool-1234"
    with pool.client(wrong) as client:
        with pytest.raises(Unauthenticated, match="not one this pool accepts") as caught:
            client.execute("add", a=1, b=2)
        assert wrong not in str(caught.value)
        with pytest.raises(Unauthenticated):
            client.ping()
    details = _refused(
        lambda: _raw(
            pool.address,
            "Ping",
            pb.PingRequest().SerializeToString(),
            (("authorization", f"Basic {ALICE}"),),
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert "must be 'Bearer <token>'" in details and ALICE not in details


def test_health_stays_open_for_probes(pool: Pool) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(pool.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_token_env_and_cli_flag(pool: Pool) -> None:
    argv = [sys.executable, "-m", "snakepit", "call", "add", "a=1", "b=2", "--target", pool.address]
    ok = subprocess.run(argv, env=child_env(SNAKEPIT_TOKEN=ALICE), capture_output=True, timeout=60)
    assert ok.returncode == 0 and ok.stdout.strip() == b"3.0", ok.stderr
    flag = subprocess.run([*argv, "--token", BOB], env=child_env(), capture_output=True, timeout=60)
    assert flag.returncode == 0, flag.stderr
    refused = subprocess.run(argv, env=child_env(), capture_output=True, timeout=60)
    assert refused.returncode == 1 and b"UNAUTHENTICATED" in refused.stderr


def test_tokens_file_edits_apply_without_a_restart(pool: Pool) -> None:
    original = pool.tokens.read_text()
    try:
        pool.tokens.write_text(original + f"carol:{CAROL}\n")
        with pool.client(CAROL) as carol:
            wait_for(lambda: _works(carol), timeout=10)
        pool.tokens.write_text(original.replace(f"bob:{BOB}", ""))
        with pool.client(BOB) as bob:
            wait_for(lambda: not _works(bob), timeout=10)
            with pytest.raises(Unauthenticated):
                bob.execute("add", a=1, b=2)
    finally:
        pool.tokens.write_text(original)
    with pool.client(BOB) as bob:
        wait_for(lambda: _works(bob), timeout=10)


def _works(client: Client) -> bool:
    try:
        return bool(client.execute("add", a=1, b=2) == 3.0)
    except Unauthenticated:
        return False


# Tickets at the workers ---------------------------------------------------------------------
def _worker_call(pool: Pool, metadata: tuple[tuple[str, str], ...]) -> Any:
    request = encode_request("whoami", {}, "")
    return _raw(pool.workers[0].address, "ExecuteTool", request, metadata)


def test_workers_refuse_calls_without_a_valid_ticket(pool: Pool) -> None:
    details = _refused(lambda: _worker_call(pool, ()), grpc.StatusCode.UNAUTHENTICATED)
    assert "pool ticket" in details
    # A caller's own token is no ticket: workers never accept (or see) bearer tokens.
    _refused(
        lambda: _worker_call(pool, (("authorization", f"Bearer {ALICE}"),)),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    cases = {
        "expired": (pool.ticket("alice", lifetime=-120), "expired"),
        "wrong audience": (pool.ticket("alice", audience="pool-b"), "audience 'pool-b'"),
        "another key": (
            TicketIssuer(new_private_key(), audience=AUDIENCE).issue("alice"),
            "signature does not verify",
        ),
        "garbage": ("v1.e30.x", "malformed"),
    }
    for name, (ticket, expected) in cases.items():
        details = _refused(
            lambda t=ticket: _worker_call(pool, ((TICKET_KEY, t),)),  # type: ignore[misc]
            grpc.StatusCode.UNAUTHENTICATED,
        )
        assert expected in details, (name, details)
    valid = pool.ticket("alice")
    reply = pb.ExecuteToolResponse.FromString(_worker_call(pool, ((TICKET_KEY, valid),)))
    assert reply.worker_id == "worker-0"  # the call ran, on alice's behalf


def test_router_refuses_forged_tickets_too(pool: Pool) -> None:
    forged = TicketIssuer(new_private_key(), audience=AUDIENCE).issue("root")
    details = _refused(
        lambda: _raw(
            pool.address,
            "ListSessions",
            pb.ListSessionsRequest().SerializeToString(),
            ((TICKET_KEY, forged),),
        ),
        grpc.StatusCode.UNAUTHENTICATED,
    )
    assert "signature" in details


# Sessions belong to principals --------------------------------------------------------------
def test_another_principals_session_is_not_found(pool: Pool) -> None:
    with pool.client(ALICE) as alice, pool.client(BOB) as bob:
        session = alice.session(keep=True)
        session.set("secret", 42)
        session.execute("counter_increment")
        theirs = Session(bob, session.id)
        with pytest.raises(NotFound):
            theirs.get("secret")
        with pytest.raises(NotFound):
            theirs.set("secret", 0)
        with pytest.raises(NotFound):
            theirs.info()
        with pytest.raises(NotFound):
            theirs.list()
        with pytest.raises(NotFound):  # a tool call in it reaches bob's own (missing) session
            theirs.execute("counter_increment")
        with pytest.raises(NotFound):
            next(iter(theirs.watch(timeout=5)))
        theirs.close()  # cleanup of a session bob does not have: nothing happens to alice's
        assert session.get("secret") == 42
        assert session.get("counter") == 1
        assert session.close() is True


def test_one_principal_holding_its_maximum_of_sessions_blocks_nobody_else(pool: Pool) -> None:
    """Issue 13's sessions per principal: the (SESSIONS_PER_PRINCIPAL + 1)th live session of one
    caller is RESOURCE_EXHAUSTED naming the limit; its sessions keep working, another principal
    still opens sessions, and a closed session frees a slot."""
    with pool.client(QUOTA) as hog, pool.client(BOB) as bob:
        held = [hog.session(keep=True) for _ in range(SESSIONS_PER_PRINCIPAL)]
        with pytest.raises(ResourceExhausted, match="max-sessions-per-principal 12") as caught:
            hog.session(keep=True)
        assert "'quota'" in str(caught.value)
        held[0].set("x", 1)
        assert held[0].execute("add", a=1, b=2) == 3
        with bob.session() as other:
            other.set("y", 2)
            assert other.get("y") == 2
        assert held.pop().close() is True
        held.append(hog.session(keep=True))
        for session in held:
            session.close()


def test_a_principal_sending_more_calls_than_its_share_waits_and_others_pass(pool: Pool) -> None:
    """Issue 13's slot hogging: a caller with 8 long calls (as many as the pool has slots) runs
    CALLS_PER_PRINCIPAL of them while the rest wait in its own line; another principal's calls
    run meanwhile, and every one of the hog's calls still completes."""
    hog_calls = 8
    with (
        pool.client(QUOTA) as hog,
        pool.client(BOB) as bob,
        ThreadPoolExecutor(hog_calls) as threads,
    ):
        running = [threads.submit(hog.execute, "sleep", seconds=3.0) for _ in range(hog_calls)]
        wait_for(lambda: _calls_in_flight(pool) >= CALLS_PER_PRINCIPAL, timeout=10)
        for n in range(10):  # each would wait for a hog's call to end if the hog held all slots
            assert bob.execute("add", a=n, b=1) == n + 1
        assert not all(f.done() for f in running)
        assert _calls_in_flight(pool) <= CALLS_PER_PRINCIPAL
        assert [f.result(timeout=30) for f in running] == [3.0] * hog_calls


def _calls_in_flight(pool: Pool) -> int:
    with pool.client(ROOT) as root:
        return int(root.status().get("in_flight", 0))


def test_the_same_chosen_id_is_a_different_session_per_principal(pool: Pool) -> None:
    with (
        pool.client(ALICE) as alice,
        pool.client(BOB) as bob,
        alice.session("shared-name") as mine,
        bob.session("shared-name") as yours,
    ):
        assert mine.id == yours.id == "shared-name"
        mine.set("owner", "alice")
        yours.set("owner", "bob")
        assert mine.get("owner") == "alice"
        assert yours.get("owner") == "bob"
        assert mine.execute("whoami")["session_id"] == "shared-name"


def _list_sessions(pool: Pool, token: str) -> set[str]:
    raw = _raw(
        pool.address,
        "ListSessions",
        pb.ListSessionsRequest().SerializeToString(),
        (("authorization", f"Bearer {token}"),),
    )
    return {s.session_id for s in pb.ListSessionsResponse.FromString(raw).sessions}


def test_list_sessions_shows_own_sessions_and_admins_see_all(pool: Pool) -> None:
    with (
        pool.client(ALICE) as alice,
        pool.client(BOB) as bob,
        alice.session() as a,
        bob.session() as b,
    ):
        assert a.id in _list_sessions(pool, ALICE)
        assert b.id not in _list_sessions(pool, ALICE)
        assert b.id in _list_sessions(pool, BOB)
        everything = _list_sessions(pool, ROOT)
        assert {f"alice/{a.id}", f"bob/{b.id}"} <= everything


# Calls back from tools carry the ticket of the call they serve --------------------------------
def test_tools_calling_tools_and_the_store_act_for_the_caller(pool: Pool) -> None:
    with pool.client(ALICE) as alice, alice.session() as session:
        assert session.execute("relay", tool="whoami", arguments={})["principal"] == "alice"
        assert session.execute("counter_increment", by=5) == 5
        assert session.get("counter") == 5

        def lookup_price(item: str) -> float:
            return {"fig": 1.25}[item]

        handle = alice.register_tool("lookup_price", lookup_price)
        try:
            assert session.execute("quote", items={"fig": 2})["total"] == 2.5
        finally:
            handle.unregister()


def test_a_hosts_session_that_ends_is_named_to_it_by_its_own_id(pool: Pool) -> None:
    """The router sweeps hosted sessions by store key (alice/ID); the host hears its own ID."""
    with pool.client(ALICE) as alice, pool.client(ALICE) as elsewhere:
        alice.register_tool("lookup_price", lambda item: 1.0)
        session = alice.session(keep=True)
        assert session.execute("quote", items={"fig": 2})["total"] == 2.0
        assert alice._host is not None
        served = alice._host.host.sessions
        assert session.id in served
        assert Session(elsewhere, session.id).close()  # deleted by another client of alice's
        wait_for(lambda: session.id not in served, timeout=20, interval=0.2)


def test_a_host_serves_only_its_own_principals_sessions(pool: Pool) -> None:
    with pool.client(ALICE) as alice, pool.client(BOB) as bob, alice.session() as session:
        theirs = Session(bob, session.id)
        bob._serve_sessions([session.id], [])  # bob claims to host for alice's session id
        handle = bob.register_tool("lookup_price", lambda item: 0.0)
        try:
            with pytest.raises(NotFound, match="no tool 'lookup_price'"):
                session.execute("quote", items={"fig": 2})
            assert theirs.id == session.id
            # Claimed again on the open stream: refused as a session that does not exist.
            with pytest.raises(NotFound, match=f"no session '{session.id}' of this caller"):
                bob._serve_sessions([session.id], [])
            assert bob._host is not None and session.id not in bob._host.host.sessions
        finally:
            handle.unregister()


# Pool-wide hosted tools ------------------------------------------------------------------------
def _on_whose_behalf() -> dict[str, str]:
    call = hosted_call()
    assert call is not None
    return {"principal": call.principal, "session_id": call.session_id}


def test_a_pool_wide_tool_serves_every_principals_sessions_and_sees_no_credential(
    pool: Pool,
) -> None:
    with pool.client(ALICE) as alice:
        alice.register_tool("on_whose_behalf", _on_whose_behalf, pool_wide=True)
        assert alice._host is not None
        host = alice._host.host
        seen: list[bytes] = []
        serve = host._serve

        async def recording(call: pb.HostCall) -> None:  # what crosses to the host, as bytes
            seen.append(call.SerializeToString())
            await serve(call)

        host._serve = recording  # type: ignore[method-assign]
        for token, name in ((BOB, "bob"), (ROOT, "root"), (ALICE, "alice")):
            with pool.client(token) as caller, caller.session() as session:
                got = session.execute("relay", tool="on_whose_behalf", arguments={})
                assert got == {"principal": name, "session_id": session.id}
                listed = {t.name: t for t in session.list_tools()}
                assert listed["on_whose_behalf"].pool_wide
        with pool.client(BOB) as bob:  # a call without a session
            assert bob.execute("relay", tool="on_whose_behalf", arguments={}) == {
                "principal": "bob",
                "session_id": "",
            }
        assert len(seen) == 4
        for raw in seen:
            for secret in (ALICE, BOB, ROOT, TICKET_KEY, "authorization", "Bearer"):
                assert secret.encode() not in raw


def test_only_allowed_principals_host_pool_wide_tools_and_a_name_has_one_principal(
    pool: Pool,
) -> None:
    with pool.client(BOB) as bob, pytest.raises(PermissionDenied) as refused:
        bob.register_tool("catalog", lambda: "bob", pool_wide=True)
    assert "principal 'bob' may not host tool 'catalog' for the whole pool" in str(refused.value)
    assert "--allow-pool-tools" in str(refused.value)
    assert BOB not in str(refused.value)

    with pool.client(ALICE) as alice, pool.client(ALICE) as replica, pool.client(ROOT) as root:
        alice.register_tool("catalog", lambda: "alice", pool_wide=True)
        replica.register_tool("catalog", lambda: "alice", pool_wide=True)  # same principal
        with pytest.raises(AlreadyExists, match="hosted for the whole pool by another principal"):
            root.register_tool("catalog", lambda: "root", pool_wide=True)  # admins are allowed
        with pool.client(BOB) as bob, bob.session() as own:
            assert own.execute("relay", tool="catalog", arguments={}) == "alice"
            bob.register_tool("catalog", lambda: "bob")  # bob's own sessions: shadows it there
            assert own.execute("relay", tool="catalog", arguments={}) == "bob"
            with pool.client(ROOT) as other, other.session() as theirs:
                assert theirs.execute("relay", tool="catalog", arguments={}) == "alice"


# Routing table and direct mode ----------------------------------------------------------------
def test_routing_table_only_for_allowed_principals(pool: Pool) -> None:
    with pool.client(BOB) as bob, pytest.raises(PermissionDenied, match="may not use direct mode"):
        bob.routing_table()
    with pool.client(BOB, direct=True) as bob, pytest.raises(PermissionDenied):
        bob.execute("add", a=1, b=2)
    with pool.client(ALICE) as alice:
        assert len(alice.routing_table()["workers"]) == 2


def test_pool_status_details_only_for_admins_and_direct_principals(pool: Pool) -> None:
    """The security review's finding: any caller read every worker's address and the pool's
    session count from GetPoolStatus. Others now see the load, not the map."""
    with pool.client(BOB) as bob, pool.client(ROOT) as root, pool.client(ALICE) as alice:
        theirs, full, direct = bob.status(), root.status(), alice.status()
    assert len(theirs["workers"]) == 2 and theirs["workers_ready"] == 2
    assert all(not w.get("address") for w in theirs["workers"])
    assert not theirs.get("sessions") and not theirs.get("store")
    assert all(w["address"] for w in full["workers"]) and full["store"]
    assert all(w["address"] for w in direct["workers"])


def test_direct_mode_calls_workers_with_a_ticket(pool: Pool) -> None:
    with pool.client(ROOT) as admin:
        before = admin.status()["calls_total"]
    with pool.client(ALICE, direct=True) as alice, alice.session() as session:
        for _ in range(5):
            assert session.execute("whoami")["principal"] == "alice"
        assert session.execute("counter_increment") == 1
        assert alice._routes is not None and alice._routes.credentials
    with pool.client(ROOT) as admin:
        assert admin.status()["calls_total"] == before  # none went through the router


def test_a_principals_calls_over_its_share_wait_on_either_data_path(
    procs: ProcessFactory, tmp_path: Path, data_path: str
) -> None:
    """--max-calls-per-principal on both data paths (HAProxy counts a principal's calls in stick
    tables and holds the excess in a Lua action, router/haproxy/principal_shares.py): a hog's
    calls beyond its share wait in its own line and then run; one beyond the line is refused at
    once; one that waits out the queue timeout is refused; another principal's calls pass
    meanwhile, and the hog never runs more than its share."""
    share, line, queue_timeout, hold = 2, 2, 6.0, 4.5
    tokens = tmp_path / "tokens"
    tokens.write_text(f"quota:{QUOTA}\nbob:{BOB}\nroot:{ROOT}\n")
    pool = procs.serve(
        "--auth-tokens", str(tokens), "--admin", "root", "--adapter", ADAPTER,
        "--max-calls-per-principal", str(share), "--queue-size", str(line),
        "--queue-timeout", str(queue_timeout),
    )  # fmt: skip
    assert f"data path: {data_path}" in pool.logs()
    with (
        Client(pool.address, token=QUOTA, timeout=30) as hog,
        Client(pool.address, token=BOB) as bob,
        Client(pool.address, token=ROOT) as root,
        ThreadPoolExecutor(share + line + 1) as threads,
    ):

        def in_flight() -> int:
            return int(root.status().get("in_flight", 0))

        def carried() -> bool:  # on HAProxy: once the router has vouched for the hog
            before = root.status()["calls_total"]
            return bool(hog.execute("add", a=1, b=2) == 3 and root.status()["calls_total"] > before)

        wait_for(carried, timeout=10, interval=0.1)
        # One call more than the share and the line hold: whichever comes last is refused.
        calls = [
            threads.submit(hog.execute, "sleep", seconds=hold) for _ in range(share + line + 1)
        ]
        wait_for(lambda: any(f.done() for f in calls), timeout=10)
        (refused,) = [f for f in calls if f.done()]
        held = [f for f in calls if f is not refused]
        assert isinstance(refused.exception(), ResourceExhausted), refused.exception()
        message = str(refused.exception())
        assert f"(--max-calls-per-principal {share}, --queue-size {line})" in message
        # HAProxy's own answer (it does not know the principal's name), not the Python router's
        assert message.startswith("this principal") == (data_path == "haproxy")
        for n in range(5):  # each would wait for a hog's call to end if the hog held all slots
            assert bob.execute("add", a=n, b=1) == n + 1
        assert in_flight() <= share
        assert not all(f.done() for f in held)
        assert [f.result(timeout=30) for f in held] == [hold] * (share + line)

        # The line's wait is bounded by the queue timeout.
        long = [
            threads.submit(hog.execute, "sleep", seconds=queue_timeout + 2) for _ in range(share)
        ]
        wait_for(lambda: in_flight() >= share, timeout=10)
        with pytest.raises(DeadlineExceeded, match="max-calls-per-principal") as waited:
            hog.execute("add", a=1, b=2)
        assert "this principal's" in str(waited.value) or data_path == "python"
        assert bob.execute("add", a=1, b=1) == 2
        assert [f.result(timeout=30) for f in long] == [queue_timeout + 2] * share
        assert hog.execute("add", a=2, b=2) == 4  # the hog's share is whole again

        # A call padded past HAProxy's LARGE_BODY goes through the Python router: HAProxy's
        # calls and the Python router's count in one share (router/haproxy/share_sync.py),
        # whichever half holds it.
        pad = "x" * (LARGE_BODY + 1024)
        for holders, latecomer in (
            (
                lambda: hog.execute("sleep", seconds=2.0),
                lambda: hog.execute("hold", seconds=0.1, padding=pad),
            ),
            (
                lambda: hog.execute("hold", seconds=2.0, padding=pad),
                lambda: hog.execute("hold", seconds=0.1),
            ),
        ):
            holding = [threads.submit(holders) for _ in range(share)]
            wait_for(lambda: in_flight() >= share, timeout=10)
            late = threads.submit(latecomer)
            time.sleep(0.8)
            assert not late.done(), "a call ran beyond its principal's share"
            assert in_flight() <= share
            assert late.result(timeout=30) == 0.1
            assert [f.result(timeout=30) for f in holding] == [2.0] * share


def _haproxy_tables(pool_pid: int) -> str:
    """``show table`` from the HAProxy of the pool whose ``snakepit serve`` is ``pool_pid``,
    through its runtime API (an abstract socket named after the router's process)."""
    import asyncio
    import re

    import psutil

    from snakepit.router.haproxy.runtime import RuntimeApi

    pids = {pool_pid, *(c.pid for c in psutil.Process(pool_pid).children(recursive=True))}
    sockets = re.findall(r"@(snakepit-haproxy-(\d+)-[0-9a-f]+)", Path("/proc/net/unix").read_text())
    (admin,) = {name for name, pid in sockets if int(pid) in pids}
    tables = asyncio.run(RuntimeApi(f"abns@{admin}").run("show table"))
    assert "table: watchers" in tables, tables  # the pool's HAProxy indeed
    return tables


def test_a_strict_pool_behind_haproxy_keeps_each_principals_share_in_the_python_router(
    procs: ProcessFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With strict affinity HAProxy carries no tool call (``tools_via_router``), so the Python
    router's own count is the whole share: HAProxy keeps no share table, and the router makes
    no runtime-API round trip per call to read HAProxy's count, which was always 0 there
    (stop 31's note). The share still holds: one call runs, one waits, one is refused with
    the Python router's words."""
    monkeypatch.setenv("SNAKEPIT_DATA_PATH", "haproxy")
    tokens = tmp_path / "tokens"
    tokens.write_text(f"quota:{QUOTA}\nbob:{BOB}\nroot:{ROOT}\n")
    pool = procs.serve(
        "--auth-tokens", str(tokens), "--admin", "root", "--adapter", ADAPTER,
        "--affinity", "strict", "--max-calls-per-principal", "1", "--queue-size", "1",
        "--queue-timeout", "10",
    )  # fmt: skip
    assert "data path: haproxy" in pool.logs()
    assert "table: shares" not in _haproxy_tables(pool.pid)
    with (
        Client(pool.address, token=QUOTA, timeout=30) as hog,
        Client(pool.address, token=BOB) as bob,
        Client(pool.address, token=ROOT) as root,
        ThreadPoolExecutor(3) as threads,
    ):
        calls = [threads.submit(hog.execute, "sleep", seconds=2.0) for _ in range(3)]
        wait_for(lambda: any(f.done() for f in calls), timeout=10)
        (refused,) = [f for f in calls if f.done()]
        message = str(refused.exception())
        assert isinstance(refused.exception(), ResourceExhausted), message
        assert "(--max-calls-per-principal 1, --queue-size 1)" in message
        assert not message.startswith("this principal")  # not HAProxy's refusal
        assert bob.execute("add", a=1, b=1) == 2
        assert int(root.status().get("in_flight", 0)) <= 1
        assert [f.result(timeout=30) for f in calls if f is not refused] == [2.0, 2.0]


def test_tls_and_tokens_together_every_hop(
    procs: ProcessFactory, tmp_path: Path, data_path: str
) -> None:
    """serve with mutual TLS and tokens: the token is checked over TLS, tickets ride the pool's
    mutual-TLS hops (worker -> router for the store and ctx.call_tool), and direct mode needs
    both a client certificate the workers trust and a ticket. On both data paths (HAProxy:
    client certificates checked by HAProxy, the token by the router, then a ticket from
    HAProxy)."""
    generated = tmp_path / "tls"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    pool = procs.serve(
        "--tls-generate", str(generated), "--tls-client-ca", str(generated / "ca.pem"),
        "--auth-tokens", str(tokens), "--allow-direct", "alice", "--adapter", ADAPTER,
    )  # fmt: skip
    assert f"data path: {data_path}" in pool.logs()
    mtls = {
        "ca": str(generated / "ca.pem"),
        "cert": str(generated / "client.pem"),
        "key": str(generated / "client-key.pem"),
    }
    with Client(pool.address, timeout=20, token=ALICE, **mtls) as alice:
        with alice.session() as session:
            assert session.execute("counter_increment") == 1
            assert session.execute("relay", tool="whoami", arguments={})["principal"] == "alice"
            with (
                Client(pool.address, timeout=20, token=BOB, **mtls) as bob,
                pytest.raises(NotFound),
            ):
                Session(bob, session.id).get("counter")
        routed = alice.status()["calls_total"]
    with (
        Client(pool.address, timeout=20, token="", **mtls) as nobody,
        pytest.raises(Unauthenticated),
    ):
        nobody.execute("add", a=1, b=2)
    with Client(pool.address, timeout=20, token=ALICE, direct=True, **mtls) as direct:
        assert [direct.execute("whoami")["principal"] for _ in range(3)] == ["alice"] * 3
    with Client(pool.address, timeout=20, token=ALICE, **mtls) as alice:
        assert alice.status()["calls_total"] == routed  # the direct calls skipped the router


def test_direct_mode_with_a_token_and_the_pool_ca_needs_no_client_certificate(
    procs: ProcessFactory, tmp_path: Path
) -> None:
    """What a pod of a default (secure) Kubernetes pool has: a token and the pool CA, no client
    certificate. Workers with tickets serve TLS without asking for one: a call with a valid
    ticket runs (direct mode), one without gets UNAUTHENTICATED saying a ticket is needed, and a
    plaintext caller gets nothing; routed calls go on as before (docs/security.md, "Direct mode
    under the defaults")."""
    generated = tmp_path / "tls"
    tokens = tmp_path / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    pool = procs.serve(
        "--tls-generate", str(generated), "--workers", "2",
        "--auth-tokens", str(tokens), "--allow-direct", "alice", "--adapter", ADAPTER,
    )  # fmt: skip
    ca = str(generated / "ca.pem")
    with Client(pool.address, timeout=20, token=ALICE, ca=ca) as alice:
        routed = alice.status()["calls_total"]
        workers = [w["address"] for w in alice.routing_table()["workers"]]
    assert len(workers) == 2
    with Client(pool.address, timeout=20, token=ALICE, ca=ca, direct=True) as direct:
        with direct.session() as session:
            assert [session.execute("whoami")["principal"] for _ in range(3)] == ["alice"] * 3
            assert session.execute("counter_increment") == 1
        assert list(direct.stream("count", n=3)) == [0, 1, 2]
    with Client(pool.address, timeout=20, token=ALICE, ca=ca) as alice:
        assert alice.status()["calls_total"] == routed  # the direct calls skipped the router
    # A TLS caller with neither a client certificate nor a ticket: refused, saying what to send.
    credentials = grpc.ssl_channel_credentials(Path(ca).read_bytes())
    name = (("grpc.ssl_target_name_override", POOL_NAME),)
    request = encode_request("whoami", {}, "")
    forged = TicketIssuer(new_private_key(), audience=AUDIENCE).issue("alice")
    for address in workers:
        with grpc.secure_channel(address, credentials, options=name) as channel:
            execute = partial(channel.unary_unary(method_path("ExecuteTool")), request)
            details = _refused(partial(execute, timeout=10), grpc.StatusCode.UNAUTHENTICATED)
            assert "pool ticket" in details and "direct" in details, details
            with_forged = partial(execute, timeout=10, metadata=((TICKET_KEY, forged),))
            details = _refused(with_forged, grpc.StatusCode.UNAUTHENTICATED)
            assert "signature does not verify" in details or "audience" in details, details
            stream = channel.unary_stream(method_path("ExecuteStreamingTool"))
            counting = partial(stream, encode_request("count", {"n": 2}, ""), timeout=10)
            _refused(lambda: list(counting()), grpc.StatusCode.UNAUTHENTICATED)  # noqa: B023
        # A bearer token alone is no ticket, and a plaintext caller gets no call at all.
        bearer = (("authorization", f"Bearer {ALICE}"),)
        _refused(
            partial(_raw, address, "ExecuteTool", request, bearer), grpc.StatusCode.UNAVAILABLE
        )
    # bob may not use direct mode: no routing table, so no ticket to reach a worker with.
    with (
        Client(pool.address, timeout=20, token=BOB, ca=ca, direct=True) as bob,
        pytest.raises(PermissionDenied),
    ):
        bob.routing_table()
