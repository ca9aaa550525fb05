"""The session store behind a gRPC server (the router, in the embedded default).

Workers that cannot or should not reach Redis use this: the same SessionStore interface, each
method one BridgeService RPC. Status codes and ErrorDetails come back as the exceptions the
server-side store raised (``error_from_rpc``), so tool code cannot tell the difference.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from ..errors import InvalidArgument
from ..grpc_options import channel_options
from ..protocol import Constraints, pb, pb_grpc, to_pb
from ..protocol.constraints import EMPTY
from ..protocol.status import SESSION_ID_KEY, error_from_rpc, error_from_status
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
from .service import WATCH_READY_KEY

DEFAULT_TIMEOUT = 30.0


def _value(value: Any, type_name: str | None = None) -> pb.Value:
    """Values travel binary above zero bytes for arrays: exact, and no JSON for big tensors."""
    return to_pb(value, type_name, threshold=0)


class RemoteStore(SessionStore):
    backend = "remote"

    def __init__(
        self,
        target: str | None = None,
        *,
        channel: grpc.aio.Channel | None = None,
        default_ttl: float = DEFAULT_SESSION_TTL,
        max_sessions: int = DEFAULT_MAX_SESSIONS,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        super().__init__(default_ttl=default_ttl, max_sessions=max_sessions)
        if channel is None and not target:
            raise InvalidArgument("a remote session store needs a target address or a channel")
        self.target = target or ""
        self.timeout = timeout
        self._channel = channel
        self._owns_channel = channel is None
        self._stub: pb_grpc.BridgeServiceStub | None = None
        # Sent with every call: e.g. the ticket of the tool call a worker's store calls serve.
        self.metadata: tuple[tuple[str, str], ...] = ()

    def on_behalf(self, metadata: Sequence[tuple[str, str]]) -> RemoteStore:
        """This store over the same channel, its calls carrying ``metadata`` (a worker's
        store calls carry the ticket of the call they serve, so the router knows for whom)."""
        self.stub  # noqa: B018 - the channel is made here, once, and shared by every view
        view = copy.copy(self)
        view.metadata = tuple(metadata)
        view._owns_channel = False
        return view

    def _metadata(self, session_id: str) -> tuple[tuple[str, str], ...]:
        return (*self.metadata, (SESSION_ID_KEY, session_id)) if session_id else self.metadata

    @property
    def stub(self) -> pb_grpc.BridgeServiceStub:
        """Created on first use, inside the event loop that will use the channel."""
        if self._stub is None:
            if self._channel is None:
                self._channel = grpc.aio.insecure_channel(self.target, options=channel_options())
            self._stub = pb_grpc.BridgeServiceStub(self._channel)
        return self._stub

    async def _call(self, method: Any, request: Any, session_id: str = "") -> Any:
        try:
            return await method(
                request, timeout=self.timeout, metadata=self._metadata(session_id) or None
            )
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None

    # Sessions -------------------------------------------------------------------------------
    async def create_session(
        self,
        session_id: str | None = None,
        *,
        ttl: float | None = None,
        metadata: Mapping[str, str] | None = None,
        get_or_create: bool = False,
    ) -> tuple[SessionInfo, bool]:
        request = pb.InitializeSessionRequest(
            session_id=session_id or "",
            ttl_seconds=ttl or 0.0,
            metadata=dict(metadata or {}),
            get_or_create=get_or_create,
        )
        reply = await self._call(self.stub.InitializeSession, request, session_id or "")
        return SessionInfo.from_proto(reply.session), reply.created

    async def get_session(self, session_id: str) -> SessionInfo:
        request = pb.GetSessionRequest(session_id=session_id)
        reply = await self._call(self.stub.GetSession, request, session_id)
        return SessionInfo.from_proto(reply.session)

    async def touch_session(self, session_id: str, *, worker_id: str | None = None) -> SessionInfo:
        # The wire's Heartbeat carries no worker id: the router records that itself.
        request = pb.HeartbeatRequest(session_id=session_id)
        reply = await self._call(self.stub.Heartbeat, request, session_id)
        return SessionInfo.from_proto(reply.session)

    async def delete_session(self, session_id: str) -> bool:
        request = pb.CleanupSessionRequest(session_id=session_id)
        reply = await self._call(self.stub.CleanupSession, request, session_id)
        return bool(reply.deleted)

    async def list_sessions(self) -> list[SessionInfo]:
        reply = await self._call(self.stub.ListSessions, pb.ListSessionsRequest())
        return [SessionInfo.from_proto(msg) for msg in reply.sessions]

    async def existing(self, session_ids: Sequence[str]) -> set[str]:
        # No RPC of its own: the listing does not touch sessions. Routers, the only callers of
        # `existing`, hold a memory or Redis store, never this one.
        wanted = set(session_ids)
        return {info.session_id for info in await self.list_sessions() if info.session_id in wanted}

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
        request = pb.RegisterVariableRequest(
            session_id=session_id,
            name=name,
            type=type_name,
            constraints=constraints.to_proto(),
            metadata=dict(metadata or {}),
        )
        # The value is checked against the declared type by the server, not here.
        request.value.CopyFrom(_value(value))
        reply = await self._call(self.stub.RegisterVariable, request, session_id)
        return Variable.from_proto(reply.variable)

    async def get_variable(self, session_id: str, name: str) -> Variable:
        request = pb.GetVariableRequest(session_id=session_id, name=name)
        reply = await self._call(self.stub.GetVariable, request, session_id)
        return Variable.from_proto(reply.variable)

    async def get_variables(self, session_id: str, names: Sequence[str]) -> dict[str, Variable]:
        request = pb.GetVariablesRequest(session_id=session_id, names=list(names))
        reply = await self._call(self.stub.GetVariables, request, session_id)
        found = [Variable.from_proto(msg) for msg in reply.variables]
        return {var.name: var for var in found}

    async def set_variable(
        self,
        session_id: str,
        name: str,
        value: Any,
        *,
        expected_version: int | None = None,
        type_name: str | None = None,
    ) -> Variable:
        request = pb.SetVariableRequest(session_id=session_id, name=name, type=type_name or "")
        request.value.CopyFrom(_value(value))
        if expected_version is not None:
            request.expected_version = expected_version
        reply = await self._call(self.stub.SetVariable, request, session_id)
        return Variable.from_proto(reply.variable)

    async def set_variables(
        self, session_id: str, values: Mapping[str, Any]
    ) -> dict[str, Variable]:
        request = pb.SetVariablesRequest(session_id=session_id)
        for name, value in values.items():
            request.values[name].CopyFrom(_value(value))
        reply = await self._call(self.stub.SetVariables, request, session_id)
        found = [Variable.from_proto(msg) for msg in reply.variables]
        return {var.name: var for var in found}

    async def delete_variable(self, session_id: str, name: str) -> bool:
        request = pb.DeleteVariableRequest(session_id=session_id, name=name)
        reply = await self._call(self.stub.DeleteVariable, request, session_id)
        return bool(reply.deleted)

    async def list_variables(self, session_id: str) -> list[Variable]:
        request = pb.ListVariablesRequest(session_id=session_id)
        reply = await self._call(self.stub.ListVariables, request, session_id)
        return [Variable.from_proto(msg) for msg in reply.variables]

    async def increment(self, session_id: str, name: str, by: int | float = 1) -> Variable:
        rules.increment_type(by, name, None)  # refuse a non-number before it travels
        request = pb.IncrementVariableRequest(session_id=session_id, name=name)
        request.by.CopyFrom(_value(by))
        reply = await self._call(self.stub.IncrementVariable, request, session_id)
        return Variable.from_proto(reply.variable)

    # Watch ----------------------------------------------------------------------------------
    def watch(self, session_id: str, names: Sequence[str] | None = None) -> ChangeFeed:
        return RemoteFeed(self, session_id, names)

    # Housekeeping ---------------------------------------------------------------------------
    async def stats(self) -> StoreStats:
        sessions = await self.list_sessions()
        return StoreStats(
            backend=self.backend,
            sessions=len(sessions),
            max_sessions=self.max_sessions,
            default_ttl=self.default_ttl,
            extra={"target": self.target},
        )

    async def close(self) -> None:
        if self._owns_channel and self._channel is not None:
            await self._channel.close()
        self._channel = None
        self._stub = None


class RemoteFeed(ChangeFeed):
    """A WatchVariables call; the server's initial metadata says it has subscribed."""

    def __init__(self, store: RemoteStore, session_id: str, names: Sequence[str] | None) -> None:
        self._store = store
        self._request = pb.WatchVariablesRequest(session_id=session_id, names=list(names or ()))
        self._session_id = session_id
        self._call: Any = None
        self._closed = False

    async def ready(self) -> None:
        if self._call is not None or self._closed:
            return
        metadata = self._store._metadata(self._session_id)
        self._call = self._store.stub.WatchVariables(self._request, metadata=metadata)
        try:
            initial = await self._call.initial_metadata()
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        if not any(key == WATCH_READY_KEY for key, _ in initial or ()):
            call = self._call
            raise error_from_status(
                await call.code(), await call.details(), await call.trailing_metadata()
            )

    async def __anext__(self) -> VariableChange:
        await self.ready()
        if self._closed:
            raise StopAsyncIteration
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            if self._closed and exc.code() == grpc.StatusCode.CANCELLED:
                raise StopAsyncIteration from None
            raise error_from_rpc(exc) from None
        if msg is grpc.aio.EOF:
            self._closed = True
            raise StopAsyncIteration
        variable = Variable.from_proto(msg.variable) if msg.HasField("variable") else None
        return VariableChange(msg.session_id, msg.name, msg.kind, variable)

    async def aclose(self) -> None:
        self._closed = True
        if self._call is not None:
            self._call.cancel()
