"""Every client operation as data: which RPC, the request bytes, how to read the answer.

The sync and async clients share these builders, so each of their methods is one line that
sends an ``Op`` with its own transport; what a call means is written once, here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message

from ..errors import NotFound
from ..protocol import Constraints, pb, to_pb
from ..protocol.messages import decode_chunk, decode_result, encode_request
from ..protocol.status import CORRELATION_ID_KEY, SESSION_ID_KEY
from ..store.base import SessionInfo, Variable, VariableChange

T = TypeVar("T")
MISSING: Any = object()


@dataclass(frozen=True, slots=True)
class Op(Generic[T]):
    method: str
    request: bytes
    parse: Callable[[bytes], T]
    session_id: str = ""
    is_tool: bool = False
    default: Any = field(default=MISSING)  # returned instead of raising NotFound
    # Sent with this call only: e.g. the ticket a worker's call back to the router carries.
    headers: tuple[tuple[str, str], ...] = ()

    def metadata(self, extra: Iterable[tuple[str, str]] = ()) -> tuple[tuple[str, str], ...]:
        items = [(CORRELATION_ID_KEY, uuid.uuid4().hex[:16]), *extra, *self.headers]
        if self.session_id:
            items.append((SESSION_ID_KEY, self.session_id))
        return tuple(items)

    def recover(self, error: Exception) -> T:
        """The op's answer for ``error``, when it has one (``get`` with a default); else re-raise."""
        if isinstance(error, NotFound) and self.default is not MISSING:
            return self.default  # type: ignore[no-any-return]
        raise error


@dataclass(frozen=True, slots=True)
class ParameterInfo:
    name: str
    type: str
    required: bool
    default: Any = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class ToolInfo:
    name: str
    description: str
    parameters: tuple[ParameterInfo, ...]
    streaming: bool
    uses_context: bool
    caller_hosted: bool = False
    pool_wide: bool = False  # caller-hosted for every session of the pool


def _parser(message_type: type[Message], convert: Callable[[Any], T]) -> Callable[[bytes], T]:
    return lambda raw: convert(message_type.FromString(raw))


def _to_dict(message: Message) -> dict[str, Any]:
    """A message as plain Python values (json_format would turn int64 into strings)."""
    out: dict[str, Any] = {}
    for spec in message.DESCRIPTOR.fields:
        value = getattr(message, spec.name)
        sub = spec.message_type
        if sub is not None and sub.GetOptions().map_entry:
            nested = sub.fields_by_name["value"].message_type is not None
            out[spec.name] = {k: _to_dict(v) if nested else v for k, v in value.items()}
        elif sub is not None:
            out[spec.name] = [_to_dict(v) for v in value] if spec.is_repeated else _to_dict(value)
        else:
            out[spec.name] = list(value) if spec.is_repeated else value
    return out


def _tool_info(spec: pb.ToolSpec) -> ToolInfo:
    from ..protocol import from_pb

    return ToolInfo(
        name=spec.name,
        description=spec.description,
        parameters=tuple(
            ParameterInfo(
                name=p.name,
                type=p.type,
                required=p.required,
                default=from_pb(p.default) if p.HasField("default") else None,
                description=p.description,
            )
            for p in spec.parameters
        ),
        streaming=spec.streaming,
        uses_context=spec.uses_context,
        caller_hosted=spec.caller_hosted,
        pool_wide=spec.pool_wide,
    )


# Tools ------------------------------------------------------------------------------------------
def merge_arguments(args: Mapping[str, Any] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(kwargs)
    if args:
        merged.update(args)
    return merged


def execute(
    tool: str,
    arguments: Mapping[str, Any],
    session_id: str = "",
    threshold: int | None = None,
    *,
    hosted: bool = False,
) -> Op[Any]:
    """A tool call; ``hosted``: a tool hosted by the session's caller (served by the router)."""
    request = encode_request(tool, arguments, session_id, threshold=threshold)
    method = "ExecuteHostedTool" if hosted else "ExecuteTool"
    return Op(method, request, _result_value, session_id, is_tool=not hosted)


def stream(
    tool: str,
    arguments: Mapping[str, Any],
    session_id: str = "",
    threshold: int | None = None,
    *,
    hosted: bool = False,
) -> Op[Any]:
    request = encode_request(tool, arguments, session_id, threshold=threshold)
    method = "ExecuteHostedStreamingTool" if hosted else "ExecuteStreamingTool"
    return Op(method, request, decode_chunk, session_id, is_tool=not hosted)


def _result_value(raw: bytes) -> Any:
    return decode_result(raw).value


def list_tools(session_id: str = "") -> Op[list[ToolInfo]]:
    return Op(
        "ListTools",
        pb.ListToolsRequest(session_id=session_id).SerializeToString(),
        _parser(pb.ListToolsResponse, lambda r: [_tool_info(t) for t in r.tools]),
        is_tool=not session_id,  # the router adds the session's caller-hosted tools
    )


# Pool -------------------------------------------------------------------------------------------
def ping(message: str = "") -> Op[dict[str, Any]]:
    return Op(
        "Ping",
        pb.PingRequest(message=message).SerializeToString(),
        _parser(pb.PingResponse, _to_dict),
    )


def pool_status() -> Op[dict[str, Any]]:
    return Op(
        "GetPoolStatus",
        pb.GetPoolStatusRequest().SerializeToString(),
        _parser(pb.PoolStatus, _to_dict),
    )


def routing_table() -> Op[pb.RoutingTable]:
    return Op(
        "GetRoutingTable",
        pb.GetRoutingTableRequest().SerializeToString(),
        pb.RoutingTable.FromString,
    )


def table_dict(table: pb.RoutingTable) -> dict[str, Any]:
    return _to_dict(table)


# Sessions ---------------------------------------------------------------------------------------
def _session(response: Any) -> SessionInfo:
    return SessionInfo.from_proto(response.session)


def initialize_session(
    session_id: str | None, ttl: float | None, metadata: Mapping[str, str] | None
) -> Op[SessionInfo]:
    request = pb.InitializeSessionRequest(
        session_id=session_id or "",
        ttl_seconds=ttl or 0,
        metadata=dict(metadata or {}),
        get_or_create=True,
    )
    return Op(
        "InitializeSession",
        request.SerializeToString(),
        _parser(pb.InitializeSessionResponse, _session),
    )


def get_session(session_id: str) -> Op[SessionInfo]:
    request = pb.GetSessionRequest(session_id=session_id)
    return Op("GetSession", request.SerializeToString(), _parser(pb.GetSessionResponse, _session))


def heartbeat(session_id: str) -> Op[SessionInfo]:
    request = pb.HeartbeatRequest(session_id=session_id)
    return Op("Heartbeat", request.SerializeToString(), _parser(pb.HeartbeatResponse, _session))


def cleanup_session(session_id: str) -> Op[bool]:
    request = pb.CleanupSessionRequest(session_id=session_id)
    return Op(
        "CleanupSession",
        request.SerializeToString(),
        _parser(pb.CleanupSessionResponse, lambda r: r.deleted),
    )


# Variables --------------------------------------------------------------------------------------
def _variable(response: pb.VariableResponse) -> Variable:
    return Variable.from_proto(response.variable)


def _variables(response: pb.VariablesResponse) -> dict[str, Variable]:
    return {v.name: Variable.from_proto(v) for v in response.variables}


def _values(response: pb.VariablesResponse) -> dict[str, Any]:
    return {name: v.value for name, v in _variables(response).items()}


def set_variable(
    session_id: str,
    name: str,
    value: Any,
    type_name: str | None,
    constraints: Mapping[str, Any] | None,
    expected_version: int | None,
) -> Op[Variable]:
    parse = _parser(pb.VariableResponse, _variable)
    if constraints is not None or (type_name is not None and expected_version is None):
        declared = Constraints.from_dict(constraints)
        register = pb.RegisterVariableRequest(
            session_id=session_id,
            name=name,
            type=type_name or "",
            value=to_pb(value, type_name),
            constraints=declared.to_proto(),
        )
        return Op("RegisterVariable", register.SerializeToString(), parse, session_id)
    request = pb.SetVariableRequest(
        session_id=session_id, name=name, value=to_pb(value), type=type_name or ""
    )
    if expected_version is not None:
        request.expected_version = expected_version
    return Op("SetVariable", request.SerializeToString(), parse, session_id)


def get_variable(session_id: str, name: str, default: Any = MISSING) -> Op[Any]:
    request = pb.GetVariableRequest(session_id=session_id, name=name)
    return Op(
        "GetVariable",
        request.SerializeToString(),
        _parser(pb.VariableResponse, lambda r: _variable(r).value),
        session_id,
        default=default,
    )


def variable(session_id: str, name: str) -> Op[Variable]:
    request = pb.GetVariableRequest(session_id=session_id, name=name)
    return Op(
        "GetVariable",
        request.SerializeToString(),
        _parser(pb.VariableResponse, _variable),
        session_id,
    )


def get_variables(session_id: str, names: Iterable[str]) -> Op[dict[str, Any]]:
    request = pb.GetVariablesRequest(session_id=session_id, names=list(names))
    return Op(
        "GetVariables",
        request.SerializeToString(),
        _parser(pb.VariablesResponse, _values),
        session_id,
    )


def set_variables(session_id: str, values: Mapping[str, Any]) -> Op[dict[str, Variable]]:
    request = pb.SetVariablesRequest(
        session_id=session_id, values={k: to_pb(v) for k, v in values.items()}
    )
    return Op(
        "SetVariables",
        request.SerializeToString(),
        _parser(pb.VariablesResponse, _variables),
        session_id,
    )


def list_variables(session_id: str) -> Op[dict[str, Any]]:
    request = pb.ListVariablesRequest(session_id=session_id)
    return Op(
        "ListVariables",
        request.SerializeToString(),
        _parser(pb.VariablesResponse, _values),
        session_id,
    )


def delete_variable(session_id: str, name: str) -> Op[bool]:
    request = pb.DeleteVariableRequest(session_id=session_id, name=name)
    return Op(
        "DeleteVariable",
        request.SerializeToString(),
        _parser(pb.DeleteVariableResponse, lambda r: r.deleted),
        session_id,
    )


def increment(session_id: str, name: str, by: float) -> Op[Any]:
    request = pb.IncrementVariableRequest(session_id=session_id, name=name, by=to_pb(by))
    return Op(
        "IncrementVariable",
        request.SerializeToString(),
        _parser(pb.VariableResponse, lambda r: _variable(r).value),
        session_id,
    )


def watch(session_id: str, names: Iterable[str] | None) -> Op[VariableChange]:
    request = pb.WatchVariablesRequest(session_id=session_id, names=list(names or ()))

    def parse(raw: bytes) -> VariableChange:
        update = pb.VariableUpdate.FromString(raw)
        return VariableChange(
            session_id=update.session_id,
            name=update.name,
            kind=update.kind,
            variable=Variable.from_proto(update.variable) if update.HasField("variable") else None,
        )

    return Op("WatchVariables", request.SerializeToString(), parse, session_id)
