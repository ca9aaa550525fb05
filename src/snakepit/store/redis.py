"""The Redis session store: the store of real deployments (a StatefulSet or an external Redis).

Each operation is one Lua script (``lua.py``), so it is atomic and, in the common case, one
round trip. Type and constraint checks run here in Python against the variable's declaration
string as this client last saw it; the script refuses the write if the stored string differs,
and we re-validate against the one it returns and try again. Expiry is Redis's own key TTL.
See docs/store.md for the key layout and why.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from redis import exceptions as rex

from ..errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from ..protocol import Constraints
from ..protocol import value_types as vt
from ..protocol.constraints import EMPTY
from . import rules
from .base import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_SESSION_TTL,
    ChangeFeed,
    SessionInfo,
    SessionStore,
    StoreStats,
    Variable,
)
from .limits import DEFAULT_LIMITS, StoreLimits, WatcherSlots
from .lua import SCRIPTS, SESSIONS
from .redis_conn import DEFAULT_RETRY_TIMEOUT, Retrier, make_client, parse_target
from .redis_feed import RedisFeed
from .redis_records import session_info, variable

# How often a write may find the declaration changed under it before we give up.
_DECL_ATTEMPTS = 8
_CAS_ATTEMPTS = 1000
_DECL_CACHE_SIZE = 10_000


class RedisStore(SessionStore):
    backend = "redis"

    def __init__(
        self,
        url: str = "redis://localhost:6379/0",
        *,
        default_ttl: float = DEFAULT_SESSION_TTL,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        password: str | None = None,
        prefix: str = "sp",
        retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
        socket_timeout: float = 5.0,
        connect_timeout: float = 2.0,
        max_connections: int = 512,
        watch_maxlen: int = 256,
        watch_inline_limit: int = 64 * 1024,
        watch_lease: float = 30.0,
        clock: Any = time.time,
        limits: StoreLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(
            default_ttl=default_ttl, max_sessions=max_sessions, clock=clock, limits=limits
        )
        target = parse_target(url, password=password, prefix=prefix)
        self.where = target.where
        self.prefix = target.prefix
        self.retrier = Retrier(target.where, retry_timeout)
        self.redis = make_client(
            target,
            socket_timeout=socket_timeout,
            connect_timeout=connect_timeout,
            max_connections=max_connections,
        )
        # Blocking XREADs hold a connection each; they get their own pool, one per watcher.
        self.watchers = WatcherSlots(self.limits)
        self.watch_redis = make_client(
            target,
            socket_timeout=socket_timeout + RedisFeed.MAX_BLOCK,
            connect_timeout=connect_timeout,
            max_connections=self.limits.max_watchers + 8,
        )
        self.watch_maxlen = watch_maxlen
        self.watch_inline_limit = watch_inline_limit
        self.watch_lease_ms = int(watch_lease * 1000)
        # Write ids are remembered for longer than any retry of them can take.
        self._window_ms = str(int((retry_timeout + socket_timeout + connect_timeout + 5) * 1000))
        self._index = f"{self.prefix}:sessions"
        self._shas = {name: hashlib.sha1(src.encode()).hexdigest() for name, src in SCRIPTS.items()}
        self._sessions_script = self.redis.register_script(SESSIONS)
        # Write ids: unique per store instance and call, stable across retries of the call.
        self._op_base = os.urandom(8)
        self._op_count = itertools.count()
        self._decls: dict[tuple[str, str], str] = {}

    # Plumbing -------------------------------------------------------------------------------
    def keys(self, session_id: str) -> list[str]:
        base = f"{self.prefix}:{{{session_id}}}"
        return [base, base + ":v", base + ":w", base + ":o", self._index]

    def _script_keys(self, session_id: str) -> tuple[str, str]:
        """What a script gets as KEYS: the session hash (it derives the rest) and the index."""
        return f"{self.prefix}:{{{session_id}}}", self._index

    async def run(self, script: str, session_id: str, *args: Any) -> Any:
        """Run one of ``lua.SCRIPTS`` for a session; ``args`` follow the session id."""
        words = (*self._script_keys(session_id), session_id, *args)
        return await self.retrier.run(lambda: self._evalsha(script, words))

    async def _evalsha(self, script: str, words: tuple[Any, ...]) -> Any:
        try:
            return await self.redis.evalsha(self._shas[script], 2, *words)
        except rex.NoScriptError:  # a restarted server forgot its script cache
            self._shas[script] = await self.redis.script_load(SCRIPTS[script])
            return await self.redis.evalsha(self._shas[script], 2, *words)

    def _opid(self) -> bytes:
        return self._op_base + next(self._op_count).to_bytes(8, "little")

    def _remember(self, session_id: str, name: str, decl: bytes | str) -> None:
        text = decl.decode() if isinstance(decl, bytes) else decl
        cache = self._decls
        if len(cache) >= _DECL_CACHE_SIZE:
            del cache[next(iter(cache))]
        cache[(session_id, name)] = text

    def _inline(self, data: bytes) -> str:
        return "1" if len(data) <= self.watch_inline_limit else "0"

    @staticmethod
    def _no_session(session_id: str) -> NotFound:
        return NotFound(f"session {session_id!r} not found (it may have expired)")

    @staticmethod
    def _no_variable(session_id: str, name: str | bytes) -> NotFound:
        text = name.decode() if isinstance(name, bytes) else name
        return NotFound(f"variable {text!r} not found in session {session_id!r}")

    def _check(self, reply: Any, session_id: str) -> bytes:
        status: bytes = reply[0]
        if status == b"nf":
            raise self._no_session(session_id)
        if status == b"limit":
            what, would, most = reply[1].decode(), int(reply[2]), int(reply[3])
            held = "variables" if what == "variables" else "bytes of values"
            raise ResourceExhausted(
                f"session {session_id!r} would hold {would} {held}, above the limit of {most}"
            )
        return status

    # Sessions -------------------------------------------------------------------------------
    async def create_session(
        self,
        session_id: str | None = None,
        *,
        ttl: float | None = None,
        metadata: Mapping[str, str] | None = None,
        get_or_create: bool = False,
    ) -> tuple[SessionInfo, bool]:
        sid = rules.check_session_id(session_id) if session_id else rules.new_session_id()
        # The limits keep ttl_ms an integer PEXPIRE accepts: the script cannot fail halfway.
        ttl_ms = max(1, round(rules.check_ttl(ttl, self.default_ttl, self.limits) * 1000))
        meta = rules.check_metadata(metadata, self.limits)
        reply = await self.run(
            "create",
            sid,
            self._opid(),
            self._window_ms,
            ttl_ms,
            json.dumps(meta) if meta else "",
            "1" if get_or_create else "0",
            self.max_sessions,
            self.limits.max_variables,
            self.limits.max_session_bytes,
            self.limits.max_sessions_per_principal,
        )
        if reply[0] == b"exists":
            raise AlreadyExists(f"session {sid!r} already exists")
        if reply[0] == b"full":
            raise ResourceExhausted(
                f"the session store holds its maximum of {self.max_sessions} sessions"
            )
        if reply[0] == b"principal_full":
            raise self.limits.principal_full(sid.partition("/")[0], int(reply[1]))
        return session_info(sid, reply[2]), bool(reply[1])

    async def get_session(self, session_id: str) -> SessionInfo:
        return await self.touch_session(session_id)

    async def touch_session(self, session_id: str, *, worker_id: str | None = None) -> SessionInfo:
        rules.check_session_id(session_id)
        has_worker = worker_id is not None
        reply = await self.run("session", session_id, worker_id or "", "1" if has_worker else "0")
        self._check(reply, session_id)
        return session_info(session_id, reply[1])

    async def delete_session(self, session_id: str) -> bool:
        rules.check_session_id(session_id)
        return bool(await self.run("delete_session", session_id))

    async def _live_ids(self, mode: str) -> Any:
        script = self._sessions_script
        index = [self._index]
        return await self.retrier.run(lambda: script(keys=index, args=[mode]))

    async def list_sessions(self) -> list[SessionInfo]:
        ids = [sid.decode() for sid in await self._live_ids("list")]

        async def fetch() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    base = self.keys(sid)
                    pipe.hmget(base[0], "c", "a", "t", "w", "m")
                    pipe.hlen(base[1])
                return await pipe.execute()

        replies = await self.retrier.run(fetch)
        out = []
        for i, sid in enumerate(ids):
            fields = replies[2 * i]
            if fields[0] is not None and fields[2] is not None:
                out.append(session_info(sid, [*fields, replies[2 * i + 1]]))
        return out

    async def existing(self, session_ids: Sequence[str]) -> set[str]:
        ids = list(session_ids)

        async def fetch() -> list[Any]:
            async with self.redis.pipeline(transaction=False) as pipe:
                for sid in ids:
                    pipe.exists(self.keys(sid)[0])  # an expired hash no longer exists
                return await pipe.execute()

        replies = await self.retrier.run(fetch) if ids else []
        return {sid for sid, found in zip(ids, replies, strict=True) if found}

    # Variables ------------------------------------------------------------------------------
    async def register_variable(
        self,
        session_id: str,
        name: str,
        type_name: str,
        value: Any,
        *,
        constraints: Constraints = EMPTY,
        metadata: Mapping[str, str] | None = None,
    ) -> Variable:
        rules.check_session_id(session_id)
        rules.check_name(name)
        decl = rules.Declaration.new(type_name, constraints, metadata, self.limits)
        _, checked, data = await rules.check_value(decl, value, name, self.limits)
        text = decl.encode()
        reply = await self.run(
            "register",
            session_id,
            self._opid(),
            self._window_ms,
            self.watch_maxlen,
            self._inline(data),
            name,
            text,
            data,
        )
        if self._check(reply, session_id) == b"dup":
            return await self.get_variable(session_id, name)
        self._remember(session_id, name, text)
        return variable(
            name, reply[1], reply[2], data, rules.written_value(checked, data, decl.type)
        )

    async def get_variable(self, session_id: str, name: str) -> Variable:
        rules.check_session_id(session_id)
        reply = await self.run("get", session_id, rules.check_name(name))
        if self._check(reply, session_id) == b"nv":
            raise self._no_variable(session_id, name)
        self._remember(session_id, name, reply[1])
        return variable(name, reply[1], reply[3], reply[2])

    async def get_variables(self, session_id: str, names: Sequence[str]) -> dict[str, Variable]:
        rules.check_session_id(session_id)
        for name in names:
            rules.check_name(name)
        reply = await self.run("get_many", session_id, *names)
        if self._check(reply, session_id) == b"nv":
            raise self._no_variable(session_id, reply[1])
        out: dict[str, Variable] = {}
        for i, name in enumerate(names):
            d, v, s = reply[1 + 3 * i : 4 + 3 * i]
            out[name] = variable(name, d, s, v)
        return out

    async def set_variable(
        self,
        session_id: str,
        name: str,
        value: Any,
        *,
        expected_version: int | None = None,
        type_name: str | None = None,
    ) -> Variable:
        rules.check_session_id(session_id)
        rules.check_name(name)
        opid = self._opid()
        ev = "" if expected_version is None else str(int(expected_version))
        known = self._decls.get((session_id, name))
        for _ in range(_DECL_ATTEMPTS):
            decl, checked, data = await rules.check_value(
                None if known is None else rules.parse_declaration(known),
                value,
                name,
                self.limits,
                type_name,
            )
            expected, create = ("", decl.encode()) if known is None else (known, "")
            reply = await self.run(
                "set",
                session_id,
                opid,
                self._window_ms,
                self.watch_maxlen,
                self._inline(data),
                name,
                expected,
                create,
                data,
                ev,
            )
            status = self._check(reply, session_id)
            if status == b"ok":
                self._remember(session_id, name, reply[1])
                written = rules.written_value(checked, data, decl.type)
                return variable(name, reply[1], reply[2], data, written)
            if status == b"decl":
                known = reply[1].decode()
                self._remember(session_id, name, known)
            elif status == b"nv":
                if create or expected_version:
                    raise self._no_variable(session_id, name)
                known = None
            elif status == b"ver":
                raise FailedPrecondition(
                    f"variable {name!r} is at version {reply[1]}, not {expected_version}"
                )
            elif status == b"dup":
                return await self.get_variable(session_id, name)
        raise FailedPrecondition(f"variable {name!r} was re-declared concurrently too often")

    async def set_variables(
        self, session_id: str, values: Mapping[str, Any]
    ) -> dict[str, Variable]:
        rules.check_session_id(session_id)
        items = [(rules.check_name(name), value) for name, value in values.items()]
        if not items:
            await self.touch_session(session_id)
            return {}
        known = {name: self._decls.get((session_id, name)) for name, _ in items}
        opid = self._opid()
        for _ in range(_DECL_ATTEMPTS):
            args: list[Any] = [opid, self._window_ms, self.watch_maxlen]
            stored: list[bytes] = []
            for name, value in items:
                text = known[name]
                decl, _, data = await rules.check_value(
                    None if text is None else rules.parse_declaration(text),
                    value,
                    name,
                    self.limits,
                )
                args += [name, "", decl.encode()] if text is None else [name, text, ""]
                args += [data, self._inline(data)]
                stored.append(data)
            reply = await self.run("set_many", session_id, *args)
            status = self._check(reply, session_id)
            if status == b"ok":
                out = {}
                for i, (name, _) in enumerate(items):
                    d, s = reply[1 + 2 * i], reply[2 + 2 * i]
                    self._remember(session_id, name, d)
                    out[name] = variable(name, d, s, stored[i])
                return out
            if status == b"decl":
                for j in range(1, len(reply), 2):
                    name = reply[j].decode()
                    known[name] = reply[j + 1].decode()
                    self._remember(session_id, name, reply[j + 1])
            elif status == b"nv":
                known[reply[1].decode()] = None
            elif status == b"dup":
                return await self.get_variables(session_id, [name for name, _ in items])
        raise FailedPrecondition("variables were re-declared concurrently too often")

    async def delete_variable(self, session_id: str, name: str) -> bool:
        rules.check_session_id(session_id)
        args = (self._opid(), self._window_ms, self.watch_maxlen, rules.check_name(name))
        reply = await self.run("delete", session_id, *args)
        self._check(reply, session_id)
        self._decls.pop((session_id, name), None)
        return bool(reply[1])

    async def list_variables(self, session_id: str) -> list[Variable]:
        rules.check_session_id(session_id)
        reply = await self.run("list", session_id)
        self._check(reply, session_id)
        flat = reply[1]
        parts: dict[bytes, dict[bytes, bytes]] = {}
        for i in range(0, len(flat), 2):
            field = flat[i]
            parts.setdefault(field[2:], {})[field[:1]] = flat[i + 1]
        out = [
            variable(name.decode(), p[b"d"], p[b"s"], p[b"v"])
            for name, p in parts.items()
            if len(p) == 3
        ]
        out.sort(key=lambda v: (v.created_at, v.name))
        return out

    async def increment(self, session_id: str, name: str, by: int | float = 1) -> Variable:
        rules.check_session_id(session_id)
        rules.check_name(name)
        opid = self._opid()
        known = self._decls.get((session_id, name))
        for _ in range(_DECL_ATTEMPTS):
            decl = rules.parse_declaration(known) if known else None
            kind = rules.increment_type(by, name, decl.type if decl else None)
            if kind == vt.INTEGER and abs(int(by)) >= rules.EXACT_INT_LIMIT:
                return await self._increment_by_cas(session_id, name, by, kind)
            by_text = str(int(by)) if kind == vt.INTEGER else repr(float(by))
            low = high = choices = create = ""
            if decl is None:
                create = rules.Declaration.new(kind).encode()
            else:
                c = decl.constraints
                low = "" if c.min is None else repr(c.min)
                high = "" if c.max is None else repr(c.max)
                choices = "" if c.choices is None else json.dumps(list(c.choices))
            reply = await self.run(
                "increment",
                session_id,
                opid,
                self._window_ms,
                self.watch_maxlen,
                name,
                known or "",
                create,
                kind,
                by_text,
                low,
                high,
                choices,
            )
            status = self._check(reply, session_id)
            if status == b"ok":
                self._remember(session_id, name, reply[1])
                return variable(name, reply[1], reply[2], reply[3])
            if status == b"decl":
                known = reply[1].decode()
                self._remember(session_id, name, known)
            elif status == b"nv":
                known = None
            elif status == b"range":
                return await self._increment_by_cas(session_id, name, by, kind)
            elif status == b"bound":
                assert decl is not None
                total = int(reply[1]) if kind == vt.INTEGER else float(reply[1])
                decl.constraints.validate(total, decl.type, f"value of {name!r}")
                raise InvalidArgument(f"value of {name!r} {total!r} breaks its constraints")
            elif status == b"dup":
                return await self.get_variable(session_id, name)
        raise FailedPrecondition(f"variable {name!r} was re-declared concurrently too often")

    async def _increment_by_cas(
        self, session_id: str, name: str, by: int | float, kind: str
    ) -> Variable:
        """Integers beyond Lua's exact range: read, add in Python, compare-and-set, repeat."""
        for _ in range(_CAS_ATTEMPTS):
            current = await self.get_variable(session_id, name)
            kind = rules.increment_type(by, name, current.type)
            total = rules.add(current.value, by, kind)
            try:
                return await self.set_variable(
                    session_id, name, total, expected_version=current.version
                )
            except FailedPrecondition:
                continue
        raise FailedPrecondition(f"variable {name!r} changed too often to increment")

    # Watch ----------------------------------------------------------------------------------
    def watch(self, session_id: str, names: Sequence[str] | None = None) -> ChangeFeed:
        rules.check_session_id(session_id)
        return RedisFeed(self, session_id, names)

    # Housekeeping ---------------------------------------------------------------------------
    async def stats(self) -> StoreStats:
        count = int(await self._live_ids("count"))
        return StoreStats(
            backend=self.backend,
            sessions=count,
            max_sessions=self.max_sessions,
            default_ttl=self.default_ttl,
            extra={"where": self.where, "prefix": self.prefix},
        )

    async def ping(self) -> None:
        await self.retrier.run(self.redis.ping)

    async def close(self) -> None:
        await self.redis.aclose()
        await self.watch_redis.aclose()
