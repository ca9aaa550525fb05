"""The in-memory session store of the embedded default (``snakepit serve``).

Every operation runs to completion without awaiting, so it is atomic on its event loop without
locks. Values are kept in their stored (codec) form, as in Redis: a caller can never mutate a
stored value through a reference it passed in or got back, and tensors are kept binary.

Expiry never scans: a heap holds one entry per session (its deadline when pushed). Touching a
session only moves its ``expires_at``; when a heap entry comes due, a session that was touched
since is pushed back with its new deadline, and one that was not is dropped. A single timer on
the event loop fires at the earliest deadline so watchers hear of expiry without any traffic.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import AlreadyExists, FailedPrecondition, NotFound, ResourceExhausted
from ..protocol import Constraints
from ..protocol.constraints import EMPTY
from ..security.identity import owner_of_key
from . import rules
from .base import (
    DEFAULT_MAX_SESSIONS,
    DEFAULT_SESSION_TTL,
    ChangeFeed,
    SessionInfo,
    SessionStore,
    StoreStats,
    Variable,
    VariableChange,
)
from .limits import DEFAULT_LIMITS, StoreLimits, WatcherSlots

# Changes a watcher may have queued before it counts as too slow to be complete.
DEFAULT_WATCH_BACKLOG = 10_000
_END = object()
# How often a write of a large value may find its variable re-declared while it was checked.
_DECL_ATTEMPTS = 8


@dataclass(slots=True)
class _Var:
    decl: rules.Declaration
    data: bytes
    version: int
    created_at: float
    updated_at: float

    def view(self, name: str, checked: Any = rules.UNDECODED) -> Variable:
        """The variable as callers see it, decoded only when its value is asked for;
        ``checked`` is the value just written, which an immutable type may reuse."""
        return Variable(
            name=name,
            type=self.decl.type,
            value=checked,
            version=self.version,
            created_at=self.created_at,
            updated_at=self.updated_at,
            constraints=self.decl.constraints,
            metadata=self.decl.metadata,
            data=self.data,
        )


@dataclass(slots=True)
class _Session:
    session_id: str
    gen: int
    created_at: float
    accessed_at: float
    ttl: float
    metadata: dict[str, str]
    worker_id: str = ""
    variables: dict[str, _Var] = field(default_factory=dict)
    feeds: list[_MemoryFeed] = field(default_factory=list)
    value_bytes: int = 0

    def check_growth(self, limits: StoreLimits, writes: Mapping[str, bytes]) -> None:
        """Refuse writes that would leave this session above its variable or byte limit."""
        added = sum(1 for name in writes if name not in self.variables)
        delta = sum(
            len(data) - (len(old.data) if (old := self.variables.get(name)) else 0)
            for name, data in writes.items()
        )
        limits.check_session_growth(
            self.session_id, len(self.variables) + added, self.value_bytes + delta
        )

    @property
    def expires_at(self) -> float:
        return self.accessed_at + self.ttl

    def info(self) -> SessionInfo:
        return SessionInfo(
            session_id=self.session_id,
            created_at=self.created_at,
            last_accessed_at=self.accessed_at,
            expires_at=self.expires_at,
            ttl_seconds=self.ttl,
            last_worker_id=self.worker_id,
            metadata=dict(self.metadata),
            variable_count=len(self.variables),
        )


class MemoryStore(SessionStore):
    backend = "memory"

    def __init__(
        self,
        *,
        default_ttl: float = DEFAULT_SESSION_TTL,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        clock: Any = time.time,
        watch_backlog: int = DEFAULT_WATCH_BACKLOG,
        limits: StoreLimits = DEFAULT_LIMITS,
    ) -> None:
        super().__init__(
            default_ttl=default_ttl, max_sessions=max_sessions, clock=clock, limits=limits
        )
        self.watch_backlog = watch_backlog
        self.watchers = WatcherSlots(self.limits)
        self._sessions: dict[str, _Session] = {}
        self._held: Counter[str] = Counter()  # live sessions per principal (keys PRINCIPAL/ID)
        self._heap: list[tuple[float, int, str]] = []
        self._gens = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")

    # Expiry ---------------------------------------------------------------------------------
    def _expire_due(self) -> float:
        """Drop sessions whose deadline passed; return the current time."""
        now: float = self.clock()
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, gen, sid = heapq.heappop(heap)
            session = self._sessions.get(sid)
            if session is None or session.gen != gen:
                continue
            if session.expires_at <= now:
                self._drop(session)
            else:
                heapq.heappush(heap, (session.expires_at, gen, sid))
        self._arm(now)
        return now

    def _arm(self, now: float) -> None:
        """Keep one loop timer at the earliest deadline, so expiry happens without traffic."""
        if not self._heap:
            return
        due = self._heap[0][0]
        if self._timer is not None and self._timer_at <= due:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        self._timer = loop.call_later(max(0.0, due - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        self._expire_due()

    def _drop(self, session: _Session) -> None:
        del self._sessions[session.session_id]
        if (owner := owner_of_key(session.session_id)) is not None:
            self._held[owner] -= 1
            if not self._held[owner]:
                del self._held[owner]
        for feed in list(session.feeds):
            feed.end(VariableChange(session.session_id, "", "expired"))
        session.feeds.clear()

    def _live(self, session_id: str, *, touch: bool = True) -> _Session:
        """The session, slid forward unless ``touch`` is false; NotFound when gone."""
        rules.check_session_id(session_id)
        now = self._expire_due()
        session = self._sessions.get(session_id)
        if session is None or session.expires_at <= now:
            if session is not None:
                self._drop(session)
            raise NotFound(f"session {session_id!r} not found (it may have expired)")
        if touch:
            session.accessed_at = now
        return session

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
        ttl_s = rules.check_ttl(ttl, self.default_ttl, self.limits)
        meta = rules.check_metadata(metadata, self.limits)
        now = self._expire_due()
        existing = self._sessions.get(sid)
        if existing is not None:
            if not get_or_create:
                raise AlreadyExists(f"session {sid!r} already exists")
            existing.accessed_at = now
            return existing.info(), False
        if len(self._sessions) >= self.max_sessions:
            raise ResourceExhausted(
                f"the session store holds its maximum of {self.max_sessions} sessions"
            )
        owner = owner_of_key(sid)
        if owner is not None:
            if self._held[owner] >= self.limits.max_sessions_per_principal:
                raise self.limits.principal_full(owner, self._held[owner])
            self._held[owner] += 1
        session = _Session(sid, next(self._gens), now, now, ttl_s, meta)
        self._sessions[sid] = session
        heapq.heappush(self._heap, (session.expires_at, session.gen, sid))
        self._arm(now)
        return session.info(), True

    async def get_session(self, session_id: str) -> SessionInfo:
        return self._live(session_id).info()

    async def touch_session(self, session_id: str, *, worker_id: str | None = None) -> SessionInfo:
        session = self._live(session_id)
        if worker_id is not None:
            session.worker_id = worker_id
        return session.info()

    async def delete_session(self, session_id: str) -> bool:
        rules.check_session_id(session_id)
        self._expire_due()
        session = self._sessions.get(session_id)
        if session is None:
            return False
        self._drop(session)
        return True

    async def list_sessions(self) -> list[SessionInfo]:
        self._expire_due()
        return [session.info() for session in self._sessions.values()]

    async def existing(self, session_ids: Sequence[str]) -> set[str]:
        self._expire_due()
        return {sid for sid in session_ids if sid in self._sessions}

    # Variables ------------------------------------------------------------------------------
    def _write(
        self,
        session: _Session,
        name: str,
        decl: rules.Declaration,
        prepared: tuple[Any, bytes],
    ) -> Variable:
        checked, data = prepared
        checked = rules.written_value(checked, data, decl.type)
        now: float = self.clock()
        old = session.variables.get(name)
        if old is None:
            var = _Var(decl, data, 1, now, now)
            session.variables[name] = var
        else:
            var = old
            session.value_bytes -= len(old.data)
            var.decl, var.data, var.version, var.updated_at = decl, data, old.version + 1, now
        session.value_bytes += len(data)
        view = var.view(name, checked)
        self._publish(session, VariableChange(session.session_id, name, "set", view, len(data)))
        return view

    def _publish(self, session: _Session, change: VariableChange) -> None:
        for feed in list(session.feeds):
            feed.push(change)

    def _var(self, session: _Session, name: str) -> _Var:
        var = session.variables.get(rules.check_name(name))
        if var is None:
            raise NotFound(f"variable {name!r} not found in session {session.session_id!r}")
        return var

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
        rules.check_name(name)
        decl = rules.Declaration.new(type_name, constraints, metadata, self.limits)
        _, checked, data = await rules.check_value(decl, value, name, self.limits)
        session = self._live(session_id)
        session.check_growth(self.limits, {name: data})
        return self._write(session, name, decl, (checked, data))

    async def get_variable(self, session_id: str, name: str) -> Variable:
        session = self._live(session_id)
        return self._var(session, name).view(name)

    async def get_variables(self, session_id: str, names: Sequence[str]) -> dict[str, Variable]:
        session = self._live(session_id)
        return {name: self._var(session, name).view(name) for name in names}

    async def set_variable(
        self,
        session_id: str,
        name: str,
        value: Any,
        *,
        expected_version: int | None = None,
        type_name: str | None = None,
    ) -> Variable:
        rules.check_name(name)
        for _ in range(_DECL_ATTEMPTS):
            session, decl = self._declaration(session_id, name, expected_version)
            checked = await rules.check_value(decl, value, name, self.limits, type_name)
            if isinstance(value, rules.Encoded):
                # Checked in a helper process: look again at what it was checked against
                # (a small value was checked without awaiting, so nothing moved meanwhile).
                session, now = self._declaration(session_id, name, expected_version)
                if now is not decl:
                    continue
            session.check_growth(self.limits, {name: checked[2]})
            return self._write(session, name, checked[0], checked[1:])
        raise FailedPrecondition(f"variable {name!r} was re-declared concurrently too often")

    def _declaration(
        self, session_id: str, name: str, expected_version: int | None
    ) -> tuple[_Session, rules.Declaration | None]:
        """The session and the declaration a write of ``name`` is checked against (None: a
        new variable's)."""
        session = self._live(session_id)
        return session, self._declared(session, name, expected_version)

    @staticmethod
    def _declared(
        session: _Session, name: str, expected_version: int | None = None
    ) -> rules.Declaration | None:
        old = session.variables.get(name)
        if old is None:
            if expected_version:
                raise NotFound(f"variable {name!r} not found in session {session.session_id!r}")
            return None
        if expected_version is not None and expected_version != old.version:
            raise FailedPrecondition(
                f"variable {name!r} is at version {old.version}, not {expected_version}"
            )
        return old.decl

    async def set_variables(
        self, session_id: str, values: Mapping[str, Any]
    ) -> dict[str, Variable]:
        for name in values:
            rules.check_name(name)
        for _ in range(_DECL_ATTEMPTS):
            session = self._live(session_id)
            decls = {name: self._declared(session, name) for name in values}
            staged = [
                (name, await rules.check_value(decls[name], value, name, self.limits))
                for name, value in values.items()
            ]
            if any(isinstance(value, rules.Encoded) for value in values.values()):
                # Checked in helper processes: look again (see set_variable).
                session = self._live(session_id)
                if any(self._declared(session, n) is not decls[n] for n in values):
                    continue
            session.check_growth(self.limits, {name: checked[2] for name, checked in staged})
            return {
                name: self._write(session, name, checked[0], checked[1:])
                for name, checked in staged
            }
        raise FailedPrecondition("variables were re-declared concurrently too often")

    async def delete_variable(self, session_id: str, name: str) -> bool:
        session = self._live(session_id)
        old = session.variables.pop(rules.check_name(name), None)
        if old is None:
            return False
        session.value_bytes -= len(old.data)
        self._publish(session, VariableChange(session_id, name, "deleted"))
        return True

    async def list_variables(self, session_id: str) -> list[Variable]:
        session = self._live(session_id)
        return [var.view(name) for name, var in session.variables.items()]

    async def increment(self, session_id: str, name: str, by: int | float = 1) -> Variable:
        rules.check_name(name)
        session = self._live(session_id)
        old = session.variables.get(name)
        kind = rules.increment_type(by, name, old.decl.type if old else None)
        if old is None:
            decl = rules.Declaration.new(kind)
            prepared = decl.prepare(by, name, self.limits)
            session.check_growth(self.limits, {name: prepared[1]})
            return self._write(session, name, decl, prepared)
        total = rules.add(rules.load_bytes(old.data), by, kind)
        return self._write(session, name, old.decl, old.decl.prepare(total, name, self.limits))

    # Watch ----------------------------------------------------------------------------------
    def watch(self, session_id: str, names: Sequence[str] | None = None) -> ChangeFeed:
        return _MemoryFeed(self, session_id, names)

    # Housekeeping ---------------------------------------------------------------------------
    async def stats(self) -> StoreStats:
        self._expire_due()
        return StoreStats(
            backend=self.backend,
            sessions=len(self._sessions),
            max_sessions=self.max_sessions,
            default_ttl=self.default_ttl,
            extra={"variables": sum(len(s.variables) for s in self._sessions.values())},
        )

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for session in list(self._sessions.values()):
            for feed in list(session.feeds):
                feed.end(None)
            session.feeds.clear()


class _MemoryFeed(ChangeFeed):
    """A subscriber's queue; the store pushes into it synchronously as changes happen."""

    def __init__(self, store: MemoryStore, session_id: str, names: Sequence[str] | None) -> None:
        self._store = store
        self._session_id = session_id
        self._names = frozenset(names) if names else None
        self._queue: asyncio.Queue[object] = asyncio.Queue()
        self._session: _Session | None = None
        self._started = False
        self._closed = False
        self._overflowed = False
        self._backlog_bytes = 0
        self._counted = False

    async def ready(self) -> None:
        if self._started or self._closed:
            return
        store = self._store
        session = store._live(self._session_id, touch=False)
        store.watchers.take(self._session_id)
        self._counted = True
        session.feeds.append(self)
        self._session = session
        self._started = True

    def push(self, change: VariableChange) -> None:
        if self._names is not None and change.name not in self._names:
            return
        if (
            self._queue.qsize() >= self._store.watch_backlog
            or self._backlog_bytes + change.size > self._store.limits.watch_backlog_bytes
        ):
            self._overflowed = True
            self._detach()
            self._queue.put_nowait(_END)
            return
        self._backlog_bytes += change.size
        self._queue.put_nowait(change)

    def end(self, change: VariableChange | None) -> None:
        """The session went away (``change`` says so) or the store closed (None)."""
        if change is not None:
            self._queue.put_nowait(change)
        self._queue.put_nowait(_END)
        self._session = None
        self._uncount()

    def _detach(self) -> None:
        if self._session is not None and self in self._session.feeds:
            self._session.feeds.remove(self)
        self._session = None
        self._uncount()

    def _uncount(self) -> None:
        if self._counted:
            self._counted = False
            self._store.watchers.give_back(self._session_id)

    async def __anext__(self) -> VariableChange:
        await self.ready()
        if self._overflowed:
            raise ResourceExhausted(
                f"watch of session {self._session_id!r} fell more than "
                f"{self._store.watch_backlog} changes or "
                f"{self._store.limits.watch_backlog_bytes} bytes behind"
            )
        item = await self._queue.get()
        if isinstance(item, VariableChange):
            self._backlog_bytes -= item.size
        if item is _END:
            self._closed = True
            if self._overflowed:
                raise ResourceExhausted(
                    f"watch of session {self._session_id!r} fell more than "
                    f"{self._store.watch_backlog} changes behind"
                )
            raise StopAsyncIteration
        assert isinstance(item, VariableChange)
        return item

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._detach()
        self._queue.put_nowait(_END)
