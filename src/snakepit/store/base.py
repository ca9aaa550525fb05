"""The session store contract every backend keeps (memory, Redis, remote through the router).

Semantics shared by all backends, which the contract tests in ``tests/integration/test_store_*``
hold them to:

- A session has a sliding TTL: every operation on it (including reads of its variables) moves its
  expiry to ``now + ttl``. When it expires, it and all its variables disappear together.
- At most ``max_sessions`` live sessions; creating one more raises ResourceExhausted. The
  ``StoreLimits`` (``limits.py``) bound TTLs, metadata, values, variables and bytes per session
  and watchers; a write that would break one raises ResourceExhausted and changes nothing.
- Every variable has a declared type (given, or inferred from its first value) and optional
  constraints. A write that breaks them raises InvalidArgument and leaves the stored value as
  it was.
- Every write bumps the variable's version by one; ``expected_version`` turns a write into a
  compare-and-set that raises FailedPrecondition when the version moved.
- Multi-variable writes are all-or-nothing. ``increment`` is atomic.
- Operations on an unknown or expired session raise NotFound; an unknown variable raises NotFound.
- A backend that cannot reach its server raises Unavailable, never returns stale or empty data.
"""

from __future__ import annotations

import dataclasses
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ..protocol import Constraints, encode_value, from_pb, pb
from ..protocol.constraints import EMPTY
from ..protocol.wire import WireMessage
from . import rules
from .limits import DEFAULT_LIMITS, StoreLimits
from .rules import UNDECODED

DEFAULT_SESSION_TTL = 3600.0
DEFAULT_MAX_SESSIONS = 10_000

_EMPTY_MAP: Mapping[str, str] = MappingProxyType({})
# The field number of ``value`` in the Variable message.
_VARIABLE_VALUE = 3


@dataclass(frozen=True, slots=True)
class SessionInfo:
    session_id: str
    created_at: float
    last_accessed_at: float
    expires_at: float
    ttl_seconds: float
    last_worker_id: str = ""
    metadata: Mapping[str, str] = field(default_factory=lambda: _EMPTY_MAP)
    variable_count: int = 0

    def to_proto(self) -> pb.Session:
        return pb.Session(
            session_id=self.session_id,
            created_at=self.created_at,
            last_accessed_at=self.last_accessed_at,
            expires_at=self.expires_at,
            ttl_seconds=self.ttl_seconds,
            last_worker_id=self.last_worker_id,
            metadata=dict(self.metadata),
            variable_count=self.variable_count,
        )

    @classmethod
    def from_proto(cls, msg: pb.Session) -> SessionInfo:
        return cls(
            session_id=msg.session_id,
            created_at=msg.created_at,
            last_accessed_at=msg.last_accessed_at,
            expires_at=msg.expires_at,
            ttl_seconds=msg.ttl_seconds,
            last_worker_id=msg.last_worker_id,
            metadata=dict(msg.metadata),
            variable_count=msg.variable_count,
        )


class Variable:
    """A variable as a store returns it.

    ``data`` is its stored form, a serialised ``Value`` (``rules.store_bytes``); ``value`` is
    decoded from it on first use. A router that only passes a variable on (``wire``) never
    decodes it, so answering with a 15 MB value costs the event loop a copy, not a parse.
    A variable given only a ``value`` (one read from the wire) encodes it when asked for bytes.
    """

    __slots__ = (
        "_value",
        "constraints",
        "created_at",
        "data",
        "metadata",
        "name",
        "type",
        "updated_at",
        "version",
    )

    def __init__(
        self,
        name: str,
        type: str,
        value: Any = UNDECODED,
        version: int = 0,
        created_at: float = 0.0,
        updated_at: float = 0.0,
        constraints: Constraints = EMPTY,
        metadata: Mapping[str, str] = _EMPTY_MAP,
        *,
        data: bytes | None = None,
    ) -> None:
        if value is UNDECODED and data is None:
            raise TypeError("a Variable needs its value or its stored bytes")
        self.name = name
        self.type = type
        self._value = value
        self.version = version
        self.created_at = created_at
        self.updated_at = updated_at
        self.constraints = constraints
        self.metadata = metadata
        self.data = data

    @property
    def value(self) -> Any:
        if self._value is UNDECODED:
            assert self.data is not None
            self._value = rules.load_bytes(self.data)
        return self._value

    def __repr__(self) -> str:
        shown = "<undecoded>" if self._value is UNDECODED else repr(self._value)[:200]
        return (
            f"Variable(name={self.name!r}, type={self.type!r}, value={shown}, "
            f"version={self.version})"
        )

    def value_bytes(self) -> bytes:
        """The serialised ``Value``: the stored bytes when there are some (no encoding)."""
        if self.data is not None:
            return self.data
        return encode_value(self._value, self.type)

    def wire(self) -> WireMessage:
        """The serialised ``Variable`` as chunks: its small fields through protobuf, its value
        spliced in as it is (field order does not matter to a protobuf reader)."""
        head = pb.Variable(
            name=self.name,
            type=self.type,
            constraints=self.constraints.to_proto(),
            version=self.version,
            created_at=self.created_at,
            updated_at=self.updated_at,
            metadata=dict(self.metadata),
        )
        msg = WireMessage()
        msg.add_raw(head.SerializeToString())
        msg.add_bytes(_VARIABLE_VALUE, self.value_bytes())
        return msg

    def to_proto(self) -> pb.Variable:
        return pb.Variable.FromString(self.wire().to_bytes())

    @classmethod
    def from_proto(cls, msg: pb.Variable) -> Variable:
        return cls(
            name=msg.name,
            type=msg.type,
            value=from_pb(msg.value),
            version=msg.version,
            created_at=msg.created_at,
            updated_at=msg.updated_at,
            constraints=Constraints.from_proto(msg.constraints),
            metadata=dict(msg.metadata),
        )


@dataclass(frozen=True, slots=True)
class VariableChange:
    """One entry of a session's change feed. ``kind``: "set", "deleted" or "expired"."""

    session_id: str
    name: str
    kind: str
    variable: Variable | None = None
    size: int = 0  # bytes of the stored value, what a watcher's backlog counts


class ChangeFeed(AsyncIterator[VariableChange], ABC):
    """What ``SessionStore.watch`` returns: an async iterator that can say when it subscribed.

    ``ready()`` exists because "every change from now on" needs a "now" the caller can wait for:
    a remote backend subscribes over the network, so without it a write issued right after
    ``watch()`` could race the subscription.
    """

    @abstractmethod
    async def ready(self) -> None:
        """Subscribe (once); raise NotFound when the session does not exist."""

    @abstractmethod
    async def aclose(self) -> None:
        """Stop the feed and release what it holds; iteration then ends."""

    def __aiter__(self) -> ChangeFeed:
        return self

    async def __aenter__(self) -> ChangeFeed:
        await self.ready()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


@dataclass(frozen=True, slots=True)
class StoreStats:
    backend: str
    sessions: int
    max_sessions: int
    default_ttl: float
    extra: Mapping[str, Any] = field(default_factory=dict)


class SessionStore(ABC):
    """Sessions and their typed variables; see the module docstring for the shared semantics."""

    backend: str = "abstract"

    def __init__(
        self,
        *,
        default_ttl: float = DEFAULT_SESSION_TTL,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        clock: Any = time.time,
        limits: StoreLimits = DEFAULT_LIMITS,
    ) -> None:
        if default_ttl > limits.max_ttl:  # a configured default is always allowed
            limits = dataclasses.replace(limits, max_ttl=default_ttl)
        self.default_ttl = limits.check_ttl(default_ttl, default_ttl)
        self.max_sessions = max_sessions
        self.clock = clock
        self.limits = limits

    # Sessions ------------------------------------------------------------------------------
    @abstractmethod
    async def create_session(
        self,
        session_id: str | None = None,
        *,
        ttl: float | None = None,
        metadata: Mapping[str, str] | None = None,
        get_or_create: bool = False,
    ) -> tuple[SessionInfo, bool]:
        """Create a session (a random id when none is given); ``(info, created)``.

        An existing id raises AlreadyExists unless ``get_or_create``, which returns it touched.
        """

    @abstractmethod
    async def get_session(self, session_id: str) -> SessionInfo: ...

    @abstractmethod
    async def touch_session(self, session_id: str, *, worker_id: str | None = None) -> SessionInfo:
        """Slide the session's expiry; record the worker that served it last when given."""

    @abstractmethod
    async def delete_session(self, session_id: str) -> bool: ...

    @abstractmethod
    async def list_sessions(self) -> list[SessionInfo]: ...

    @abstractmethod
    async def existing(self, session_ids: Sequence[str]) -> set[str]:
        """Which of ``session_ids`` exist now, without sliding their expiry (a check that
        touched them would keep alive every session it looked at)."""

    # Variables -----------------------------------------------------------------------------
    @abstractmethod
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
        """Declare (or re-declare) a variable's type and constraints, with its value."""

    @abstractmethod
    async def get_variable(self, session_id: str, name: str) -> Variable: ...

    @abstractmethod
    async def get_variables(self, session_id: str, names: Sequence[str]) -> dict[str, Variable]:
        """Several variables in one round trip; NotFound names the first missing one."""

    @abstractmethod
    async def set_variable(
        self,
        session_id: str,
        name: str,
        value: Any,
        *,
        expected_version: int | None = None,
        type_name: str | None = None,
    ) -> Variable:
        """Write a value. A missing variable is created with ``type_name`` or the inferred type."""

    @abstractmethod
    async def set_variables(
        self, session_id: str, values: Mapping[str, Any]
    ) -> dict[str, Variable]:
        """Write several values, all or none."""

    @abstractmethod
    async def delete_variable(self, session_id: str, name: str) -> bool: ...

    @abstractmethod
    async def list_variables(self, session_id: str) -> list[Variable]: ...

    @abstractmethod
    async def increment(self, session_id: str, name: str, by: int | float = 1) -> Variable:
        """Atomically add ``by`` to a numeric variable (created as ``by`` when missing)."""

    @abstractmethod
    def watch(self, session_id: str, names: Sequence[str] | None = None) -> ChangeFeed:
        """Every change to the session's variables from now on, in order, until it ends.

        The feed subscribes on ``await feed.ready()`` (or its first ``__anext__``); changes made
        after ``ready()`` returns are all delivered. It ends with an "expired" change when the
        session goes away, and raises ResourceExhausted if it fell too far behind to be complete.
        """

    # Housekeeping ---------------------------------------------------------------------------
    @abstractmethod
    async def stats(self) -> StoreStats: ...

    async def ping(self) -> None:
        """Raise Unavailable when the store cannot be reached."""
        await self.stats()

    async def close(self) -> None:
        return None
