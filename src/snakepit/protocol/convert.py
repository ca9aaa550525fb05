"""Bridges between the codec's bytes and the generated ``pb.Value`` class.

The session and variable RPCs use the generated classes; these two functions are the only place
where a Python value crosses into or out of one.
"""

from __future__ import annotations

from typing import Any

from ..bridge.v1 import bridge_pb2 as pb
from .codec import decode_value, encode_value


def to_pb(value: Any, type_name: str | None = None, *, threshold: int | None = None) -> pb.Value:
    return pb.Value.FromString(encode_value(value, type_name, threshold=threshold))


def from_pb(value: pb.Value) -> Any:
    return decode_value(value.SerializeToString())
