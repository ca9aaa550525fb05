"""The value codec: every type round-trips, arrays decode without copies, bad payloads are refused."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from snakepit.errors import InvalidArgument
from snakepit.protocol import decode_value, encode_value, from_pb, pb, to_pb
from snakepit.protocol import value_types as vt
from snakepit.protocol.codec import DEFAULT_BINARY_THRESHOLD, build_value, scalar_value
from snakepit.protocol.messages import (
    decode_chunk,
    decode_request,
    decode_result,
    encode_chunk,
    encode_request,
    encode_result,
)

INF = float("inf")
NAN = float("nan")


def same(a: object, b: object) -> bool:
    """Equality where NaN equals NaN and arrays compare by dtype, shape and bits."""
    if isinstance(a, np.ndarray):
        return (
            isinstance(b, np.ndarray)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.tobytes() == np.ascontiguousarray(b).tobytes()
        )
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b


SCALARS = [
    None,
    True,
    False,
    0,
    -(2**63),
    2**63 - 1,
    10**30,
    1.5,
    -0.0,
    NAN,
    INF,
    -INF,
    "",
    "héllo ✓",
    b"",
    b"\x00\xff",
]


@pytest.mark.parametrize("value", SCALARS, ids=repr)
def test_scalars_round_trip(value: object) -> None:
    assert same(decode_value(encode_value(value)), value)


def test_non_finite_floats_survive_in_every_position() -> None:
    value = {
        "scalars": [NAN, INF, -INF],
        "nested": {"deep": [[NAN], {"x": -INF}]},
        "tensor": np.array([NAN, INF, -INF, 1.0]),
        "big": np.full(5000, NAN),
    }
    decoded = decode_value(encode_value(value))
    assert same(decoded, value)
    assert np.isnan(decoded["big"]).all()


def test_nested_containers_mixing_json_and_binary_elements() -> None:
    value = {
        "a": [1, "two", [3.0, None]],
        "blob": b"raw",
        "arr": np.arange(10_000, dtype=np.int32),
        "empty": {},
    }
    message = pb.Value.FromString(encode_value(value))
    assert message.WhichOneof("payload") == "map"  # holds bytes and a binary tensor
    assert same(decode_value(encode_value(value)), value)
    pure = {"a": [1, 2], "b": {"c": None}}
    assert pb.Value.FromString(encode_value(pure)).WhichOneof("payload") == "json"


DTYPES = ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
          "float16", "float32", "float64", "complex64", "complex128"]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", [3, 4096], ids=["json", "binary"])
def test_every_dtype_round_trips(dtype: str, size: int) -> None:
    array = (np.arange(size) % 7).astype(dtype).reshape(-1, 1)
    decoded = decode_value(encode_value(array))
    assert same(decoded, array)


@pytest.mark.parametrize(
    "array",
    [
        np.zeros((0,)),
        np.zeros((3, 0, 2)),
        np.array(5.0),
        np.array(True),
        np.arange(24.0).reshape(2, 3, 4)[:, ::2, 1:],
    ],
    ids=["empty", "zero-extent", "0-d", "0-d-bool", "non-contiguous"],
)
@pytest.mark.parametrize("threshold", [0, 1 << 30], ids=["binary", "json"])
def test_odd_shapes(array: np.ndarray, threshold: int) -> None:
    assert same(decode_value(encode_value(array, threshold=threshold)), array)


def test_big_endian_input_is_normalised_to_little_endian() -> None:
    array = np.arange(5000, dtype=">f8")
    message = pb.Value.FromString(encode_value(array))
    assert message.tensor.dtype == "float64"
    assert message.tensor.data[:8] == struct.pack("<d", 0.0)
    assert message.tensor.data[8:16] == struct.pack("<d", 1.0)
    decoded = decode_value(encode_value(array))
    assert decoded.dtype.byteorder in ("<", "=")
    np.testing.assert_array_equal(decoded, array)


def test_threshold_switches_between_json_and_binary() -> None:
    small = np.zeros(DEFAULT_BINARY_THRESHOLD // 8 - 1)
    large = np.zeros(DEFAULT_BINARY_THRESHOLD // 8)
    assert pb.Value.FromString(encode_value(small)).WhichOneof("payload") == "json"
    assert pb.Value.FromString(encode_value(large)).WhichOneof("payload") == "tensor"
    assert pb.Value.FromString(encode_value(small, threshold=0)).WhichOneof("payload") == "tensor"
    assert pb.Value.FromString(encode_value(large, threshold=10**9)).WhichOneof("payload") == "json"


def test_binary_decode_is_a_view_of_the_received_buffer() -> None:
    data = encode_value(np.arange(100_000, dtype=np.float32))
    decoded = decode_value(data)
    assert not decoded.flags.owndata
    assert np.shares_memory(decoded, np.frombuffer(data, dtype=np.uint8))
    assert not decoded.flags.writeable  # a view of the message; tools copy before mutating


def test_embedding_declared_and_inferred() -> None:
    vector = np.linspace(0, 1, 384, dtype=np.float32)
    decoded = decode_value(encode_value(vector, "embedding"))
    assert decoded.dtype == np.float32 and decoded.shape == (384,)
    assert pb.Value.FromString(encode_value(vector, "embedding")).type == "embedding"
    assert pb.Value.FromString(encode_value(vector)).type == "tensor"
    from_list = decode_value(encode_value([0.5, 1, 2], "embedding"))
    assert from_list.dtype == np.float64
    with pytest.raises(InvalidArgument, match="not an embedding"):
        encode_value(np.zeros((2, 2)), "embedding")


def test_declared_types_convert_as_users_expect() -> None:
    assert decode_value(encode_value(3, "float")) == 3.0
    assert isinstance(decode_value(encode_value(3, "float")), float)
    assert same(decode_value(encode_value([[1, 2], [3, 4]], "tensor")), np.array([[1, 2], [3, 4]]))
    with pytest.raises(InvalidArgument, match="must be of type integer, got string"):
        encode_value("3", "integer")
    with pytest.raises(InvalidArgument, match="must be of type integer"):
        encode_value(True, "integer")


def test_unsupported_values_are_refused_clearly() -> None:
    with pytest.raises(InvalidArgument, match="cannot send a value of Python type set"):
        encode_value({1, 2})
    with pytest.raises(InvalidArgument, match="dtype 'object'"):
        encode_value(np.array([object()]))
    with pytest.raises(InvalidArgument, match="map keys must be strings"):
        encode_value({1: b"x"})


def _tensor_message(dtype: str, shape: list[int], data: bytes) -> bytes:
    return pb.Value(
        type="tensor", tensor=pb.Tensor(dtype=dtype, shape=shape, data=data)
    ).SerializeToString()


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (
            _tensor_message("float32", [2, 3], b"\x00" * 23),
            "23 bytes of data, but shape \\[2, 3\\] of float32 needs 24",
        ),
        (_tensor_message("float128", [1], b"\x00" * 16), "unknown dtype 'float128'"),
        (_tensor_message("object", [1], b"\x00" * 8), "unknown dtype 'object'"),
        (_tensor_message("int8", [-1], b""), "negative extent"),
        (pb.Value(type="list", json=b"[1, 2").SerializeToString(), "bad JSON payload"),
        (pb.Value(type="integer", json=b'"seven"').SerializeToString(), "must be of type integer"),
        (pb.Value(type="quaternion", json=b"1").SerializeToString(), "unknown type 'quaternion'"),
        (pb.Value(type="string").SerializeToString(), "no payload"),
        (pb.Value(type="bytes", json=b"1").SerializeToString(), "must be of type bytes"),
        (pb.Value(type="string", raw=b"x").SerializeToString(), "cannot have a raw payload"),
        (
            pb.Value(
                type="tensor", json=b'{"dtype": "int8", "shape": [3], "data": [1]}'
            ).SerializeToString(),
            "1 elements for shape",
        ),
        (b"\x0a\x05flo", "runs past the end"),
        (b"\x0a", "truncated varint"),
        (b"", "no type"),
    ],
    ids=lambda v: v[:30] if isinstance(v, str) else None,
)
def test_malformed_payloads_are_rejected_with_a_clear_error(payload: bytes, message: str) -> None:
    with pytest.raises(InvalidArgument, match=message):
        decode_value(payload)


def test_hand_written_wire_format_matches_protobuf_both_ways() -> None:
    arguments = {"x": np.arange(4000, dtype=np.float64), "name": "n", "n": 3, "flags": [True, None]}
    raw = encode_request("tool", arguments, "s-1", {"k": "v"})
    parsed = pb.ExecuteToolRequest.FromString(raw)
    assert (
        parsed.tool_name == "tool"
        and parsed.session_id == "s-1"
        and dict(parsed.metadata) == {"k": "v"}
    )
    assert parsed.arguments["x"].tensor.dtype == "float64"
    reserialised = decode_request(parsed.SerializeToString())
    assert reserialised.tool_name == "tool" and reserialised.metadata == {"k": "v"}
    assert same(reserialised.arguments, arguments)

    result = encode_result({"y": np.ones(3)}, "worker-1", 2.5)
    parsed_result = pb.ExecuteToolResponse.FromString(result)
    assert parsed_result.worker_id == "worker-1" and parsed_result.duration_ms == 2.5
    decoded = decode_result(parsed_result.SerializeToString())
    assert decoded.worker_id == "worker-1" and same(decoded.value, {"y": np.ones(3)})

    chunk = encode_chunk([1, 2], 7)
    assert pb.ToolChunk.FromString(chunk).seq == 7
    assert decode_chunk(chunk) == [1, 2]
    # A protobuf-built value decodes with the hand-written reader and back.
    assert same(from_pb(to_pb({"a": np.arange(3)})), {"a": np.arange(3)})


@given(
    st.one_of(
        st.floats(),
        st.integers(),
        st.integers(min_value=-(2**70), max_value=2**70),
        st.text(),
        st.booleans(),
        st.none(),
    )
)
def test_the_scalar_fast_path_writes_what_the_general_encoder_writes(value: object) -> None:
    """``codec.scalar_value`` (plain scalars, the usual small argument and result) is a shortcut:
    byte for byte the general builder's ``Value``, and so the same result message."""
    general = build_value(value, vt.infer_type(value)).to_bytes()  # a type: no shortcut
    assert scalar_value(value) == general
    assert same(decode_value(general), value)
    assert decode_result(encode_result(value, "w", 1.5)).value == value or value != value


def test_the_scalar_fast_path_leaves_other_types_to_the_general_encoder() -> None:
    class Text(str):
        pass

    cases = [(np.float64(1.5), 1.5), (np.int32(3), 3), (Text("x"), "x"), (b"x", b"x")]
    cases += [([1], [1]), ({"a": 1}, {"a": 1}), (np.ones(2), np.ones(2))]
    for value, decoded in cases:
        assert scalar_value(value) is None
        assert same(decode_value(encode_value(value)), decoded)


def test_unknown_fields_are_skipped_for_forward_compatibility() -> None:
    extra = b"\xf8\x01\x05"  # field 31, varint 5
    assert decode_value(encode_value(42) + extra) == 42
    assert decode_request(encode_request("t", {"a": 1}) + extra).arguments == {"a": 1}
