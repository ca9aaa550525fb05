"""The session and variable RPCs of BridgeService, served from any SessionStore.

The router mounts these handlers next to its own tool-forwarding handlers (``method_handlers``
gives them in the form ``grpc.method_handlers_generic_handler`` takes). Every failure leaves
as its status code plus an ErrorDetail (``abort_with``), so a RemoteStore on the other side
raises the same ``snakepit.errors`` exception the store raised here.

Every method first asks the ``Gate`` who calls, then works on that principal's store keys
(``security.identity.session_key``): another principal's session is simply not there (NOT_FOUND),
and ListSessions shows a caller its own sessions only (all of them to an admin).

Before a unary request is even parsed, its caller takes one of its store-call slots
(``--max-store-calls-per-principal``, a ``PrincipalShares``), held until the RPC has ended (its
answer sent): one principal's flood then has at most that many requests doing work on the
router's event loop, and the rest wait on a future, costing the loop nothing, in that
principal's own bounded line. It then waits for its turn under the principal's rate
(``--store-call-rate-per-principal``, a ``PrincipalRates``): a flood's calls are spread out on
timers instead of answered back to back, so the loop's time stays free for other callers.
Anonymous callers (auth off: everyone) are not counted.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, TypeAlias, TypeVar

import grpc
from google.protobuf.message import Message

from ..errors import InvalidArgument, ResourceExhausted
from ..protocol import SERVICE_NAME, Constraints, decode_value, pb
from ..protocol import handlers as handlers_for
from ..protocol.status import abort_with, hide_internal
from ..protocol.wire import WireMessage
from ..router.shares import PrincipalRates, PrincipalShares
from ..security.gate import Gate
from ..security.identity import Principal, session_id_of, session_key
from . import rules
from .base import SessionInfo, SessionStore, Variable, VariableChange
from .limits import StoreLimits
from .offload import ValueHelpers

# Initial metadata a WatchVariables call sends once its subscription is in place.
WATCH_READY_KEY = "snakepit-watch-ready"

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Req = TypeVar("Req")
Resp = TypeVar("Resp")
Handler = Callable[["StoreService", Req, Context, Principal], Awaitable[Resp]]

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
    """Turn any exception of a method into its status code and ErrorDetail."""

    @functools.wraps(fn)
    async def handler(self: StoreService, request: Req, context: Context, who: Principal) -> Resp:
        try:
            return await fn(self, request, context, who)
        except Exception as exc:
            await abort_with(context, hide_internal(exc))
            raise  # abort_with has already ended the call by raising; this is for type checkers

    return handler


def _sid(who: Principal, session_id: str) -> str:
    """The store key of the caller's session ``session_id`` (checked first, as the caller sent it)."""
    return session_key(who, rules.check_session_id(session_id))


def _session(who: Principal, info: SessionInfo) -> pb.Session:
    """``info`` as its caller knows it: by the id it chose, not the store key."""
    msg = info.to_proto()
    msg.session_id = session_id_of(who, info.session_id) or info.session_id
    return msg


# Room for a value's framing (type name, tensor header) above the limit on its stored bytes.
_VALUE_SLACK = 4096
# Payloads that decode by copying, not parsing.
_COPIED = ("raw", "tensor")
# Encoded watch updates kept for the other watchers of the same change.
_SHARED_UPDATES = 64
# The field number of ``variable`` in the VariableUpdate message.
_UPDATE_VARIABLE = 4


def _value(
    msg: Any, field: str, what: str, limits: StoreLimits, helpers: ValueHelpers | None = None
) -> Any:
    if not msg.HasField(field):
        raise InvalidArgument(f"{what}: no value given")
    return _decode(getattr(msg, field), what, limits, helpers)


def _decode(
    value: pb.Value, what: str, limits: StoreLimits, helpers: ValueHelpers | None = None
) -> Any:
    """The value of a request, refused from its size before it is decoded (which would cost
    the event loop time in proportion): bytes and tensors up to ``max_value_bytes``, values
    parsed element by element (JSON, lists, maps) up to ``max_parsed_value_bytes``.

    A value above the helpers' threshold is not decoded here at all: it goes to the store as
    ``rules.Encoded``, which the store has the helper processes decode, check and re-encode.
    The value is serialised once, for its size too (upb's ``ByteSize`` serialises it as well:
    36 ms of the loop for 15 MB).
    """
    data = value.SerializeToString()
    size = len(data)
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
            "(--max-parsed-value-bytes; store large data as bytes or a tensor)"
        )
    if helpers is not None and size > helpers.threshold:
        return rules.Encoded(data, what, helpers)
    try:
        return decode_value(data)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{what}: {exc.message}") from None


def update_of(change: VariableChange, session_id: str | None = None) -> bytes:
    """``change`` as a serialised VariableUpdate, naming the session ``session_id`` (default:
    its store key); the variable's stored bytes are spliced in, never decoded."""
    head = pb.VariableUpdate(
        session_id=change.session_id if session_id is None else session_id,
        name=change.name,
        kind=change.kind,
    )
    msg = WireMessage()
    msg.add_raw(head.SerializeToString())
    if change.variable is not None:
        msg.add_message(_UPDATE_VARIABLE, change.variable.wire())
    return msg.to_bytes()


def _answer(variables: Iterable[Variable]) -> bytes:
    """A serialised VariableResponse or VariablesResponse (both hold their variables in
    field 1), built from the stored bytes without decoding them."""
    msg = WireMessage()
    for var in variables:
        msg.add_message(1, var.wire())
    return msg.to_bytes()


class StoreService:
    """BridgeService's session and variable methods over ``store``."""

    def __init__(
        self,
        store: SessionStore,
        gate: Gate | None = None,
        helpers: ValueHelpers | None = None,
        shares: PrincipalShares | None = None,
        rates: PrincipalRates | None = None,
    ) -> None:
        self.store = store
        self.helpers = helpers
        self.gate = gate or Gate()
        # Store calls in flight per authenticated principal (None or limit 0: no bound).
        self.shares = shares if shares is not None and shares.limit > 0 else None
        # Store calls a second per authenticated principal (None or rate 0: no bound).
        self.rates = rates if rates is not None and rates.rate > 0 else None
        self.limits = store.limits
        # Largest store request parsed at all: a SetVariables may fill a whole session.
        self.max_request_bytes = store.limits.max_session_bytes + (1 << 20)
        self._updates: collections.OrderedDict[int, tuple[VariableChange, bytes]] = (
            collections.OrderedDict()
        )

    def encoded_update(self, change: VariableChange, session_id: str | None = None) -> bytes:
        """``change`` as a serialised VariableUpdate, encoded once for all its watchers (who all
        watch the same store key, so all know its session by the same ``session_id``)."""
        key = id(change)
        cached = self._updates.get(key)
        if cached is not None and cached[0] is change:
            return cached[1]
        data = update_of(change, session_id)
        self._updates[key] = (change, data)  # the change is kept, so its id is not reused
        if len(self._updates) > _SHARED_UPDATES:
            self._updates.popitem(last=False)
        return data

    async def admit(self, context: Context) -> Principal:
        """Who calls, once it holds one of its store-call slots (waiting for one in its line
        if need be); the slot goes back when the RPC ends, answer sent or not. Refusals
        (unauthenticated, line full, waited too long) end the call with their status."""
        try:
            who = await self.gate.authenticate(context.invocation_metadata())
            shares = self.shares
            if shares is not None and not who.anonymous:
                await shares.acquire(who.name, context.time_remaining())
                context.add_done_callback(lambda _ctx: shares.release(who.name))
            if self.rates is not None and not who.anonymous:
                await self.rates.wait(who.name, context.time_remaining())
            return who
        except Exception as exc:
            await abort_with(context, hide_internal(exc))
            raise  # abort_with has already ended the call by raising; this is for type checkers

    # Sessions -------------------------------------------------------------------------------
    @_unary
    async def InitializeSession(
        self, request: pb.InitializeSessionRequest, context: Context, who: Principal
    ) -> pb.InitializeSessionResponse:
        # The id is chosen here, so that the store key it gets is the caller's.
        session_id = request.session_id or rules.new_session_id()
        info, created = await self.store.create_session(
            _sid(who, session_id),
            ttl=request.ttl_seconds or None,
            metadata=dict(request.metadata),
            get_or_create=request.get_or_create,
        )
        return pb.InitializeSessionResponse(session=_session(who, info), created=created)

    @_unary
    async def GetSession(
        self, request: pb.GetSessionRequest, context: Context, who: Principal
    ) -> pb.GetSessionResponse:
        info = await self.store.get_session(_sid(who, request.session_id))
        return pb.GetSessionResponse(session=_session(who, info))

    @_unary
    async def CleanupSession(
        self, request: pb.CleanupSessionRequest, context: Context, who: Principal
    ) -> pb.CleanupSessionResponse:
        deleted = await self.store.delete_session(_sid(who, request.session_id))
        return pb.CleanupSessionResponse(deleted=deleted)

    @_unary
    async def Heartbeat(
        self, request: pb.HeartbeatRequest, context: Context, who: Principal
    ) -> pb.HeartbeatResponse:
        info = await self.store.touch_session(_sid(who, request.session_id))
        return pb.HeartbeatResponse(session=_session(who, info))

    @_unary
    async def ListSessions(
        self, request: pb.ListSessionsRequest, context: Context, who: Principal
    ) -> pb.ListSessionsResponse:
        sessions = await self.store.list_sessions()
        if who.admin:  # every session, by its store key (which names its owner)
            return pb.ListSessionsResponse(sessions=[info.to_proto() for info in sessions])
        return pb.ListSessionsResponse(
            sessions=[
                _session(who, info)
                for info in sessions
                if session_id_of(who, info.session_id) is not None
            ]
        )

    # Variables ------------------------------------------------------------------------------
    @_unary
    async def RegisterVariable(
        self, request: pb.RegisterVariableRequest, context: Context, who: Principal
    ) -> bytes:
        what = f"RegisterVariable {request.name!r}"
        value = (
            _value(request, "value", what, self.limits, self.helpers)
            if request.type != "null"
            else None
        )
        var = await self.store.register_variable(
            _sid(who, request.session_id),
            rules.check_name(request.name),
            request.type,
            value,
            constraints=Constraints.from_proto(request.constraints),
            metadata=dict(request.metadata),
        )
        return _answer((var,))

    @_unary
    async def GetVariable(
        self, request: pb.GetVariableRequest, context: Context, who: Principal
    ) -> bytes:
        var = await self.store.get_variable(_sid(who, request.session_id), request.name)
        return _answer((var,))

    @_unary
    async def SetVariable(
        self, request: pb.SetVariableRequest, context: Context, who: Principal
    ) -> bytes:
        value = _value(request, "value", f"SetVariable {request.name!r}", self.limits, self.helpers)
        var = await self.store.set_variable(
            _sid(who, request.session_id),
            request.name,
            value,
            expected_version=(
                request.expected_version if request.HasField("expected_version") else None
            ),
            type_name=request.type or None,
        )
        return _answer((var,))

    @_unary
    async def GetVariables(
        self, request: pb.GetVariablesRequest, context: Context, who: Principal
    ) -> bytes:
        # Each name once: repeated names would make a small request ask for many copies.
        names = list(dict.fromkeys(request.names))
        if len(names) > self.store.limits.max_variables:
            raise InvalidArgument(
                f"GetVariables asks for {len(names)} names; a session holds at most "
                f"{self.store.limits.max_variables} variables"
            )
        found = await self.store.get_variables(_sid(who, request.session_id), names)
        return _answer(found.values())

    @_unary
    async def SetVariables(
        self, request: pb.SetVariablesRequest, context: Context, who: Principal
    ) -> bytes:
        sid = _sid(who, request.session_id)
        values = {}
        for name, msg in request.values.items():
            values[name] = _decode(msg, f"SetVariables {name!r}", self.limits, self.helpers)
        written = await self.store.set_variables(sid, values)
        return _answer(written.values())

    @_unary
    async def ListVariables(
        self, request: pb.ListVariablesRequest, context: Context, who: Principal
    ) -> bytes:
        found = await self.store.list_variables(_sid(who, request.session_id))
        return _answer(found)

    @_unary
    async def DeleteVariable(
        self, request: pb.DeleteVariableRequest, context: Context, who: Principal
    ) -> pb.DeleteVariableResponse:
        deleted = await self.store.delete_variable(_sid(who, request.session_id), request.name)
        return pb.DeleteVariableResponse(deleted=deleted)

    @_unary
    async def IncrementVariable(
        self, request: pb.IncrementVariableRequest, context: Context, who: Principal
    ) -> bytes:
        by = (
            _value(request, "by", f"IncrementVariable {request.name!r}", self.limits)
            if request.HasField("by")
            else 1
        )
        var = await self.store.increment(_sid(who, request.session_id), request.name, by)
        return _answer((var,))

    async def WatchVariables(
        self, request: pb.WatchVariablesRequest, context: Context
    ) -> AsyncIterator[bytes]:
        try:
            who = await self.gate.authenticate(context.invocation_metadata())
            feed = self.store.watch(_sid(who, request.session_id), list(request.names) or None)
            await feed.ready()
        except Exception as exc:
            await abort_with(context, hide_internal(exc))
            return
        try:
            await context.send_initial_metadata(((WATCH_READY_KEY, "1"),))
            async for change in feed:
                yield self.encoded_update(change, request.session_id)
        except Exception as exc:
            await abort_with(context, hide_internal(exc))
        finally:
            await feed.aclose()


def _admitted(
    service: StoreService, method: Handler[Any, Any], request_type: type[Message]
) -> grpc.RpcMethodHandler[Any, Any]:
    """A unary store RPC: the caller is admitted (``StoreService.admit``) before its request
    is parsed, then the request is parsed and the method runs."""
    max_bytes = service.max_request_bytes

    async def handler(raw: bytes, context: Context) -> bytes:
        who = await service.admit(context)
        request = await handlers_for.parse(raw, request_type, context, max_bytes)
        response = await method(service, request, context, who)
        return response if isinstance(response, bytes) else response.SerializeToString()

    return grpc.unary_unary_rpc_method_handler(handler)


def method_handlers(service: StoreService) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
    """The RPC handlers of ``STORE_METHODS``, keyed by method name (not the full path)."""
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for name, (request, _response, streaming) in _METHODS.items():
        if streaming:
            handlers[name] = handlers_for.unary_stream(
                getattr(service, name), request, service.max_request_bytes
            )
        else:
            handlers[name] = _admitted(service, getattr(StoreService, name), request)
    return handlers


def generic_handler(service: StoreService) -> grpc.GenericRpcHandler:
    """A handler serving only the store's methods (tests, or a store-only server)."""
    return grpc.method_handlers_generic_handler(SERVICE_NAME, method_handlers(service))
