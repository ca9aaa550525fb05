"""Watching a Redis session: a blocking XREAD on the session's change stream.

Write scripts append to the stream only while some watcher holds the session's lease (so
unwatched sessions cost no stream memory or time) and number what they append (``q``); every
write also stamps the session's last-write time. The feed checks that the numbers it reads are
consecutive (a gap means the capped stream was trimmed under it) and, when it renews a lease
that had lapsed, whether a write happened meanwhile; either way it raises ResourceExhausted
rather than silently skip changes.

Values above the store's inline limit are not copied into the stream; the feed reads them when
it delivers the change. If the variable was written again meanwhile, it delivers the newer
version and skips the older changes of that variable (large values are coalesced, never
delivered out of order).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from ..errors import NotFound, ResourceExhausted
from .base import ChangeFeed, VariableChange
from .redis_records import variable

if TYPE_CHECKING:
    from .redis import RedisStore


class RedisFeed(ChangeFeed):
    # Longest XREAD block (seconds): also how late the feed may notice an expired session.
    MAX_BLOCK = 1.0
    BATCH = 256

    def __init__(self, store: RedisStore, session_id: str, names: Sequence[str] | None) -> None:
        self._store = store
        self._session_id = session_id
        self._names = frozenset(names) if names else None
        self._keys = store.keys(session_id)
        self._pending: deque[VariableChange] = deque()
        self._started = False
        self._ended = False
        self._last_id = b"0-0"
        self._q = 0
        self._created = b""
        self._renewed = 0.0
        self._block_ms = int(self.MAX_BLOCK * 1000)
        self._delivered: dict[str, int] = {}
        self._counted = False

    async def ready(self) -> None:
        if self._started or self._ended:
            return
        self._store.watchers.take(self._session_id)
        self._counted = True
        try:
            reply = await self._lease()
        except BaseException:
            self._uncount()
            raise
        if reply is None:
            self._uncount()
            raise NotFound(f"session {self._session_id!r} not found (it may have expired)")
        self._last_id, q, self._created, _ = reply
        self._q = int(q)
        self._started = True

    async def _lease(self) -> tuple[bytes, bytes, bytes, bool] | None:
        """Take or renew the watcher lease: (last stream id, q, created, lapsed with writes)."""
        reply = await self._store.run("watch", self._session_id, self._store.watch_lease_ms)
        self._renewed = time.monotonic()
        if reply[0] == b"nf":
            return None
        _, last_id, q, created, lapsed, pttl = reply
        self._block_ms = max(1, min(int(self.MAX_BLOCK * 1000), int(pttl) + 2))
        return last_id, q, created, bool(lapsed)

    async def __anext__(self) -> VariableChange:
        await self.ready()
        while not self._pending:
            if self._ended:
                raise StopAsyncIteration
            await self._poll()
        return self._pending.popleft()

    def _expire(self) -> None:
        self._pending.append(VariableChange(self._session_id, "", "expired"))
        self._ended = True

    def _gap(self, missed: int) -> ResourceExhausted:
        self._ended = True
        what = f"missed {missed} change(s)" if missed else "missed changes"
        return ResourceExhausted(
            f"watch of session {self._session_id!r} {what}: it fell more than "
            f"{self._store.watch_maxlen} changes behind or stopped reading for longer than its "
            "lease"
        )

    async def _renew(self) -> None:
        reply = await self._lease()
        if reply is None or reply[2] != self._created:
            self._expire()
            return
        if reply[3]:
            raise self._gap(0)

    async def _poll(self) -> None:
        lease_ms = self._store.watch_lease_ms
        if (time.monotonic() - self._renewed) * 1000 > lease_ms / 3:
            await self._renew()
            if self._ended:
                return
        stream = self._keys[2]
        client = self._store.watch_redis
        last_id, block = self._last_id, self._block_ms

        async def read() -> Any:
            return await client.xread({stream: last_id}, count=self.BATCH, block=block)

        reply = await self._store.retrier.run(read)
        if not reply:
            await self._renew()
            return
        for entry_id, fields in reply[0][1]:
            self._last_id = entry_id
            await self._take(fields)
            if self._ended:
                return

    async def _take(self, fields: dict[bytes, bytes]) -> None:
        kind = fields[b"k"].decode()
        if kind == "expired":
            self._expire()
            return
        q = int(fields[b"q"])
        if q <= self._q:  # a new session with the same id started a new stream
            self._expire()
            return
        if q != self._q + 1:
            raise self._gap(q - self._q - 1)
        self._q = q
        name = fields[b"n"].decode()
        if self._names is not None and name not in self._names:
            return
        if kind == "deleted":
            self._delivered.pop(name, None)
            self._pending.append(VariableChange(self._session_id, name, "deleted"))
            return
        change = await self._set_change(name, fields)
        if change is not None:
            self._pending.append(change)

    async def _set_change(self, name: str, fields: dict[bytes, bytes]) -> VariableChange | None:
        decl, state = fields[b"d"], fields[b"s"]
        version = int(state.split(b":", 1)[0])
        if version <= self._delivered.get(name, 0):
            return None  # a large value already delivered at a later version
        raw = fields.get(b"v")
        if raw is None:
            vk = self._keys[1]
            wanted = (b"d:" + name.encode(), b"v:" + name.encode(), b"s:" + name.encode())
            redis = self._store.redis

            async def fetch() -> Any:
                return await redis.hmget(vk, wanted)

            current = await self._store.retrier.run(fetch)
            if current[0] is None:
                return None  # deleted since; its "deleted" change follows
            decl, raw, state = current
            version = int(state.split(b":", 1)[0])
            self._delivered[name] = version
        var = variable(name, decl, state, raw)
        return VariableChange(self._session_id, name, "set", var)

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self._store.watchers.give_back(self._session_id)

    async def aclose(self) -> None:
        self._ended = True
        self._pending.clear()
        self._uncount()
