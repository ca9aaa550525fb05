"""The wire contract: generated protobuf classes, the value codec and error transport."""

from ..bridge.v1 import bridge_pb2 as pb
from ..bridge.v1 import bridge_pb2_grpc as pb_grpc
from .codec import DEFAULT_BINARY_THRESHOLD, decode_value, encode_value
from .constraints import Constraints
from .convert import from_pb, to_pb
from .value_types import VALUE_TYPES, coerce, infer_type

SERVICE_NAME = "snakepit.bridge.v1.BridgeService"


def method_path(name: str) -> str:
    """The full gRPC method path of a BridgeService RPC."""
    return f"/{SERVICE_NAME}/{name}"


__all__ = [
    "DEFAULT_BINARY_THRESHOLD",
    "SERVICE_NAME",
    "VALUE_TYPES",
    "Constraints",
    "coerce",
    "decode_value",
    "encode_value",
    "from_pb",
    "infer_type",
    "method_path",
    "pb",
    "pb_grpc",
    "to_pb",
]
