"""SessionContext: what a tool sees of its call and its session's variables.

The worker itself is stateless; variables live in the session store. The context keeps a small
read cache per call (entries live ``cache_ttl`` seconds and are replaced by the context's own
writes), loads lazily, and batches ``get_many``/``set_many`` into one round trip.

Async tools use the ``a``-prefixed coroutines; sync tools, which run in worker threads, use the
plain methods, which hand the work to the event loop and wait.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from typing import Any, TypeVar

from ..errors import FailedPrecondition, NotFound
from ..protocol.constraints import Constraints
from ..store.base import SessionStore, Variable

T = TypeVar("T")
_MISSING: Any = object()
_NO_ROUTER = "this worker has no router address, so tools cannot call tools"

ToolCaller = Callable[[str, dict[str, Any], str, float | None], Awaitable[Any]]
ToolStreamer = Callable[[str, dict[str, Any], str, float | None], AsyncIterator[Any]]


class SessionContext:
    def __init__(
        self,
        *,
        session_id: str,
        metadata: Mapping[str, str],
        principal: str = "anonymous",
        store_key: str | None = None,
        worker_id: str,
        store: SessionStore | None,
        loop: asyncio.AbstractEventLoop,
        tool_caller: ToolCaller | None = None,
        tool_streamer: ToolStreamer | None = None,
        deadline: float | None = None,
        cache_ttl: float = 5.0,
        on_cache: Callable[[bool], None] | None = None,
    ) -> None:
        self.session_id = session_id
        self._principal = principal
        # The session's key in ``store``: its id, or its owner's namespaced key (identity).
        self._store_key = session_id if store_key is None else store_key
        self.metadata = metadata
        self.worker_id = worker_id
        self.deadline = deadline  # time.monotonic() by which the call must answer, if any
        self.cache_ttl = cache_ttl
        self._store = store
        self._loop = loop
        self._tool_caller = tool_caller
        self._tool_streamer = tool_streamer
        self._cache: dict[str, tuple[float, Variable]] = {}
        self.cancelled = False
        self._on_cache = on_cache  # told hit (True) or miss (False) per variable read

    # Call facts ---------------------------------------------------------------------------
    @property
    def principal(self) -> str:
        """Who the call is on behalf of, as the pool verified it (``anonymous`` with auth off).
        Read-only; the caller's credential itself never reaches a tool."""
        return self._principal

    def time_remaining(self) -> float | None:
        """Seconds left before the caller's deadline, or None without one."""
        return None if self.deadline is None else max(0.0, self.deadline - time.monotonic())

    # Cache --------------------------------------------------------------------------------
    def invalidate(self, name: str | None = None) -> None:
        """Forget cached variables (all of them, or one) so the next read goes to the store."""
        if name is None:
            self._cache.clear()
        else:
            self._cache.pop(name, None)

    def _cached(self, name: str) -> Variable | None:
        entry = self._cache.get(name)
        if entry is None:
            return None
        if time.monotonic() - entry[0] > self.cache_ttl:
            del self._cache[name]
            return None
        return entry[1]

    def _remember(self, variable: Variable) -> Variable:
        self._cache[variable.name] = (time.monotonic(), variable)
        return variable

    def _require_store(self) -> tuple[SessionStore, str]:
        if self._store is None:
            raise FailedPrecondition(
                "this worker has no session store configured (start it with --store or --router)"
            )
        if not self.session_id:
            raise FailedPrecondition("this call has no session: call the tool within a session")
        return self._store, self._store_key

    # Async API ------------------------------------------------------------------------------
    async def avariable(self, name: str) -> Variable:
        cached = self._cached(name)
        if self._on_cache is not None:
            self._on_cache(cached is not None)
        if cached is not None:
            return cached
        store, sid = self._require_store()
        return self._remember(await store.get_variable(sid, name))

    async def aget(self, name: str, default: Any = _MISSING) -> Any:
        try:
            return (await self.avariable(name)).value
        except NotFound:
            if default is _MISSING:
                raise
            return default

    async def aget_many(self, names: Sequence[str]) -> dict[str, Any]:
        missing = [n for n in names if self._cached(n) is None]
        if self._on_cache is not None:
            for hit in (False,) * len(missing) + (True,) * (len(names) - len(missing)):
                self._on_cache(hit)
        if missing:
            store, sid = self._require_store()
            for variable in (await store.get_variables(sid, missing)).values():
                self._remember(variable)
        return {n: self._cache[n][1].value for n in names}

    async def aset(
        self,
        name: str,
        value: Any,
        *,
        type: str | None = None,
        constraints: Mapping[str, Any] | None = None,
    ) -> Variable:
        store, sid = self._require_store()
        if constraints is not None:
            type_name = type or self._type_for_declaration(name, value)
            variable = await store.register_variable(
                sid, name, type_name, value, constraints=Constraints.from_dict(constraints)
            )
        else:
            variable = await store.set_variable(sid, name, value, type_name=type)
        return self._remember(variable)

    def _type_for_declaration(self, name: str, value: Any) -> str:
        from ..protocol import infer_type

        cached = self._cached(name)
        return cached.type if cached is not None else infer_type(value)

    async def aset_many(self, values: Mapping[str, Any]) -> dict[str, Variable]:
        store, sid = self._require_store()
        written = await store.set_variables(sid, values)
        for variable in written.values():
            self._remember(variable)
        return written

    async def alist(self) -> dict[str, Any]:
        store, sid = self._require_store()
        variables = await store.list_variables(sid)
        for variable in variables:
            self._remember(variable)
        return {v.name: v.value for v in variables}

    async def adelete(self, name: str) -> bool:
        store, sid = self._require_store()
        self.invalidate(name)
        return await store.delete_variable(sid, name)

    async def aincrement(self, name: str, by: int | float = 1) -> Any:
        store, sid = self._require_store()
        return self._remember(await store.increment(sid, name, by)).value

    async def acall_tool(self, name: str, /, **arguments: Any) -> Any:
        """Call another tool through the router, in this session, within this deadline.

        The tool is the pool's, or else one hosted by the application that owns the session
        (``client.register_tool``).
        """
        if self._tool_caller is None:
            raise FailedPrecondition(_NO_ROUTER)
        return await self._tool_caller(name, arguments, self.session_id, self.time_remaining())

    async def astream_tool(self, name: str, /, **arguments: Any) -> AsyncIterator[Any]:
        """``acall_tool`` for a streaming tool: its items, as they come."""
        if self._tool_streamer is None:
            raise FailedPrecondition(_NO_ROUTER)
        async for item in self._tool_streamer(
            name, arguments, self.session_id, self.time_remaining()
        ):
            yield item

    # Sync API (for sync tools running in worker threads) --------------------------------------
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            coro.close()
            raise RuntimeError(
                "SessionContext's blocking methods cannot run on the event loop; "
                "in an async tool use the awaitable ones (await ctx.aget(...))"
            )
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def variable(self, name: str) -> Variable:
        return self._run(self.avariable(name))

    def get(self, name: str, default: Any = _MISSING) -> Any:
        return self._run(self.aget(name, default))

    def get_many(self, names: Sequence[str]) -> dict[str, Any]:
        return self._run(self.aget_many(names))

    def set(
        self,
        name: str,
        value: Any,
        *,
        type: str | None = None,
        constraints: Mapping[str, Any] | None = None,
    ) -> Variable:
        return self._run(self.aset(name, value, type=type, constraints=constraints))

    def set_many(self, values: Mapping[str, Any]) -> dict[str, Variable]:
        return self._run(self.aset_many(values))

    def list(self) -> dict[str, Any]:
        return self._run(self.alist())

    def delete(self, name: str) -> bool:
        return self._run(self.adelete(name))

    def increment(self, name: str, by: int | float = 1) -> Any:
        return self._run(self.aincrement(name, by))

    def call_tool(self, name: str, /, **arguments: Any) -> Any:
        return self._run(self.acall_tool(name, **arguments))
