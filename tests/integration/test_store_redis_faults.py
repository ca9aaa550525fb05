"""RedisStore against a redis-server that dies, restarts, refuses us or is not there at all."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest

from snakepit.errors import FailedPrecondition, Unavailable
from snakepit.store.redis import RedisStore
from snakepit.store.redis_conn import PASSWORD_ENV
from tests.fixtures.redis import RedisFactory, RedisServer, free_port

pytestmark = pytest.mark.redis


@pytest.fixture
async def stores() -> AsyncIterator[list[RedisStore]]:
    made: list[RedisStore] = []
    yield made
    for store in made:
        await store.close()


def _store(made: list[RedisStore], url: str, **kwargs: object) -> RedisStore:
    store = RedisStore(url, **kwargs)  # type: ignore[arg-type]
    made.append(store)
    return store


class Writer:
    """Writes k1, k2, ... and increments a counter, recording which writes were acknowledged."""

    def __init__(self, store: RedisStore, tag: str) -> None:
        self.store = store
        self.tag = tag
        self.acked: dict[str, int] = {}
        self.increments_acked = 0
        self.increments_tried = 0
        self.unavailable = 0
        self.stop = asyncio.Event()

    async def run(self) -> None:
        i = 0
        while not self.stop.is_set():
            i += 1
            name = f"{self.tag}{i}"
            try:
                await self.store.set_variable("s", name, i)
                self.acked[name] = i
            except Unavailable:
                self.unavailable += 1
            self.increments_tried += 1
            try:
                await self.store.increment("s", "counter")
                self.increments_acked += 1
            except Unavailable:
                self.unavailable += 1

    async def wait_for(self, count: int, timeout: float = 60.0) -> None:
        """Until ``count`` writes were acknowledged. Generous: with ``appendfsync always`` each
        write waits for an fsync, which a disk busy with other work can take 100+ ms to give."""
        deadline = time.monotonic() + timeout
        while len(self.acked) < count:
            assert time.monotonic() < deadline, f"only {len(self.acked)} writes acknowledged"
            await asyncio.sleep(0.01)


async def test_restart_mid_stream_loses_no_acknowledged_write(
    redis_server_factory: RedisFactory, stores: list[RedisStore]
) -> None:
    server = redis_server_factory()  # AOF on, appendfsync always
    store = _store(stores, server.url, retry_timeout=0.3, socket_timeout=1.0, connect_timeout=0.5)
    await store.create_session("s", ttl=120)
    writers = [Writer(store, tag) for tag in ("a", "b")]
    tasks = [asyncio.create_task(w.run()) for w in writers]
    try:
        await asyncio.gather(*(w.wait_for(20) for w in writers))
        # SIGKILL: nothing gets a chance to flush; only what was fsynced survives.
        await asyncio.to_thread(server.restart, kill=True, down_for=0.8)
        before = [len(w.acked) for w in writers]
        await asyncio.gather(*(w.wait_for(n + 20) for w, n in zip(writers, before, strict=True)))
    finally:
        for w in writers:
            w.stop.set()
        await asyncio.gather(*tasks)
    assert all(w.unavailable > 0 for w in writers), "no client saw the outage"
    acked = {name: value for w in writers for name, value in w.acked.items()}
    stored = await store.get_variables("s", list(acked))
    assert {name: var.value for name, var in stored.items()} == acked
    counter = (await store.get_variable("s", "counter")).value
    acked_incr = sum(w.increments_acked for w in writers)
    tried_incr = sum(w.increments_tried for w in writers)
    # Every acknowledged increment counted once; an unacknowledged one at most once.
    assert acked_incr <= counter <= tried_incr


async def test_unavailable_while_down_then_recovers_without_a_new_client(
    redis_server_factory: RedisFactory, stores: list[RedisStore]
) -> None:
    server = redis_server_factory()
    store = _store(stores, server.url, retry_timeout=0.4)
    await store.create_session("s", ttl=60)
    await store.set_variable("s", "x", 1)
    server.stop()
    started = time.monotonic()
    with pytest.raises(Unavailable, match=f"127.0.0.1:{server.port}"):
        await store.get_variable("s", "x")
    assert time.monotonic() - started < 2.0
    server.start()
    assert (await store.get_variable("s", "x")).value == 1
    assert (await store.increment("s", "x")).value == 2


async def test_an_outage_shorter_than_the_retry_budget_is_invisible(
    redis_server_factory: RedisFactory, stores: list[RedisStore]
) -> None:
    server = redis_server_factory()
    store = _store(stores, server.url, retry_timeout=5.0)
    await store.create_session("s", ttl=60)
    await store.set_variable("s", "x", 1)
    server.stop(kill=True)
    restart = asyncio.get_running_loop().call_later(0.3, server.start)
    try:
        assert (await store.increment("s", "x")).value == 2
    finally:
        restart.cancel()


async def test_watch_carries_on_across_a_restart(
    redis_server_factory: RedisFactory, stores: list[RedisStore]
) -> None:
    server = redis_server_factory()
    store = _store(stores, server.url, retry_timeout=3.0)
    await store.create_session("s", ttl=60)
    feed = store.watch("s")
    await feed.ready()
    await store.set_variable("s", "x", 1)
    assert (await asyncio.wait_for(feed.__anext__(), 5)).variable.value == 1  # type: ignore[union-attr]
    next_change = asyncio.ensure_future(feed.__anext__())
    await asyncio.to_thread(server.restart, kill=True, down_for=0.2)
    await store.set_variable("s", "x", 2)
    change = await asyncio.wait_for(next_change, 5)
    assert change.variable is not None and (change.variable.value, change.variable.version) == (
        2,
        2,
    )
    await feed.aclose()


def _password_server(factory: RedisFactory) -> RedisServer:
    return factory(password="s3cret-pw")


async def test_wrong_or_missing_password_is_a_clear_error(
    redis_server_factory: RedisFactory,
    stores: list[RedisStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    server = _password_server(redis_server_factory)
    for store in (
        _store(stores, server.url, password="wrong", retry_timeout=2.0),
        _store(stores, server.url, retry_timeout=2.0),
    ):
        started = time.monotonic()
        with pytest.raises(FailedPrecondition, match="authentication") as caught:
            await store.create_session("s")
        assert time.monotonic() - started < 1.0, "an authentication failure is not retried"
        assert f"127.0.0.1:{server.port}" in str(caught.value)
        assert "s3cret" not in str(caught.value)
    good = _store(stores, server.url_with_password())
    assert (await good.create_session("s"))[1]


async def test_password_from_the_environment_overrides_the_url(
    redis_server_factory: RedisFactory,
    stores: list[RedisStore],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    server = _password_server(redis_server_factory)
    monkeypatch.setenv(PASSWORD_ENV, "s3cret-pw")
    store = _store(stores, f"redis://:stale@127.0.0.1:{server.port}/0")
    assert (await store.create_session("s"))[1]


async def test_unreachable_host_names_host_and_port(stores: list[RedisStore]) -> None:
    port = free_port()  # nothing listens there
    store = _store(stores, f"redis://127.0.0.1:{port}/0", retry_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(Unavailable, match=f"127.0.0.1:{port}"):
        await store.create_session("s")
    assert time.monotonic() - started < 2.0
    with pytest.raises(Unavailable):
        await store.ping()
