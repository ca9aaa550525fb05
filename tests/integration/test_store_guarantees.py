"""Store guarantees the docs state and no other test pins down: a watcher that falls behind is
told so (never silently skipped), and a write retried with the id it was first sent with is
applied once (exactly-once increments, not at-least-once)."""

from __future__ import annotations

import asyncio

import pytest

from snakepit.errors import ResourceExhausted
from snakepit.store.limits import StoreLimits
from snakepit.store.memory import MemoryStore
from snakepit.store.redis import RedisStore
from tests.fixtures.redis import RedisServer


async def _fall_behind(store: MemoryStore | RedisStore, changes: int) -> None:
    """Open a watch, then write ``changes`` changes without reading any; reading must fail."""
    await store.create_session("s")
    feed = store.watch("s")
    await feed.ready()
    for i in range(changes):
        await store.set_variable("s", "v", i)
    with pytest.raises(ResourceExhausted, match="behind"):
        for _ in range(changes + 1):
            await asyncio.wait_for(anext(feed), 5)
    await feed.aclose()


async def test_a_memory_watcher_that_falls_behind_is_told_so() -> None:
    store = MemoryStore(watch_backlog=20)
    try:
        await _fall_behind(store, 50)
    finally:
        await store.close()


async def test_a_watcher_is_told_it_fell_behind_by_bytes_before_changes() -> None:
    """Issue 13: a watcher's backlog is bounded in bytes too (``watch_backlog_bytes``), not only
    in changes: three unread 400 KB changes overflow a 1 MiB bound long before 10,000 changes
    would, so a watcher that never reads cannot hold the router's memory."""
    store = MemoryStore(limits=StoreLimits(watch_backlog_bytes=1 << 20))
    try:
        await store.create_session("s")
        feed = store.watch("s")
        await feed.ready()
        for _ in range(3):
            await store.set_variable("s", "v", "x" * 400_000)
        with pytest.raises(ResourceExhausted, match="1048576 bytes behind"):
            for _ in range(4):
                await asyncio.wait_for(anext(feed), 5)
        await feed.aclose()
    finally:
        await store.close()


async def test_a_redis_watcher_that_falls_behind_is_told_so(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    store = RedisStore(redis_server.url, prefix=redis_prefix, watch_maxlen=16)
    try:
        await _fall_behind(store, 200)
    finally:
        await store.close()


async def test_a_write_retried_with_its_first_id_is_applied_once(
    redis_server: RedisServer, redis_prefix: str
) -> None:
    """What a retry after a lost reply sends: the same operation id. Run every write script
    twice with one id; each must take effect once."""
    store = RedisStore(redis_server.url, prefix=redis_prefix)
    try:
        await store.create_session("s")
        first_id = store._opid()
        store._opid = lambda: first_id  # type: ignore[method-assign]
        assert (await store.increment("s", "n", 5)).value == 5
        await store.increment("s", "n", 5)  # the retry
        store._opid = RedisStore._opid.__get__(store)  # type: ignore[method-assign]
        assert (await store.get_variable("s", "n")).value == 5
        assert (await store.increment("s", "n", 1)).value == 6  # a new write applies
    finally:
        await store.close()
