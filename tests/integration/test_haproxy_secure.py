"""The HAProxy data path with TLS and authentication, on real processes: HAProxy terminates the
callers' TLS, talks mutual TLS to the workers, and forwards only the calls of callers the Python
router has verified, with a pool ticket in place of their credential.

Whether a call went through HAProxy is read from the pool status: on this data path its
``calls_total`` is what HAProxy sent to the workers, which calls the Python router serves itself
(first calls of an unknown credential, refusals) never add to.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import pytest

from snakepit import Client
from snakepit.client.sync import Session
from snakepit.errors import NotFound, Unauthenticated
from snakepit.protocol import method_path, pb, pb_grpc
from snakepit.protocol.messages import encode_request
from snakepit.router.haproxy.process import haproxy_binary
from snakepit.security.tickets import (
    TICKET_KEY,
    TicketIssuer,
    load_private_key,
    new_private_key,
    private_key_pem,
    public_key_pem,
)
from snakepit.store.service import WATCH_READY_KEY
from tests.fixtures.processes import ProcessFactory, free_port, wait_for
from tests.fixtures.prometheus import scrape, value
from tests.integration.test_tls import Pki, make_pki, served_serial, start_tls_pool

pytestmark = pytest.mark.skipif(haproxy_binary() is None, reason="haproxy is not installed")

ALICE = "alice-token-0123456789abcdef"
BOB = "bob-token-0123456789abcdef00"
ADAPTER = "tests.support.adapters:IdentityProbeAdapter"


class SecuredPool:
    """Two workers and a router on the HAProxy data path: TLS on the pool port, mutual TLS with
    the pool CA inside, static tokens, workers that take only pool tickets."""

    def __init__(
        self,
        procs: ProcessFactory,
        tmp: Path,
        monkeypatch: pytest.MonkeyPatch,
        *router_args: str,
    ) -> None:
        monkeypatch.setenv("SNAKEPIT_DATA_PATH", "haproxy")
        self.pki: Pki = make_pki(tmp)
        key = new_private_key()
        (tmp / "ticket.key").write_bytes(private_key_pem(key))
        (tmp / "ticket.pub").write_bytes(public_key_pem(key.public_key()))
        self.tokens = tmp / "tokens"
        self.tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
        self.router, self.workers, _ = start_tls_pool(
            procs, self.pki, 2,
            "--auth-tokens", str(self.tokens), "--ticket-key", str(tmp / "ticket.key"),
            *router_args,
            worker_args=("--ticket-public-key", str(tmp / "ticket.pub"), "--adapter", ADAPTER),
            token=ALICE, log_level="info",
        )  # fmt: skip
        self.address = self.router.address
        assert "data path: haproxy" in self.router.logs()

    def client(self, token: str, **kw: object) -> Client:
        return Client(self.address, ca=self.pki.ca, token=token, timeout=20, **kw)  # type: ignore[arg-type]

    def through_haproxy(self) -> int:
        """Calls HAProxy has sent to the workers so far."""
        with self.client(ALICE) as client:
            return int(client.status()["calls_total"])


@pytest.fixture
def pool(procs: ProcessFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SecuredPool:
    return SecuredPool(procs, tmp_path, monkeypatch)


def vouched(pool: SecuredPool, client: Client, timeout: float = 10.0) -> None:
    """Call until a call goes through HAProxy (the router has told HAProxy of this caller)."""
    deadline = time.monotonic() + timeout
    while True:
        before = pool.through_haproxy()
        assert client.execute("add", a=1, b=2) == 3
        if pool.through_haproxy() > before:
            return
        assert time.monotonic() < deadline, "no call of this caller ever went through HAProxy"
        time.sleep(0.1)


def test_tls_client_to_haproxy_to_mutual_tls_workers_with_a_token(pool: SecuredPool) -> None:
    first = pool.through_haproxy()
    with pool.client(BOB) as bob:
        seen = bob.execute("whoami")  # a credential HAProxy does not know: Python serves it
        assert seen["principal"] == "bob"
        assert pool.through_haproxy() == first
        vouched(pool, bob)
        before = pool.through_haproxy()
        for _ in range(20):
            seen = bob.execute("whoami")
            assert seen["principal"] == "bob"
            assert BOB not in repr(seen) and "Bearer" not in repr(seen)  # a ticket went instead
        assert pool.through_haproxy() - before == 20  # every one of them through HAProxy
        with bob.session() as session:  # worker -> router (the store), mutual TLS
            assert session.execute("counter_increment") == 1
            assert session.execute("counter_increment") == 2
            assert session.get("counter") == 2
        assert {w["worker_id"] for w in bob.status()["workers"] if w["ready"]} == {
            "worker-0",
            "worker-1",
        }


def test_another_principals_session_is_not_found_through_haproxy(pool: SecuredPool) -> None:
    with pool.client(ALICE) as alice, pool.client(BOB) as bob:
        vouched(pool, alice)
        vouched(pool, bob)
        session = alice.session(keep=True)
        session.set("secret", 42)
        assert session.execute("counter_increment") == 1
        before = pool.through_haproxy()
        theirs = Session(bob, session.id)
        with pytest.raises(NotFound):  # bob's own (missing) session, on the same worker
            theirs.execute("counter_increment")
        with pytest.raises(NotFound):
            theirs.get("secret")
        assert pool.through_haproxy() == before + 1  # the tool call went through HAProxy
        assert session.execute("counter_increment") == 2
        assert session.get("secret") == 42


def _raw_add(pool: SecuredPool, metadata: tuple[tuple[str, str], ...]) -> grpc.RpcError | bytes:
    """An ExecuteTool with exactly this metadata over TLS: its answer or its error."""
    credentials = grpc.ssl_channel_credentials(Path(pool.pki.ca).read_bytes())
    with grpc.secure_channel(pool.address, credentials) as channel:
        call = channel.unary_unary(method_path("ExecuteTool"))
        try:
            answer: bytes = call(
                encode_request("add", {"a": 1, "b": 2}), metadata=metadata, timeout=20
            )
        except grpc.RpcError as exc:
            return exc
    return answer


def test_missing_wrong_or_doubled_credentials_are_refused_by_the_router(
    pool: SecuredPool,
) -> None:
    with pool.client(ALICE) as alice:
        vouched(pool, alice)
    before = pool.through_haproxy()
    with pool.client("") as nobody, pytest.raises(Unauthenticated, match="requires a credential"):
        nobody.execute("add", a=1, b=2)
    with (
        pool.client("wrong-token-0123456789abcdef") as wrong,
        pytest.raises(Unauthenticated, match="not one this pool accepts") as info,
    ):
        wrong.execute("add", a=1, b=2)
    assert "wrong-token" not in str(info.value)
    # A valid token beside a ticket of the caller's own: the ticket is what the router checks
    # (as on the Python data path), and a forged one is refused, not passed on to a worker.
    forged = TicketIssuer(new_private_key()).issue("alice")
    error = _raw_add(pool, (("authorization", f"Bearer {ALICE}"), (TICKET_KEY, forged)))
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert "signature" in str(error.details())
    # Two authorization headers, a known one last: HAProxy does not guess which one counts, the
    # router decides (it takes the last one, as on the Python data path).
    error = _raw_add(pool, (("authorization", "x"), ("authorization", f"Bearer {ALICE}")))
    assert isinstance(error, bytes)
    error = _raw_add(pool, (("authorization", f"Bearer {ALICE}"), ("authorization", "x")))
    assert isinstance(error, grpc.RpcError)
    assert error.code() == grpc.StatusCode.UNAUTHENTICATED, error
    assert pool.through_haproxy() == before  # none of these reached a worker through HAProxy


def test_a_token_removed_from_the_file_is_refused_through_haproxy(pool: SecuredPool) -> None:
    with pool.client(BOB) as bob:
        vouched(pool, bob)
        pool.tokens.write_text(f"alice:{ALICE}\n")
        removed = time.monotonic()

        def refused() -> bool:
            try:
                bob.execute("add", a=1, b=2)
            except Unauthenticated:
                return True
            return False

        wait_for(refused, timeout=10)
        print(f"refused {time.monotonic() - removed:.2f}s after the token was removed")
        with pytest.raises(Unauthenticated):  # and stays refused
            bob.execute("add", a=1, b=2)
    with pool.client(ALICE) as alice:
        vouched(pool, alice)


def test_haproxy_takes_renewed_certificates_without_a_restart(pool: SecuredPool) -> None:
    """The pool port's certificate and the router's pool certificate renewed on disk reach
    HAProxy through its runtime API: new handshakes get the new certificate, HAProxy keeps
    its pid, and calls keep going through it."""
    pid = pool.router.logs().count("haproxy running")
    before = served_serial(pool.address)
    pool.pki.renew(pool.pki.root / "router")
    pool.pki.issue_public("server")
    wait_for(lambda: pool.router.logs().count("haproxy TLS file renewed") >= 2, timeout=10)
    assert served_serial(pool.address) != before
    with pool.client(ALICE) as alice:
        vouched(pool, alice)
        done = pool.through_haproxy()
        for _ in range(10):
            with alice.session() as session:
                assert session.execute("counter_increment") == 1
        assert pool.through_haproxy() >= done + 10
    assert pool.router.logs().count("haproxy running") == pid  # never restarted


def test_each_call_counts_once_in_the_router_metrics_whichever_path_carried_it(
    procs: ProcessFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """TLS, tokens and metrics, as in a router pod: a caller's first calls are served by the
    Python router (it verifies the token), the later ones by HAProxy (counted from its call
    log); the router's metrics count every call once, by tool and code."""
    port = free_port()
    pool = SecuredPool(procs, tmp_path, monkeypatch, "--metrics-port", str(port))
    adds = 0
    with pool.client(BOB) as bob:
        first = pool.through_haproxy()
        while pool.through_haproxy() == first:  # until the router has vouched for bob
            assert bob.execute("add", a=1, b=2) == 3
            adds += 1
            assert adds < 100, "no call of this caller ever went through HAProxy"
        for _ in range(20):
            assert bob.execute("whoami")["principal"] == "bob"
        with pytest.raises(NotFound):
            bob.execute("no_such_tool")
    assert pool.through_haproxy() - first == 1 + 20 + 1  # the last add, whoami, the unknown tool
    calls = "snakepit_router_calls_total"
    wait_for(lambda: value(scrape(port), calls, tool="no_such_tool", code="NOT_FOUND") == 1)
    samples = scrape(port)
    assert value(samples, calls, tool="add", code="OK") == adds
    assert value(samples, calls, tool="whoami", code="OK") == 20
    assert sum(v for (name, _), v in samples.items() if name == calls) == adds + 21


def test_haproxy_counts_watchers_per_caller_and_session(
    procs: ProcessFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With authentication a session id belongs to its caller (the store scopes it by
    principal), so HAProxy's watcher gate counts per credential and session id: alice's third
    watcher of her session "w" is refused by HAProxy before Python, bob's watcher of his own
    "w" is not counted with hers, and a caller without a credential learns nothing of anyone's
    count (the Python router refuses it UNAUTHENTICATED)."""
    pool = SecuredPool(procs, tmp_path, monkeypatch, "--max-watchers-per-session", "2")
    credentials = grpc.ssl_channel_credentials(Path(pool.pki.ca).read_bytes())

    def bearer(token: str) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {token}"),) if token else ()

    async def scenario() -> None:
        async with grpc.aio.secure_channel(pool.address, credentials) as channel:
            stub = pb_grpc.BridgeServiceStub(channel)
            on_w = pb.WatchVariablesRequest(session_id="w")
            for token in (ALICE, BOB):
                await stub.InitializeSession(
                    pb.InitializeSessionRequest(session_id="w"), metadata=bearer(token)
                )

            async def watch(token: str) -> grpc.aio.UnaryStreamCall:  # type: ignore[type-arg]
                call = stub.WatchVariables(on_w, metadata=bearer(token))
                await asyncio.wait_for(call.initial_metadata(), 20)
                return call

            alices = [await watch(ALICE) for _ in range(2)]
            third = await watch(ALICE)
            assert await third.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert (await third.details()).startswith("this session already has 2 watchers")
            bobs = await watch(BOB)
            nobody = await watch("")
            assert await nobody.code() == grpc.StatusCode.UNAUTHENTICATED
            # Callers that carry a pool ticket and no token (direct-mode clients, workers'
            # calls back) are told apart by their tickets, not counted as one.
            issuer = TicketIssuer(load_private_key(str(tmp_path / "ticket.key")))
            tickets = {p: ((TICKET_KEY, issuer.issue(p)),) for p in ("carol", "dave")}
            for ticket in tickets.values():
                await stub.InitializeSession(
                    pb.InitializeSessionRequest(session_id="w"), metadata=ticket
                )
            by_ticket = []
            for principal in ("carol", "carol", "dave"):  # the old key counted these as one
                call = stub.WatchVariables(on_w, metadata=tickets[principal])
                await asyncio.wait_for(call.initial_metadata(), 20)
                by_ticket.append(call)
            for call in (*alices, bobs, *by_ticket):
                assert (WATCH_READY_KEY, "1") in tuple(await call.initial_metadata() or ())
                call.cancel()

    asyncio.run(scenario())
