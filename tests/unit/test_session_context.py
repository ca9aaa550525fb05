"""SessionContext over a real (in-memory) store: caching, invalidation, batching, sync and async use."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from snakepit.errors import FailedPrecondition, InvalidArgument, NotFound
from snakepit.store import MemoryStore
from snakepit.worker.context import SessionContext


class CountingStore(MemoryStore):
    """A MemoryStore that counts round trips, to show what the context's cache saves."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    async def get_variable(self, session_id: str, name: str) -> Any:
        self.reads += 1
        return await super().get_variable(session_id, name)

    async def get_variables(self, session_id: str, names: Any) -> Any:
        self.reads += 1
        return await super().get_variables(session_id, names)


async def context(store: MemoryStore, cache_ttl: float = 5.0) -> SessionContext:
    await store.create_session("s1")
    return SessionContext(
        session_id="s1",
        metadata={},
        worker_id="w",
        store=store,
        loop=asyncio.get_running_loop(),
        cache_ttl=cache_ttl,
    )


async def test_reads_are_cached_and_own_writes_replace_the_cache() -> None:
    store = CountingStore()
    ctx = await context(store)
    await store.set_variable("s1", "x", 1)
    assert await ctx.aget("x") == 1
    await store.set_variable("s1", "x", 2)  # another worker writes behind our back
    assert await ctx.aget("x") == 1  # still the cached value, within cache_ttl
    assert store.reads == 1
    ctx.invalidate("x")
    assert await ctx.aget("x") == 2
    await ctx.aset("x", 3)
    assert await ctx.aget("x") == 3 and store.reads == 2  # our write refreshed the cache


async def test_cache_entries_expire() -> None:
    store = CountingStore()
    ctx = await context(store, cache_ttl=0.05)
    await store.set_variable("s1", "x", 1)
    assert await ctx.aget("x") == 1
    await store.set_variable("s1", "x", 2)
    await asyncio.sleep(0.08)
    assert await ctx.aget("x") == 2


async def test_get_many_fetches_only_the_missing_names_in_one_round_trip() -> None:
    store = CountingStore()
    ctx = await context(store)
    await ctx.aset_many({"a": 1, "b": 2, "c": 3})
    assert await ctx.aget_many(["a", "b", "c"]) == {"a": 1, "b": 2, "c": 3}
    assert store.reads == 0  # all cached by the batch write
    ctx.invalidate()
    assert await ctx.aget_many(["a", "c"]) == {"a": 1, "c": 3}
    assert store.reads == 1


async def test_declarations_defaults_and_refusals() -> None:
    ctx = await context(MemoryStore())
    await ctx.aset("lr", 0.1, type="float", constraints={"min": 0, "max": 1})
    with pytest.raises(InvalidArgument, match="above the maximum"):
        await ctx.aset("lr", 2.0)
    assert await ctx.aget("lr") == 0.1
    assert await ctx.aget("missing", None) is None
    with pytest.raises(NotFound):
        await ctx.aget("missing")
    assert await ctx.aincrement("n", 2) == 2
    assert await ctx.alist() == {"lr": 0.1, "n": 2}
    assert await ctx.adelete("n") and await ctx.alist() == {"lr": 0.1}


async def test_blocking_methods_work_from_threads_and_refuse_on_the_loop() -> None:
    ctx = await context(MemoryStore())
    await asyncio.to_thread(ctx.set, "x", 5)
    assert await asyncio.to_thread(ctx.get, "x") == 5
    with pytest.raises(RuntimeError, match=r"await ctx\.aget"):
        ctx.get("x")


async def test_without_a_session_or_a_store_the_error_says_so() -> None:
    loop = asyncio.get_running_loop()
    no_session = SessionContext(
        session_id="", metadata={}, worker_id="w", store=MemoryStore(), loop=loop
    )
    with pytest.raises(FailedPrecondition, match="no session"):
        await no_session.aget("x")
    no_store = SessionContext(session_id="s", metadata={}, worker_id="w", store=None, loop=loop)
    with pytest.raises(FailedPrecondition, match="no session store"):
        await no_store.aget("x")
    with pytest.raises(FailedPrecondition, match="no router"):
        await no_store.acall_tool("add", a=1, b=2)
