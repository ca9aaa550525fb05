"""Hostile input to every parser: refused as InvalidArgument, fast, never another exception.

The findings of docs/security.md each have a case here (ReDoS patterns, NaN bounds, huge
integers, invalid UTF-8, deep nesting, impossible shapes), and hypothesis fuzzes the wire codec,
the value codec, the constraints and the store's request checks with random and mutated bytes.
A longer run of the same properties is ``python bench/fuzz.py``.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snakepit.bridge.v1 import bridge_pb2 as pb
from snakepit.errors import InvalidArgument, ResourceExhausted
from snakepit.protocol import Constraints, decode_value, encode_value
from snakepit.protocol.constraints import _APPLIES_TO as _CONSTRAINT_NAMES
from snakepit.protocol.constraints import MAX_CHOICES, MAX_PATTERN_LENGTH
from snakepit.protocol.messages import decode_chunk, decode_request, decode_result, encode_request
from snakepit.protocol.wire import WireMessage
from snakepit.store import rules
from snakepit.store.limits import StoreLimits

# bench/fuzz.py runs the same properties longer through SNAKEPIT_FUZZ_EXAMPLES.
FUZZ = settings(
    max_examples=int(os.environ.get("SNAKEPIT_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    database=None,
)


def _value_bytes(type_name: str, json_payload: bytes) -> bytes:
    msg = WireMessage()
    msg.add_str(1, type_name)
    msg.add_bytes(2, json_payload)
    return msg.to_bytes()


# Findings of the review, one by one ---------------------------------------------------------
def test_a_catastrophic_pattern_runs_in_linear_time() -> None:
    """(a+)+$ against 'aaaa…!' took 9 s at 28 characters under Python re; RE2 never backtracks."""
    constraints = Constraints.from_dict({"pattern": "(a+)+$"})
    constraints.check_applies("string")
    started = time.perf_counter()
    for n in (28, 40, 10_000):
        with pytest.raises(InvalidArgument, match="does not match pattern"):
            constraints.validate("a" * n + "!", "string")
    assert time.perf_counter() - started < 1.0


def test_patterns_re2_cannot_run_or_too_long_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="RE2"):
        Constraints.from_dict({"pattern": r"(a)\1"}).check_applies("string")
    with pytest.raises(InvalidArgument, match="RE2"):
        Constraints.from_dict({"pattern": r"(?=a)a"}).check_applies("string")
    with pytest.raises(InvalidArgument, match=f"longer than {MAX_PATTERN_LENGTH}"):
        Constraints.from_dict({"pattern": "a" * (MAX_PATTERN_LENGTH + 1)})
    with pytest.raises(InvalidArgument, match="RE2"):  # a program too large for max_mem
        Constraints.from_dict({"pattern": "(((a{100}){100}){100})"}).check_applies("string")


def test_choices_are_capped_and_nan_bounds_or_negative_lengths_refused() -> None:
    with pytest.raises(InvalidArgument, match=f"more than {MAX_CHOICES} items"):
        Constraints.from_dict({"choices": list(range(MAX_CHOICES + 1))})
    with pytest.raises(InvalidArgument, match="bytes"):
        Constraints.from_dict({"choices": ["x" * 70_000]})
    for spec in ({"min": float("nan")}, {"max": float("nan")}):
        with pytest.raises(InvalidArgument, match="NaN"):
            Constraints.from_dict(spec)
    with pytest.raises(InvalidArgument, match="negative"):
        Constraints.from_dict({"min_length": -5})
    msg = pb.Constraints(choices_json=b"[" * 30_000)
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        Constraints.from_proto(msg)
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        Constraints.from_proto(pb.Constraints(choices_json=b"not json"))


def test_refusals_quote_a_huge_value_only_in_part() -> None:
    constraints = Constraints.from_dict({"pattern": "[a-z]+"})
    with pytest.raises(InvalidArgument) as refused:
        constraints.validate("A" * 1_000_000, "string")
    assert len(refused.value.message) < 600


def test_a_4300_digit_integer_is_refused_as_a_float_not_an_internal_error() -> None:
    huge = 10**4000
    decl = rules.Declaration.new("float")
    with pytest.raises(InvalidArgument, match="too large for a float"):
        decl.prepare(huge, "x")
    assert rules.load_bytes(rules.Declaration.new("integer").prepare(huge, "x")[1]) == huge


@pytest.mark.parametrize(
    "payload",
    [
        _value_bytes("string", b"[" * 100_000 + b"]" * 100_000),  # JSON nested past recursion
        _value_bytes("list", b"[" * 5_000 + b"]" * 5_000),
        b"\n\x02\xff\xfe\x12\x01x",  # type name of invalid UTF-8
        _value_bytes("string", b'"\xff"'),  # JSON of invalid UTF-8
    ],
    ids=["deep-json", "deep-list", "bad-utf8-type", "bad-utf8-json"],
)
def test_malformed_values_are_invalid_argument(payload: bytes) -> None:
    with pytest.raises(InvalidArgument, match="malformed"):
        decode_value(payload)


def test_impossible_tensor_shapes_are_invalid_argument() -> None:
    tensor = WireMessage()
    tensor.add_str(1, "float64")
    tensor.add_bytes(2, b"\x00" + b"\x80" * 8 + b"\x40")  # shape [0, 2**62]
    tensor.add_bytes(3, b"")
    msg = WireMessage()
    msg.add_str(1, "tensor")
    msg.add_message(3, tensor)
    with pytest.raises(InvalidArgument, match="malformed"):
        decode_value(msg.to_bytes())


def test_values_nested_deeper_than_the_recursion_limit_are_invalid_argument() -> None:
    inner = encode_value(1)
    for _ in range(3000):
        outer = WireMessage()
        outer.add_str(1, "list")
        body = WireMessage()
        body.add_bytes(1, inner)
        outer.add_message(5, body)
        inner = outer.to_bytes()
    with pytest.raises(InvalidArgument, match="nested too deeply"):
        decode_value(inner)


def test_a_tool_request_with_invalid_utf8_names_is_invalid_argument() -> None:
    good = encode_request("echo", {"value": 1})
    with pytest.raises(InvalidArgument, match="malformed tool request"):
        decode_request(good.replace(b"echo", b"\xff\xfe\xfd\xfc"))
    with pytest.raises(InvalidArgument, match="malformed tool request"):
        decode_request(good.replace(b"value", b"\xffalue"))


def test_store_limits_refuse_out_of_range_ttls_and_large_metadata() -> None:
    limits = StoreLimits(max_ttl=3600, max_metadata_bytes=100)
    for ttl in (1e300, 3601, float("nan"), float("inf"), -5, 0.0001, True):
        with pytest.raises(InvalidArgument, match="TTL"):
            limits.check_ttl(ttl, 60)  # type: ignore[arg-type]
    assert limits.check_ttl(None, 60) == 60 and limits.check_ttl(3600, 60) == 3600
    with pytest.raises(InvalidArgument, match="larger than 100 bytes"):
        limits.check_metadata({"k": "v" * 100}, "session")
    with pytest.raises(InvalidArgument, match="strings"):
        limits.check_metadata({"k": 1}, "session")  # type: ignore[dict-item]
    with pytest.raises(ResourceExhausted, match="per value"):
        rules.Declaration.new("string").prepare("x" * 200, "v", StoreLimits(max_value_bytes=100))


# Property-based fuzzing -----------------------------------------------------------------------
_SAMPLES = [
    encode_value(v)
    for v in (None, True, 3, 2.5, "text", b"\x00\x01", [1, [2, "x"]], {"k": [None, 1.5]})
] + [encode_value(np.arange(6, dtype=np.int32).reshape(2, 3), threshold=0)]


@st.composite
def mutated(draw: st.DrawFn, samples: list[bytes]) -> bytes:
    """A valid message with a few bytes flipped, cut or spliced in: near-misses reach deeper."""
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= draw(st.integers(1, 255))
        elif op == "cut":
            del data[pos : pos + draw(st.integers(1, 8))]
        else:
            data[pos:pos] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(_SAMPLES)))
def test_fuzz_value_codec_only_ever_raises_invalid_argument(data: bytes) -> None:
    with contextlib.suppress(InvalidArgument):
        decode_value(data)


_REQUESTS = [
    encode_request("echo", {"value": v}, session_id="s1", metadata={"k": "v"})
    for v in (1, "x", [1, 2], np.ones(3))
]


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(_REQUESTS)))
def test_fuzz_wire_messages_only_ever_raise_invalid_argument(data: bytes) -> None:
    for decode in (decode_request, decode_result, decode_chunk):
        with contextlib.suppress(InvalidArgument):
            decode(data)


def _outcome(decode: object, data: bytes) -> tuple[str, object]:
    try:
        return "ok", repr(decode(data))  # type: ignore[operator]
    except InvalidArgument as exc:
        return "refused", str(exc)


@FUZZ
@given(st.one_of(st.binary(max_size=200), mutated(_REQUESTS), mutated(_SAMPLES)))
def test_fuzz_the_two_field_fast_path_reads_what_the_general_reader_reads(data: bytes) -> None:
    """``wire.read_pair`` (map entries and values laid out the usual way) against the field by
    field reader it shortcuts: the same value, or the same refusal, for any input."""
    from unittest import mock

    from snakepit.protocol import codec, messages

    fast = [_outcome(decode, data) for decode in (decode_request, decode_value)]
    with (
        mock.patch.object(codec, "read_pair", lambda *_: None),
        mock.patch.object(messages, "read_pair", lambda *_: None),
    ):
        general = [_outcome(decode, data) for decode in (decode_request, decode_value)]
    assert fast == general


def _nested(inner: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner)


_JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    _nested,
    max_leaves=10,
)


@FUZZ
@given(
    st.dictionaries(
        st.sampled_from([*_CONSTRAINT_NAMES, "unknown"]),
        _JSONISH,
        max_size=4,
    ),
    st.sampled_from(["integer", "float", "string", "tensor", "list", "embedding"]),
    _JSONISH,
)
def test_fuzz_constraints_only_ever_raise_invalid_argument(
    spec: dict[str, object], type_name: str, value: object
) -> None:
    try:
        constraints = Constraints.from_dict(spec)
        constraints.check_applies(type_name)
        decl = rules.Declaration.new(type_name, constraints)
        decl.prepare(value, "v")
    except (InvalidArgument, ResourceExhausted):
        pass


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_store_requests_parse_or_fail_cleanly(data: bytes) -> None:
    """What the store service does with a request's fields before it reaches a backend."""
    from google.protobuf.message import DecodeError

    try:
        request = pb.RegisterVariableRequest.FromString(data)
    except DecodeError:
        return
    try:
        rules.check_session_id(request.session_id)
        rules.check_name(request.name)
        constraints = Constraints.from_proto(request.constraints)
        decl = rules.Declaration.new(request.type, constraints, dict(request.metadata))
        if request.HasField("value"):
            decl.prepare(decode_value(request.value.SerializeToString()), request.name)
        rules.parse_declaration(decl.encode())
    except (InvalidArgument, ResourceExhausted):
        pass
