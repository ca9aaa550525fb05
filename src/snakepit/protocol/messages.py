"""The tool-call messages (ExecuteToolRequest, ExecuteToolResponse, ToolChunk) on the hot path.

They are used as gRPC (de)serialisers by the client and the worker, so an argument or result
tensor is copied once when sent and never when received. The router does not use them at all:
it forwards these messages as opaque bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgument
from .codec import MALFORMED, as_invalid, build_value, read_value, scalar_value
from .wire import (
    WIRE_FIXED64,
    WIRE_LEN,
    WIRE_VARINT,
    WireMessage,
    iter_fields,
    len_field,
    read_pair,
    tag,
    varint,
)


@dataclass(slots=True)
class ToolRequest:
    tool_name: str
    arguments: dict[str, Any] = field(default_factory=dict)
    session_id: str = ""
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class ToolResult:
    value: Any
    worker_id: str = ""
    duration_ms: float = 0.0


def encode_request(
    tool_name: str,
    arguments: Mapping[str, Any],
    session_id: str = "",
    metadata: Mapping[str, str] | None = None,
    *,
    threshold: int | None = None,
) -> bytes:
    msg = WireMessage()
    msg.add_str(1, tool_name)
    for name, value in arguments.items():
        entry = WireMessage()
        entry.add_str(1, name)
        entry.add_message(2, build_value(value, None, threshold))
        msg.add_message(2, entry)
    msg.add_str(3, session_id)
    for key, text in (metadata or {}).items():
        entry = WireMessage()
        entry.add_str(1, key)
        entry.add_str(2, text)
        msg.add_message(4, entry)
    return msg.to_bytes()


def _decode_request(data: bytes) -> ToolRequest:
    buf = memoryview(data)
    request = ToolRequest(tool_name="")
    for number, wire_type, a, b in iter_fields(buf, 0, len(buf)):
        if wire_type != WIRE_LEN:
            continue
        if number == 1:
            request.tool_name = str(buf[a:b], "utf-8")
        elif number == 2:
            name, value_range = _map_entry(buf, a, b)
            if value_range is None:
                raise InvalidArgument(f"malformed request: argument {name!r} has no value")
            request.arguments[name] = read_value(buf, *value_range)
        elif number == 3:
            request.session_id = str(buf[a:b], "utf-8")
        elif number == 4:
            key, value_range = _map_entry(buf, a, b)
            request.metadata[key] = (
                str(buf[value_range[0] : value_range[1]], "utf-8") if value_range else ""
            )
    return request


def request_tool_name(data: bytes) -> str:
    """The tool an ExecuteToolRequest names, read without decoding its arguments."""
    buf = memoryview(data)
    for number, wire_type, a, b in iter_fields(buf, 0, len(buf)):
        if number == 1 and wire_type == WIRE_LEN:
            return str(buf[a:b], "utf-8")
    return ""


def _map_entry(buf: memoryview, start: int, stop: int) -> tuple[str, tuple[int, int] | None]:
    pair = read_pair(buf, start, stop)
    if pair is not None and pair[2] == 2:  # key, then value: the usual
        return str(buf[pair[0] : pair[1]], "utf-8"), (pair[3], stop)
    key = ""
    value_range = None
    for number, wire_type, a, b in iter_fields(buf, start, stop):
        if wire_type != WIRE_LEN:
            continue
        if number == 1:
            key = str(buf[a:b], "utf-8")
        elif number == 2:
            value_range = (a, b)
    return key, value_range


def encode_result(
    value: Any,
    worker_id: str = "",
    duration_ms: float = 0.0,
    *,
    type_name: str | None = None,
    threshold: int | None = None,
) -> bytes:
    tail = (_len_prefix(2, worker_id.encode()) if worker_id else b"") + (
        _DURATION_TAG + _pack_double(duration_ms) if duration_ms else b""
    )
    scalar = scalar_value(value) if type_name is None else None
    if scalar is not None:  # a small call's answer, without the builder
        return _RESULT_TAG + varint(len(scalar)) + scalar + tail
    msg = WireMessage()
    msg.add_message(1, build_value(value, type_name, threshold))
    msg.add_raw(tail)
    return msg.to_bytes()


_RESULT_TAG = tag(1, WIRE_LEN)
_DURATION_TAG = tag(3, WIRE_FIXED64)
_pack_double = struct.Struct("<d").pack


def _len_prefix(field: int, payload: bytes) -> bytes:
    return len_field(field, len(payload)) + payload


def _decode_result(data: bytes) -> ToolResult:
    buf = memoryview(data)
    result = ToolResult(value=None)
    found = False
    for number, wire_type, a, b in iter_fields(buf, 0, len(buf)):
        if number == 1 and wire_type == WIRE_LEN:
            result.value = read_value(buf, a, b)
            found = True
        elif number == 2 and wire_type == WIRE_LEN:
            result.worker_id = str(buf[a:b], "utf-8")
        elif number == 3 and wire_type == WIRE_FIXED64:
            result.duration_ms = struct.unpack_from("<d", buf, a)[0]
    if not found:
        raise InvalidArgument("malformed response: no result value")
    return result


def encode_chunk(value: Any, seq: int, *, threshold: int | None = None) -> bytes:
    msg = WireMessage()
    msg.add_message(1, build_value(value, None, threshold))
    if seq:
        msg.add_raw(tag(2, WIRE_VARINT) + varint(seq))
    return msg.to_bytes()


def _decode_chunk(data: bytes) -> Any:
    buf = memoryview(data)
    for number, wire_type, a, b in iter_fields(buf, 0, len(buf)):
        if number == 1 and wire_type == WIRE_LEN:
            return read_value(buf, a, b)
    raise InvalidArgument("malformed stream chunk: no value")


def decode_request(data: bytes) -> ToolRequest:
    """A tool request from untrusted bytes; anything malformed is InvalidArgument."""
    try:
        return _decode_request(data)
    except MALFORMED as exc:
        raise as_invalid("tool request", exc) from None


def decode_result(data: bytes) -> ToolResult:
    try:
        return _decode_result(data)
    except MALFORMED as exc:
        raise as_invalid("tool result", exc) from None


def decode_chunk(data: bytes) -> Any:
    try:
        return _decode_chunk(data)
    except MALFORMED as exc:
        raise as_invalid("stream chunk", exc) from None
