"""Which router replica holds the stream of the application that hosts tools for a session.

Router replicas share nothing but the session store, so the replica that holds a host's
RegisterTool stream writes ``session -> its own address`` there, with a TTL it keeps refreshing
while the stream lives; a replica that gets a hosted-tool call for a session it does not serve
reads the address and forwards the call (``hosting.py``). A router that dies stops refreshing,
so its entries expire within ``ttl`` seconds and calls fail fast with NOT_FOUND, not a hang.
Only the Redis store is shared between processes; with the in-memory store there is one router
and no directory.

Pool-wide tools (``register_tool(..., pool_wide=True)``) are recorded in one hash,
``{prefix}:pool-tools``: a field per (tool name, router address) whose value says until when it
holds, the hosting principal, the tool's signature and its spec. Claiming a name is a Lua script,
so two principals racing for one name on two routers cannot both win; every access is a script,
so the store's ACL user needs no command it did not have (``store/acl.py``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from redis import exceptions as rex

DEFAULT_TTL = 30.0

# Delete the entry only while it still names this router (another may have taken the session).
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# Claim pool-wide tool ARGV[1] for this router (field ARGV[2]): refused when a live entry of that
# name from another router belongs to another principal or has another signature; expired go.
_CLAIM_POOL_TOOL = """
local name, field, value, now = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
local principal, signature = ARGV[5], ARGV[6]
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local key, entry = cjson.decode(all[i]), cjson.decode(all[i + 1])
  if entry.expires <= now then
    redis.call('HDEL', KEYS[1], all[i])
  elseif key[1] == name and all[i] ~= field then
    if entry.principal ~= principal then return 'principal' end
    if entry.signature ~= signature then return 'signature' end
  end
end
redis.call('HSET', KEYS[1], field, value)
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[7]) then redis.call('PEXPIRE', KEYS[1], ARGV[7]) end
return 'ok'
"""
# Refresh this router's entries (ARGV: ttl ms, then field, value pairs). The hash itself lives as
# long as its longest-lived entry (it goes once no router refreshes), never shortened.
_REFRESH_POOL_TOOLS = """
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 0
"""
_READ_POOL_TOOLS = "return redis.call('HGETALL', KEYS[1])"
_DROP_POOL_TOOL = "return redis.call('HDEL', KEYS[1], ARGV[1])"


@dataclass(frozen=True, slots=True)
class PoolToolEntry:
    """One router's record of a pool-wide tool it holds a host of."""

    name: str
    address: str
    principal: str
    signature: str
    spec: bytes  # a serialised ToolSpec


def _field(name: str, address: str) -> str:
    return json.dumps([name, address])


def _value(entry: PoolToolEntry, expires_ms: int) -> str:
    return json.dumps(
        {
            "expires": expires_ms,
            "principal": entry.principal,
            "signature": entry.signature,
            "spec": base64.b64encode(entry.spec).decode(),
        }
    )


def _now_ms() -> int:
    return int(time.time() * 1000)


class HostDirectory:
    """The Redis directory of session -> router address (see the module docstring)."""

    def __init__(self, redis: Any, prefix: str, ttl: float = DEFAULT_TTL) -> None:
        self.redis = redis
        self.prefix = prefix
        self.ttl = ttl
        self._release = redis.register_script(_RELEASE)
        self._claim_pool = redis.register_script(_CLAIM_POOL_TOOL)
        self._refresh_pool = redis.register_script(_REFRESH_POOL_TOOLS)
        self._read_pool = redis.register_script(_READ_POOL_TOOLS)
        self._drop_pool = redis.register_script(_DROP_POOL_TOOL)
        self.pool_key = f"{prefix}:pool-tools"

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

    async def keep_fresh(
        self,
        address: str,
        sessions: Callable[[], list[str]],
        pool_tools: Callable[[], Mapping[str, PoolToolEntry]] = dict,
    ) -> None:
        """Refresh this router's claims every third of the TTL, for as long as it runs."""
        while True:
            await asyncio.sleep(self.ttl / 3)
            served = sessions()
            held = list(pool_tools().values())
            with contextlib.suppress(rex.RedisError):
                if served:
                    await self._claim(address, served)
                if held:
                    await self._refresh_pool_tools(held)

    # Pool-wide tools ----------------------------------------------------------------------------
    def _ttl_ms(self) -> int:
        return int(self.ttl * 1000)

    async def claim_pool_tool(self, entry: PoolToolEntry) -> str:
        """Record that this router holds a host of pool-wide tool ``entry.name``: ``ok``, or why
        not (``principal``: another principal hosts the name; ``signature``: other parameters).
        A store that does not answer refuses nothing (the refresh loop writes the entry)."""
        now = _now_ms()
        args = [entry.name, _field(entry.name, entry.address), _value(entry, now + self._ttl_ms())]
        try:
            verdict = await self._claim_pool(
                keys=[self.pool_key],
                args=[*args, now, entry.principal, entry.signature, self._ttl_ms()],
            )
        except rex.RedisError:
            return "ok"
        return verdict.decode() if isinstance(verdict, bytes) else str(verdict)

    async def _refresh_pool_tools(self, entries: Sequence[PoolToolEntry]) -> None:
        expires = _now_ms() + self._ttl_ms()
        args: list[Any] = [self._ttl_ms()]
        for entry in entries:
            args += [_field(entry.name, entry.address), _value(entry, expires)]
        await self._refresh_pool(keys=[self.pool_key], args=args)

    async def release_pool_tool(self, name: str, address: str) -> None:
        with contextlib.suppress(rex.RedisError):
            await self._drop_pool(keys=[self.pool_key], args=[_field(name, address)])

    async def pool_tools(self) -> list[PoolToolEntry]:
        """Every live pool-wide entry of every router (none when the store does not answer)."""
        try:
            flat = await self._read_pool(keys=[self.pool_key])
        except rex.RedisError:
            return []
        now = _now_ms()
        entries = []
        for raw_field, raw_value in zip(flat[::2], flat[1::2], strict=True):
            name, address = json.loads(raw_field)
            value = json.loads(raw_value)
            if value["expires"] > now:
                spec = base64.b64decode(value["spec"])
                entries.append(
                    PoolToolEntry(name, address, value["principal"], value["signature"], spec)
                )
        return entries
