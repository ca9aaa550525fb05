"""Value codec: Python values to and from the wire's typed ``Value`` message.

Small values travel as JSON (the stdlib encoder, which writes NaN and +/-Infinity as the tokens
``NaN``, ``Infinity`` and ``-Infinity`` and reads them back); bytes travel raw; tensors and
embeddings from ``threshold`` bytes up travel as dtype + shape + little-endian C-order bytes and
decode to a read-only numpy view of the received buffer, without a copy. Containers that hold
bytes or arrays travel element by element so each element keeps its form. Nothing is pickled.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from json.encoder import encode_basestring_ascii
from typing import Any

import numpy as np

from ..errors import InvalidArgument
from . import value_types as vt
from .wire import (
    WIRE_LEN,
    WireMessage,
    iter_fields,
    read_packed_int64,
    read_pair,
    tag,
    varint,
)

DEFAULT_BINARY_THRESHOLD = int(os.environ.get("SNAKEPIT_BINARY_THRESHOLD", 10 * 1024))

# Value fields.
_TYPE, _JSON, _TENSOR, _RAW, _LIST, _MAP = 1, 2, 3, 4, 5, 6
# Tensor fields.
_DTYPE, _SHAPE, _DATA = 1, 2, 3

_JSON_ENCODER = json.JSONEncoder(allow_nan=True, separators=(",", ":"), default=None)


class _NotJson(Exception):
    """Raised from the JSON encoder's hook when a container must travel element by element."""


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic) and not isinstance(obj, np.complexfloating):
        return obj.item()
    raise _NotJson


_CONTAINER_ENCODER = json.JSONEncoder(allow_nan=True, separators=(",", ":"), default=_json_default)


def encode_value(
    value: Any, type_name: str | None = None, *, threshold: int | None = None
) -> bytes:
    """Serialise ``value`` as a ``snakepit.bridge.v1.Value`` message."""
    return build_value(value, type_name, threshold).to_bytes()


def _value_head(type_name: str) -> bytes:
    """A JSON-form ``Value``'s bytes up to its payload's length: type, then the payload's tag."""
    head = WireMessage()
    head.add_str(_TYPE, type_name)
    return head.to_bytes() + tag(_JSON, WIRE_LEN)


_HEADS = {type_name: _value_head(type_name) for type_name in vt.VALUE_TYPES}
_NON_FINITE = {math.inf: "Infinity", -math.inf: "-Infinity"}


def scalar_value(value: Any) -> bytes | None:
    """The ``Value`` message of a plain ``float``, ``int``, ``bool``, ``str`` or ``None`` (exactly
    those types, not subclasses), byte for byte what ``build_value`` writes; None for anything
    else. Small results and arguments are nearly all of these, and this is several times
    cheaper than the general path (type inference, a builder, the JSON encoder's set-up)."""
    kind = type(value)
    if kind is float:
        text = "NaN" if value != value else _NON_FINITE.get(value) or float.__repr__(value)
        head = _HEADS[vt.FLOAT]
    elif kind is int:
        text, head = int.__repr__(value), _HEADS[vt.INTEGER]
    elif kind is str:
        text, head = encode_basestring_ascii(value), _HEADS[vt.STRING]
    elif kind is bool:
        text, head = ("true" if value else "false"), _HEADS[vt.BOOLEAN]
    elif value is None:
        text, head = "null", _HEADS[vt.NULL]
    else:
        return None
    payload = text.encode()
    return head + varint(len(payload)) + payload


def build_value(
    value: Any, type_name: str | None = None, threshold: int | None = None
) -> WireMessage:
    """The ``Value`` message of ``value`` as chunks, for embedding in a larger message."""
    if type_name is None:
        scalar = scalar_value(value)
        if scalar is not None:
            msg = WireMessage()
            msg.add_raw(scalar)
            return msg
        type_name = vt.infer_type(value)
    else:
        value = vt.coerce(value, type_name)
    limit = DEFAULT_BINARY_THRESHOLD if threshold is None else threshold
    msg = WireMessage()
    msg.add_str(_TYPE, type_name)
    if type_name == vt.TENSOR or type_name == vt.EMBEDDING:
        _add_array(msg, value, type_name, limit)
    elif type_name == vt.BYTES:
        msg.add_bytes(_RAW, bytes(value))
    elif type_name == vt.LIST or type_name == vt.MAP:
        _add_container(msg, value, type_name, limit)
    elif type_name == vt.NULL:
        msg.add_bytes(_JSON, b"null")
    else:
        if isinstance(value, np.generic):
            value = value.item()
        msg.add_bytes(_JSON, _JSON_ENCODER.encode(value).encode())
    return msg


def _add_array(msg: WireMessage, value: Any, type_name: str, threshold: int) -> None:
    array = vt.tensor_array(value) if type_name == vt.TENSOR else vt.embedding_array(value)
    if array.nbytes >= threshold or array.dtype.kind == "c":
        msg.add_message(_TENSOR, tensor_message(array))
    else:
        payload = {
            "dtype": array.dtype.name,
            "shape": list(array.shape),
            "data": array.ravel().tolist(),
        }
        msg.add_bytes(_JSON, _JSON_ENCODER.encode(payload).encode())


def tensor_message(array: np.ndarray) -> WireMessage:
    """A ``Tensor`` message whose data chunk is a view of ``array`` when already in wire order."""
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    if not array.flags.c_contiguous:
        array = array.copy(order="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)
    tensor = WireMessage()
    tensor.add_str(_DTYPE, array.dtype.name)
    if array.shape:
        packed = b"".join(varint(dim) for dim in array.shape)
        tensor.add_bytes(_SHAPE, packed)
    data = array.data.cast("B") if array.size else b""
    tensor.add_bytes(_DATA, data)
    return tensor


def _add_container(msg: WireMessage, value: Any, type_name: str, threshold: int) -> None:
    try:
        msg.add_bytes(_JSON, _CONTAINER_ENCODER.encode(value).encode())
        return
    except _NotJson:
        pass
    except TypeError as exc:
        raise InvalidArgument(f"cannot encode {type_name}: {exc}") from exc
    body = WireMessage()
    if type_name == vt.LIST:
        for item in value:
            body.add_message(1, build_value(item, None, threshold))
        msg.add_message(_LIST, body)
        return
    for key, item in value.items():
        if not isinstance(key, str):
            raise InvalidArgument(f"map keys must be strings, got {type(key).__name__} {key!r}")
        entry = WireMessage()
        entry.add_str(1, key)
        entry.add_message(2, build_value(item, None, threshold))
        body.add_message(1, entry)
    msg.add_message(_MAP, body)


# What malformed input makes the parsers below (and json, numpy, str) raise besides
# InvalidArgument: invalid UTF-8, nesting past the recursion limit, numbers or shapes too large.
MALFORMED = (UnicodeDecodeError, RecursionError, OverflowError, ValueError, TypeError)


def as_invalid(what: str, exc: BaseException) -> InvalidArgument:
    """The InvalidArgument naming ``what`` for a parser failure ``exc`` (one of ``MALFORMED``).

    Every decoder of wire input catches ``MALFORMED`` and raises this, so a malformed message is
    the caller's error (INVALID_ARGUMENT with a short message), never INTERNAL with a server
    traceback. (A plain ``except`` rather than a context manager: the decoders run for every
    call, and entering a generator-based context manager costs more than a small call's parse.)
    """
    text = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
    if len(text) > 200:
        text = text[:200] + "..."
    return InvalidArgument(f"malformed {what}: {type(exc).__name__}: {text}")


def decode_value(data: bytes | memoryview) -> Any:
    """Decode a serialised ``Value``; arrays are read-only views of ``data``."""
    buf = memoryview(data)
    try:
        return read_value(buf, 0, len(buf))
    except MALFORMED as exc:
        raise as_invalid("value", exc) from None


def read_value(buf: memoryview, start: int, stop: int) -> Any:
    type_name = ""
    kind = 0
    p_start = p_stop = 0
    pair = read_pair(buf, start, stop)
    if pair is not None and _JSON <= pair[2] <= _MAP:  # type, then the payload: the usual
        type_name = str(buf[pair[0] : pair[1]], "utf-8")
        kind, p_start, p_stop = pair[2], pair[3], stop
    else:
        for field, wire_type, a, b in iter_fields(buf, start, stop):
            if wire_type != WIRE_LEN:
                continue
            if field == _TYPE:
                type_name = str(buf[a:b], "utf-8")
            elif _JSON <= field <= _MAP:
                kind, p_start, p_stop = field, a, b
    if not type_name:
        raise InvalidArgument("malformed value: no type")
    if type_name not in vt.VALUE_TYPES:
        vt.check_type_name(type_name)  # raises, naming the known types
    if kind == 0:
        raise InvalidArgument(f"malformed value of type {type_name}: no payload")
    if kind == _JSON:
        return _from_json(buf[p_start:p_stop], type_name)
    if kind == _RAW:
        _expect(type_name, (vt.BYTES,), "raw")
        return bytes(buf[p_start:p_stop])
    if kind == _TENSOR:
        _expect(type_name, (vt.TENSOR, vt.EMBEDDING), "tensor")
        array = read_tensor(buf, p_start, p_stop)
        return vt.embedding_array(array) if type_name == vt.EMBEDDING else array
    if kind == _LIST:
        _expect(type_name, (vt.LIST,), "list")
        return [
            read_value(buf, a, b)
            for _, wt, a, b in iter_fields(buf, p_start, p_stop)
            if wt == WIRE_LEN
        ]
    _expect(type_name, (vt.MAP,), "map")
    return dict(
        _read_map_entry(buf, a, b)
        for _, wt, a, b in iter_fields(buf, p_start, p_stop)
        if wt == WIRE_LEN
    )


def _read_map_entry(buf: memoryview, start: int, stop: int) -> tuple[str, Any]:
    key = ""
    value_range: tuple[int, int] | None = None
    for field, wire_type, a, b in iter_fields(buf, start, stop):
        if wire_type != WIRE_LEN:
            continue
        if field == 1:
            key = str(buf[a:b], "utf-8")
        elif field == 2:
            value_range = (a, b)
    if value_range is None:
        raise InvalidArgument(f"malformed value: map entry {key!r} has no value")
    return key, read_value(buf, *value_range)


def _expect(type_name: str, allowed: tuple[str, ...], payload: str) -> None:
    if type_name not in allowed:
        raise InvalidArgument(f"malformed value: type {type_name} cannot have a {payload} payload")


def read_tensor(buf: memoryview, start: int, stop: int) -> np.ndarray:
    dtype_name = ""
    shape: list[int] = []
    data = buf[0:0]
    for field, wire_type, a, b in iter_fields(buf, start, stop):
        if wire_type != WIRE_LEN:
            continue
        if field == _DTYPE:
            dtype_name = str(buf[a:b], "utf-8")
        elif field == _SHAPE:
            shape = read_packed_int64(buf, a, b)
        elif field == _DATA:
            data = buf[a:b]
    return array_from_buffer(dtype_name, shape, data)


def array_from_buffer(dtype_name: str, shape: list[int], data: bytes | memoryview) -> np.ndarray:
    if dtype_name not in vt.TENSOR_DTYPES:
        raise InvalidArgument(f"malformed tensor: unknown dtype {dtype_name!r}")
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"malformed tensor: negative extent in shape {shape}")
    dtype = np.dtype(dtype_name).newbyteorder("<")
    expected = math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise InvalidArgument(
            f"malformed tensor: {len(data)} bytes of data, but shape {shape} of {dtype_name} "
            f"needs {expected}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


# json's C scanner, what json.loads runs after its Python-level checks (a third of a small
# value's decoding time).
_SCAN_JSON: Any = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def _json_loads(text: str) -> Any:
    """``json.loads(text)``: the C scanner straight away when the text is exactly one JSON value
    (what every encoder writes); anything else (surrounding whitespace, trailing data, errors)
    goes through json.loads itself, for its result and its exact error."""
    try:
        value, end = _SCAN_JSON(text, 0)
    except StopIteration:
        return json.loads(text)
    return value if end == len(text) else json.loads(text)


def _from_json(payload: memoryview, type_name: str) -> Any:
    try:
        # UTF-8 text (what every encoder writes), so json skips its encoding detection.
        value = _json_loads(str(payload, "utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument(
            f"malformed value of type {type_name}: bad JSON payload ({exc})"
        ) from exc
    if type_name == vt.TENSOR or type_name == vt.EMBEDDING:
        return _array_from_json(value, type_name)
    return vt.coerce(value, type_name, "value")


def _array_from_json(value: Any, type_name: str) -> np.ndarray:
    if not isinstance(value, Mapping) or not {"dtype", "shape", "data"} <= value.keys():
        raise InvalidArgument(f"malformed {type_name}: JSON form needs dtype, shape and data")
    dtype_name, shape, flat = value["dtype"], value["shape"], value["data"]
    if dtype_name not in vt.TENSOR_DTYPES:
        raise InvalidArgument(f"malformed {type_name}: unknown dtype {dtype_name!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise InvalidArgument(
            f"malformed {type_name}: shape must be a list of extents, got {shape!r}"
        )
    if not isinstance(flat, list) or len(flat) != math.prod(shape):
        raise InvalidArgument(
            f"malformed {type_name}: {len(flat) if isinstance(flat, list) else 'no'} elements "
            f"for shape {shape}"
        )
    try:
        array = np.array(flat, dtype=dtype_name).reshape(shape)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument(f"malformed {type_name}: {exc}") from exc
    return vt.embedding_array(array) if type_name == vt.EMBEDDING else array
