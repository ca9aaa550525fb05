"""Which router replica holds the stream of the application that hosts tools for a session.

Router replicas share nothing but the session store, so the replica that holds a host's
RegisterTool stream writes ``session -> its own address`` there, with a TTL it keeps refreshing
while the stream lives; a replica that gets a hosted-tool call for a session it does not serve
reads the address and forwards the call (``hosting.py``). A router that dies stops refreshing,
so its entries expire within ``ttl`` seconds and calls fail fast with NOT_FOUND, not a hang.
Only the Redis store is shared between processes; with the in-memory store there is one router
and no directory.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

from redis import exceptions as rex

DEFAULT_TTL = 30.0

# Delete the entry only while it still names this router (another may have taken the session).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class HostDirectory:
    """The Redis directory of session -> router address (see the module docstring)."""

    def __init__(self, redis: Any, prefix: str, ttl: float = DEFAULT_TTL) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl
        self._release = redis.register_script(_RELEASE)

    def _key(self, session_id: str) -> str:
        return f"{self.prefix}:hosted:{session_id}"

    async def update(self, address: str, add: Sequence[str], remove: Sequence[str]) -> None:
        try:
            if add:
                await self._claim(address, add)
            for session_id in remove:
                await self._release(keys=[self._key(session_id)], args=[address])
        except rex.RedisError:
            pass  # the refresh loop writes the claims again; a stale entry expires

    async def _claim(self, address: str, sessions: Sequence[str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for session_id in sessions:
            pipe.set(self._key(session_id), address, px=int(self.ttl * 1000))
        await pipe.execute()

    async def locate(self, session_id: str) -> str | None:
        try:
            value = await self.redis.get(self._key(session_id))
        except rex.RedisError:
            return None
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)

    async def keep_fresh(self, address: str, sessions: Callable[[], list[str]]) -> None:
        """Refresh this router's claims every third of the TTL, for as long as it runs."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            served = sessions()
            if served:
                with contextlib.suppress(rex.RedisError):
                    await self._claim(address, served)
