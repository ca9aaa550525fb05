"""The type system values carry across the wire: names, inference and checked conversion."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import numpy as np

from ..errors import InvalidArgument

NULL: Final = "null"
BOOLEAN: Final = "boolean"
INTEGER: Final = "integer"
FLOAT: Final = "float"
STRING: Final = "string"
BYTES: Final = "bytes"
LIST: Final = "list"
MAP: Final = "map"
EMBEDDING: Final = "embedding"
TENSOR: Final = "tensor"
ANY: Final = "any"

VALUE_TYPES: Final = frozenset(
    {NULL, BOOLEAN, INTEGER, FLOAT, STRING, BYTES, LIST, MAP, EMBEDDING, TENSOR}
)

# dtypes a tensor may have on the wire, by their numpy names.
TENSOR_DTYPES: Final = frozenset(
    {
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    }
)
EMBEDDING_DTYPES: Final = frozenset({"float16", "float32", "float64"})


def check_type_name(type_name: str, *, allow_any: bool = False) -> str:
    if type_name in VALUE_TYPES or (allow_any and type_name == ANY):
        return type_name
    known = ", ".join(sorted(VALUE_TYPES))
    raise InvalidArgument(f"unknown type {type_name!r} (known types: {known})")


def infer_type(value: Any) -> str:
    """The wire type of a Python value, as a user would expect it."""
    if value is None:
        return NULL
    if isinstance(value, bool | np.bool_):
        return BOOLEAN
    if isinstance(value, int | np.integer):
        return INTEGER
    if isinstance(value, float | np.floating):
        return FLOAT
    if isinstance(value, str):
        return STRING
    if isinstance(value, bytes | bytearray | memoryview):
        return BYTES
    if isinstance(value, np.ndarray):
        return TENSOR
    if isinstance(value, list | tuple):
        return LIST
    if isinstance(value, Mapping):
        return MAP
    raise InvalidArgument(
        f"cannot send a value of Python type {type(value).__name__}: use None, bool, int, float, "
        "str, bytes, list, dict or a numpy array"
    )


def tensor_array(value: Any, what: str = "value") -> np.ndarray:
    """A numpy array of a wire dtype from an array or nested lists, else a clear error."""
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument(f"{what} is not a rectangular array: {str(exc)[:200]}") from None
    if array.dtype.name not in TENSOR_DTYPES:
        raise InvalidArgument(
            f"{what} has dtype {array.dtype.name!r}, which cannot travel as a tensor "
            f"(supported: {', '.join(sorted(TENSOR_DTYPES))})"
        )
    return array


def embedding_array(value: Any, what: str = "value") -> np.ndarray:
    try:
        array = np.asarray(value)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InvalidArgument(f"{what} is not an embedding: {str(exc)[:200]}") from None
    if array.dtype.kind in "iub":
        array = array.astype(np.float64)
    if array.ndim != 1 or array.dtype.name not in EMBEDDING_DTYPES:
        raise InvalidArgument(
            f"{what} is not an embedding: expected a 1-D float array, got "
            f"{array.ndim}-D {array.dtype.name}"
        )
    return array


def coerce(value: Any, type_name: str, what: str = "value") -> Any:
    """Check ``value`` against ``type_name`` and convert it the way a user expects.

    ints are accepted where floats are declared, lists where tensors are, numpy scalars where
    Python scalars are; anything else that does not fit is refused naming ``what``.
    """
    if type_name == ANY:
        return value
    if type_name == NULL:
        if value is None:
            return None
    elif type_name == BOOLEAN:
        if isinstance(value, bool | np.bool_):
            return bool(value)
    elif type_name == INTEGER:
        if isinstance(value, int | np.integer) and not isinstance(value, bool | np.bool_):
            return int(value)
    elif type_name == FLOAT:
        if isinstance(value, int | float | np.integer | np.floating) and not isinstance(
            value, bool | np.bool_
        ):
            try:
                return float(value)
            except OverflowError:
                raise InvalidArgument(
                    f"{what} (an integer of {len(str(abs(int(value))))} digits) is too large "
                    "for a float"
                ) from None
    elif type_name == STRING:
        if isinstance(value, str):
            return value
    elif type_name == BYTES:
        if isinstance(value, bytes | bytearray | memoryview):
            return bytes(value)
    elif type_name == LIST:
        if isinstance(value, list | tuple):
            return list(value)
        if isinstance(value, np.ndarray):
            return value.tolist()
    elif type_name == MAP:
        if isinstance(value, Mapping):
            return dict(value)
    elif type_name == TENSOR:
        if isinstance(value, np.ndarray | list | tuple | int | float | bool | np.generic):
            return tensor_array(value, what)
    elif type_name == EMBEDDING:
        if isinstance(value, np.ndarray | list | tuple):
            return embedding_array(value, what)
    else:
        check_type_name(type_name)
    raise InvalidArgument(f"{what} must be of type {type_name}, got {describe(value)}")


def describe(value: Any) -> str:
    """A short description of a value's type for error messages."""
    try:
        return infer_type(value)
    except InvalidArgument:
        return type(value).__name__
