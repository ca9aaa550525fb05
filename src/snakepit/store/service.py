"""The session and variable RPCs of BridgeService, served from any SessionStore.

The router mounts these handlers next to its own tool-forwarding handlers (``method_handlers``
gives them in the form ``grpc.method_handlers_generic_handler`` takes). Every failure leaves
as its status code plus an ErrorDetail (``abort_with``), so a RemoteStore on the other side
raises the same ``snakepit.errors`` exception the store raised here.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.message import Message

from ..errors import InvalidArgument, ResourceExhausted
from ..protocol import SERVICE_NAME, Constraints, from_pb, pb
from ..protocol import handlers as handlers_for
from ..protocol.status import abort_with, hide_internal
from . import rules
from .base import SessionStore, VariableChange
from .limits import StoreLimits

# Initial metadata a WatchVariables call sends once its subscription is in place.
WATCH_READY_KEY = "snakepit-watch-ready"

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[["StoreService", Req, Context], Awaitable[Resp]]

# name -> (request class, response class, server-streaming)
_METHODS: dict[str, tuple[type[Message], type[Message], bool]] = {
    "InitializeSession": (pb.InitializeSessionRequest, pb.InitializeSessionResponse, False),
    "GetSession": (pb.GetSessionRequest, pb.GetSessionResponse, False),
    "CleanupSession": (pb.CleanupSessionRequest, pb.CleanupSessionResponse, False),
    "Heartbeat": (pb.HeartbeatRequest, pb.HeartbeatResponse, False),
    "ListSessions": (pb.ListSessionsRequest, pb.ListSessionsResponse, False),
    "RegisterVariable": (pb.RegisterVariableRequest, pb.VariableResponse, False),
    "GetVariable": (pb.GetVariableRequest, pb.VariableResponse, False),
    "SetVariable": (pb.SetVariableRequest, pb.VariableResponse, False),
    "GetVariables": (pb.GetVariablesRequest, pb.VariablesResponse, False),
    "SetVariables": (pb.SetVariablesRequest, pb.VariablesResponse, False),
    "ListVariables": (pb.ListVariablesRequest, pb.VariablesResponse, False),
    "DeleteVariable": (pb.DeleteVariableRequest, pb.DeleteVariableResponse, False),
    "IncrementVariable": (pb.IncrementVariableRequest, pb.VariableResponse, False),
    "WatchVariables": (pb.WatchVariablesRequest, pb.VariableUpdate, True),
}
STORE_METHODS: tuple[str, ...] = tuple(_METHODS)


def _unary(fn: Handler[Req, Resp]) -> Handler[Req, Resp]:
    """Turn any exception into its status code and ErrorDetail."""

    @functools.wraps(fn)
    async def handler(self: StoreService, request: Req, context: Context) -> Resp:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            await abort_with(context, hide_internal(exc))
            raise  # abort_with has already ended the call by raising; this is for type checkers

    return handler


def _sid(session_id: str) -> str:
    return rules.check_session_id(session_id)


# Room for a value's framing (type name, tensor header) above the limit on its stored bytes.
_VALUE_SLACK = 4096
# Payloads that decode by copying, not parsing.
_COPIED = ("raw", "tensor")
# Encoded watch updates kept for the other watchers of the same change.
_SHARED_UPDATES = 64


def _value(msg: Any, field: str, what: str, limits: StoreLimits) -> Any:
    if not msg.HasField(field):
        raise InvalidArgument(f"{what}: no value given")
    return _decode(getattr(msg, field), what, limits)


def _decode(value: pb.Value, what: str, limits: StoreLimits) -> Any:
    """The value of a request, refused from its size before it is decoded (which would cost
    the event loop time in proportion): bytes and tensors up to ``max_value_bytes``, values
    parsed element by element (JSON, lists, maps) up to ``max_parsed_value_bytes``."""
    size = value.ByteSize()
    if size > limits.max_value_bytes + _VALUE_SLACK:
        raise ResourceExhausted(
            f"{what}: the value takes {size} bytes, above the limit of "
            f"{limits.max_value_bytes} bytes per value"
        )
    if (
        value.WhichOneof("payload") not in _COPIED
        and size > limits.max_parsed_value_bytes + _VALUE_SLACK
    ):
        raise ResourceExhausted(
            f"{what}: the value takes {size} bytes, above the limit of "
            f"{limits.max_parsed_value_bytes} bytes per string, list or map value "
            "(store large data as bytes or a tensor)"
        )
    try:
        return from_pb(value)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{what}: {exc.message}") from None


def update_of(change: VariableChange) -> pb.VariableUpdate:
    msg = pb.VariableUpdate(session_id=change.session_id, name=change.name, kind=change.kind)
    if change.variable is not None:
        msg.variable.CopyFrom(change.variable.to_proto())
    return msg


class StoreService:
    """BridgeService's session and variable methods over ``store``."""

    def __init__(self, store: SessionStore) -> None:
        self.store = store
        self.limits = store.limits
        # Largest store request parsed at all: a SetVariables may fill a whole session.
        self.max_request_bytes = store.limits.max_session_bytes + (1 << 20)
        self._updates: collections.OrderedDict[int, tuple[VariableChange, bytes]] = (
            collections.OrderedDict()
        )

    def encoded_update(self, change: VariableChange) -> bytes:
        """``change`` as a serialised VariableUpdate, encoded once for all its watchers."""
        key = id(change)
        cached = self._updates.get(key)
        if cached is not None and cached[0] is change:
            return cached[1]
        data = update_of(change).SerializeToString()
        self._updates[key] = (change, data)  # the change is kept, so its id is not reused
        if len(self._updates) > _SHARED_UPDATES:
            self._updates.popitem(last=False)
        return data

    # Sessions -------------------------------------------------------------------------------
    @_unary
    async def InitializeSession(
        self, request: pb.InitializeSessionRequest, context: Context
    ) -> pb.InitializeSessionResponse:
        info, created = await self.store.create_session(
            _sid(request.session_id) if request.session_id else None,
            ttl=request.ttl_seconds or None,
            metadata=dict(request.metadata),
            get_or_create=request.get_or_create,
        )
        return pb.InitializeSessionResponse(session=info.to_proto(), created=created)

    @_unary
    async def GetSession(
        self, request: pb.GetSessionRequest, context: Context
    ) -> pb.GetSessionResponse:
        info = await self.store.get_session(_sid(request.session_id))
        return pb.GetSessionResponse(session=info.to_proto())

    @_unary
    async def CleanupSession(
        self, request: pb.CleanupSessionRequest, context: Context
    ) -> pb.CleanupSessionResponse:
        deleted = await self.store.delete_session(_sid(request.session_id))
        return pb.CleanupSessionResponse(deleted=deleted)

    @_unary
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context
    ) -> pb.HeartbeatResponse:
        info = await self.store.touch_session(_sid(request.session_id))
        return pb.HeartbeatResponse(session=info.to_proto())

    @_unary
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context
    ) -> pb.ListSessionsResponse:
        sessions = await self.store.list_sessions()
        return pb.ListSessionsResponse(sessions=[info.to_proto() for info in sessions])

    # Variables ------------------------------------------------------------------------------
    @_unary
    async def RegisterVariable(
        self, request: pb.RegisterVariableRequest, context: Context
    ) -> pb.VariableResponse:
        what = f"RegisterVariable {request.name!r}"
        value = _value(request, "value", what, self.limits) if request.type != "null" else None
        var = await self.store.register_variable(
            _sid(request.session_id),
            rules.check_name(request.name),
            request.type,
            value,
            constraints=Constraints.from_proto(request.constraints),
            metadata=dict(request.metadata),
        )
        return pb.VariableResponse(variable=var.to_proto())

    @_unary
    async def GetVariable(
        self, request: pb.GetVariableRequest, context: Context
    ) -> pb.VariableResponse:
        var = await self.store.get_variable(_sid(request.session_id), request.name)
        return pb.VariableResponse(variable=var.to_proto())

    @_unary
    async def SetVariable(
        self, request: pb.SetVariableRequest, context: Context
    ) -> pb.VariableResponse:
        value = _value(request, "value", f"SetVariable {request.name!r}", self.limits)
        var = await self.store.set_variable(
            _sid(request.session_id),
            request.name,
            value,
            expected_version=(
                request.expected_version if request.HasField("expected_version") else None
            ),
            type_name=request.type or None,
        )
        return pb.VariableResponse(variable=var.to_proto())

    @_unary
    async def GetVariables(
        self, request: pb.GetVariablesRequest, context: Context
    ) -> pb.VariablesResponse:
        # Each name once: repeated names would make a small request ask for many copies.
        names = list(dict.fromkeys(request.names))
        if len(names) > self.store.limits.max_variables:
            raise InvalidArgument(
                f"GetVariables asks for {len(names)} names; a session holds at most "
                f"{self.store.limits.max_variables} variables"
            )
        found = await self.store.get_variables(_sid(request.session_id), names)
        return pb.VariablesResponse(variables=[var.to_proto() for var in found.values()])

    @_unary
    async def SetVariables(
        self, request: pb.SetVariablesRequest, context: Context
    ) -> pb.VariablesResponse:
        sid = _sid(request.session_id)
        values = {}
        for name, msg in request.values.items():
            values[name] = _decode(msg, f"SetVariables {name!r}", self.limits)
        written = await self.store.set_variables(sid, values)
        return pb.VariablesResponse(variables=[var.to_proto() for var in written.values()])

    @_unary
    async def ListVariables(
        self, request: pb.ListVariablesRequest, context: Context
    ) -> pb.VariablesResponse:
        found = await self.store.list_variables(_sid(request.session_id))
        return pb.VariablesResponse(variables=[var.to_proto() for var in found])

    @_unary
    async def DeleteVariable(
        self, request: pb.DeleteVariableRequest, context: Context
    ) -> pb.DeleteVariableResponse:
        deleted = await self.store.delete_variable(_sid(request.session_id), request.name)
        return pb.DeleteVariableResponse(deleted=deleted)

    @_unary
    async def IncrementVariable(
        self, request: pb.IncrementVariableRequest, context: Context
    ) -> pb.VariableResponse:
        by = (
            _value(request, "by", f"IncrementVariable {request.name!r}", self.limits)
            if request.HasField("by")
            else 1
        )
        var = await self.store.increment(_sid(request.session_id), request.name, by)
        return pb.VariableResponse(variable=var.to_proto())

    async def WatchVariables(
        self, request: pb.WatchVariablesRequest, context: Context
    ) -> AsyncIterator[bytes]:
        try:
            feed = self.store.watch(_sid(request.session_id), list(request.names) or None)
            await feed.ready()
        except Exception as exc:
            await abort_with(context, hide_internal(exc))
            return
        try:
            await context.send_initial_metadata(((WATCH_READY_KEY, "1"),))
            async for change in feed:
                yield self.encoded_update(change)
        except Exception as exc:
            await abort_with(context, hide_internal(exc))
        finally:
            await feed.aclose()


def method_handlers(service: StoreService) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The RPC handlers of ``STORE_METHODS``, keyed by method name (not the full path)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for name, (request, _response, streaming) in _METHODS.items():
        factory = handlers_for.unary_stream if streaming else handlers_for.unary
        handlers[name] = factory(getattr(service, name), request, service.max_request_bytes)
    return handlers


def generic_handler(service: StoreService) -> grpc.GenericRpcHandler:
    """A handler serving only the store's methods (tests, or a store-only server)."""
    return grpc.method_handlers_generic_handler(SERVICE_NAME, method_handlers(service))
