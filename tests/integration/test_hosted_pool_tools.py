"""Pool-wide caller-hosted tools over real processes (auth off; identity: test_identity.py).

A host registers with ``pool_wide=True``; every session's tool calls, calls without a session
and every ``ListTools`` then see it. With auth off everyone is the principal ``anonymous``, whom
the pool allows (as it allows everything), so every host of one name is one principal's replica.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest
import redis.asyncio as aioredis

from snakepit import Client
from snakepit.client import hosted_call
from snakepit.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from snakepit.protocol import pb
from snakepit.router.host_directory import HostDirectory, PoolToolEntry
from snakepit.router.hosting import spec_signature
from tests.fixtures.processes import ProcessFactory, start_pool, wait_ready
from tests.fixtures.redis import RedisServer
from tests.support import host_app


def lookup_price(item: str) -> dict[str, object]:
    call = hosted_call()
    assert call is not None
    return {"price": {"apple": 0.5, "pear": 0.75}[item], "session": call.session_id}


def relay(target: Client | object, tool: str, **arguments: object) -> object:
    return target.execute("relay", tool=tool, arguments=arguments)  # type: ignore[attr-defined]


def test_a_pool_wide_tool_serves_every_session_and_calls_without_one(
    procs: ProcessFactory,
) -> None:
    router, _ = start_pool(procs, 2)
    with (
        Client(router.address) as host,
        Client(router.address) as app,
        Client(router.address) as other,
    ):
        host.register_tool("lookup_price", lookup_price, description="Unit price", pool_wide=True)
        with app.session() as mine, other.session() as theirs:
            # Sessions of clients that host nothing reach it; the host is told whose session.
            assert relay(mine, "lookup_price", item="apple") == {"price": 0.5, "session": mine.id}
            assert relay(theirs, "lookup_price", item="pear") == {
                "price": 0.75,
                "session": theirs.id,
            }
            assert relay(other, "lookup_price", item="pear") == {"price": 0.75, "session": ""}
            for listing in (mine.list_tools(), app.list_tools()):
                listed = {t.name: t for t in listing}
                assert listed["lookup_price"].caller_hosted and listed["lookup_price"].pool_wide
                assert listed["lookup_price"].description == "Unit price"
                assert not listed["add"].pool_wide


def test_a_sessions_own_tool_shadows_the_pool_wide_one_there_only(procs: ProcessFactory) -> None:
    router, _ = start_pool(procs, 2)
    with Client(router.address) as shared, Client(router.address) as app:
        shared.register_tool("whose", lambda: "pool", pool_wide=True)
        with app.session() as before:
            assert relay(before, "whose") == "pool"
            app.register_tool("whose", lambda: "app")  # the app's own sessions: its own tool
            assert relay(before, "whose") == "app"
            listed = {t.name: t for t in before.list_tools()}
            assert listed["whose"].caller_hosted and not listed["whose"].pool_wide
            with Client(router.address) as carol, carol.session() as elsewhere:
                assert relay(elsewhere, "whose") == "pool"
                assert {t.name: t for t in elsewhere.list_tools()}["whose"].pool_wide


def test_hosts_of_one_pool_wide_name_share_its_calls_and_others_are_refused(
    procs: ProcessFactory,
) -> None:
    """Two replicas of one application host one name: calls go to both, and to the one left
    when the other goes. A host taking other parameters, or a worker tool's name, is refused."""
    router, _ = start_pool(procs, 2)
    with (
        Client(router.address) as one,
        Client(router.address) as two,
        Client(router.address) as caller,
        caller.session() as session,
    ):
        one.register_tool("replica", lambda n: f"one:{n}", pool_wide=True)
        leaving = two.register_tool("replica", lambda n: f"two:{n}", pool_wide=True)
        served = Counter(str(relay(session, "replica", n=i)).split(":")[0] for i in range(10))
        assert served["one"] > 0 and served["two"] > 0 and sum(served.values()) == 10

        with Client(router.address) as odd:
            with pytest.raises(AlreadyExists, match="with other parameters"):
                odd.register_tool("replica", lambda n, m: n, pool_wide=True)
            with pytest.raises(InvalidArgument, match="already have a tool named 'add'"):
                odd.register_tool("add", lambda a, b: a - b, pool_wide=True)

        leaving.unregister()
        assert {relay(session, "replica", n=i) for i in range(4)} == {f"one:{i}" for i in range(4)}


def test_a_pool_wide_host_that_dies_fails_its_call_fast_and_leaves_the_listing(
    procs: ProcessFactory,
) -> None:
    router, _ = start_pool(procs, 2)
    with (
        host_app.hosting(router.address, "host-own", "pool-wide") as host,
        Client(router.address) as client,
        client.session() as session,
    ):
        assert relay(session, "stall", seconds=0) == 0
        assert "stall" in {t.name for t in session.list_tools() if t.pool_wide}
        error = host_app.killed_mid_call(host, session)
        assert isinstance(error, Unavailable)
        assert "application hosting tool 'stall' went away" in str(error)
        assert "stall" not in {t.name for t in session.list_tools()}
        with pytest.raises(NotFound, match="no tool 'stall'"):
            relay(session, "stall", seconds=0)


def test_a_pool_wide_tool_on_one_router_is_reached_through_another(
    procs: ProcessFactory, redis_server: RedisServer, redis_prefix: str
) -> None:
    """Workers call router B; the host's stream is on router A; both share one Redis."""
    store = f"{redis_server.url}?prefix={redis_prefix}"
    router_b, workers = start_pool(procs, 2, "--store", store)
    router_a = procs.router(workers, store=store)
    wait_ready(router_a.address, 2)
    with Client(router_a.address) as host, Client(router_b.address) as app:
        handle = host.register_tool("lookup_price", lookup_price, pool_wide=True)
        with app.session() as session:
            assert relay(session, "lookup_price", item="apple")["price"] == 0.5  # type: ignore[index]
            assert relay(app, "lookup_price", item="pear")["price"] == 0.75  # type: ignore[index]
            listed = {t.name: t for t in session.list_tools()}
            assert listed["lookup_price"].pool_wide
            assert {t.name for t in app.list_tools() if t.pool_wide} == {"lookup_price"}

            # A session-scoped tool of the app, on router B, and the pool-wide one on A, together.
            app.register_tool("whose", lambda: "app")
            assert relay(session, "whose") == "app"
            assert relay(session, "lookup_price", item="pear")["price"] == 0.75  # type: ignore[index]

            handle.unregister()  # the only host: no router has it any more
            with pytest.raises(NotFound, match="no tool 'lookup_price'"):
                relay(session, "lookup_price", item="pear")
            assert "lookup_price" not in {t.name for t in session.list_tools()}


def test_the_store_gives_a_pool_wide_name_to_one_principal_across_routers(
    redis_acl_url: str,
) -> None:
    """The Lua claim on a real redis-server, as the store's ACL user (no command beyond the
    store's): another principal or other parameters are refused on any router; an entry whose
    router stopped refreshing it expires."""

    def entry(principal: str, address: str, *params: str, name: str = "fetch") -> PoolToolEntry:
        spec = pb.ToolSpec(name=name, parameters=[pb.ParameterSpec(name=p) for p in params])
        return PoolToolEntry(
            name, address, principal, spec_signature(spec), spec.SerializeToString()
        )

    async def main() -> None:
        redis = aioredis.Redis.from_url(redis_acl_url.split("?")[0])
        prefix = redis_acl_url.split("prefix=")[1]
        directory = HostDirectory(redis, prefix, ttl=30)
        try:
            assert await directory.claim_pool_tool(entry("alice", "a:1", "id")) == "ok"
            assert await directory.claim_pool_tool(entry("alice", "b:1", "id")) == "ok"
            assert await directory.claim_pool_tool(entry("bob", "c:1", "id")) == "principal"
            assert await directory.claim_pool_tool(entry("alice", "c:1", "x")) == "signature"
            held = await directory.pool_tools()
            assert sorted((e.address, e.principal) for e in held) == [
                ("a:1", "alice"),
                ("b:1", "alice"),
            ]
            await directory.release_pool_tool("fetch", "a:1")
            await directory.release_pool_tool("fetch", "b:1")
            assert await directory.claim_pool_tool(entry("bob", "c:1", "x")) == "ok"

            short = HostDirectory(redis, prefix, ttl=0.2)  # a router that stops refreshing
            assert await short.claim_pool_tool(entry("carol", "d:1", name="ping")) == "ok"
            assert {(e.name, e.principal) for e in await directory.pool_tools()} == {
                ("fetch", "bob"),
                ("ping", "carol"),
            }
            await asyncio.sleep(0.5)  # carol's router stopped refreshing: her entry expired
            assert [e.name for e in await directory.pool_tools()] == ["fetch"]
            assert await directory.claim_pool_tool(entry("dave", "e:1", name="ping")) == "ok"
            await directory.release_pool_tool("fetch", "c:1")
            assert [e.principal for e in await directory.pool_tools()] == ["dave"]
        finally:
            await redis.aclose()

    asyncio.run(main())


def test_pool_wide_calls_skip_a_router_that_died_for_one_that_hosts_the_tool(
    procs: ProcessFactory, redis_server: RedisServer, redis_prefix: str
) -> None:
    """Workers call router B; replicas of one application host one name on routers A and C.
    A dies with its stream: its entry outlives it until its TTL, and every call still reaches
    the host on C (the replicas are tried in random order, so A comes first in some)."""
    store = f"{redis_server.url}?prefix={redis_prefix}"
    router_b, workers = start_pool(procs, 2, "--store", store)
    router_a = procs.router(workers, store=store)
    router_c = procs.router(workers, store=store)
    wait_ready(router_a.address, 2)
    wait_ready(router_c.address, 2)
    with (
        Client(router_a.address) as on_a,
        Client(router_c.address) as on_c,
        Client(router_b.address) as app,
    ):
        on_a.register_tool("whose", lambda: "a", pool_wide=True)
        on_c.register_tool("whose", lambda: "c", pool_wide=True)
        assert {relay(app, "whose") for _ in range(10)} <= {"a", "c"}
        router_a.kill()
        assert [relay(app, "whose") for _ in range(10)] == ["c"] * 10
