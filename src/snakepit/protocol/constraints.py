"""Variable constraints: what a variable accepts besides its type, and the check of a value.

Constraints come from anonymous callers and are checked on the router's event loop on every
write, so each check must take time linear in the value: ``pattern`` is compiled by RE2 (the
``google-re2`` package), which never backtracks, so it has no lookaround or backreferences;
``pattern`` and ``choices`` have size caps, and NaN bounds or negative lengths are refused.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import re2

from ..bridge.v1 import bridge_pb2 as pb
from ..errors import InvalidArgument
from . import value_types as vt

# Caps on what one declaration may carry (docs/security.md): the size of the automaton RE2
# builds and of the choices every write is compared against.
MAX_PATTERN_LENGTH = 1024
MAX_PATTERN_MEMORY = 1 << 20
MAX_CHOICES = 1000
MAX_CHOICES_BYTES = 64 * 1024

_NUMERIC = {vt.INTEGER, vt.FLOAT}
_SIZED = {vt.STRING, vt.BYTES, vt.LIST, vt.MAP}
# Which constraint applies to which types; a constraint on another type is a declaration error.
_APPLIES_TO: dict[str, set[str]] = {
    "min": _NUMERIC | {vt.TENSOR, vt.EMBEDDING},
    "max": _NUMERIC | {vt.TENSOR, vt.EMBEDDING},
    "min_length": _SIZED,
    "max_length": _SIZED,
    "choices": {vt.INTEGER, vt.FLOAT, vt.STRING, vt.BOOLEAN},
    "pattern": {vt.STRING},
    "shape": {vt.TENSOR},
    "dtype": {vt.TENSOR, vt.EMBEDDING},
    "dimensions": {vt.EMBEDDING},
}


@dataclass(frozen=True, slots=True)
class Constraints:
    min: float | None = None
    max: float | None = None
    min_length: int | None = None
    max_length: int | None = None
    choices: tuple[Any, ...] | None = None
    pattern: str | None = None
    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    dimensions: int | None = None

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any] | None) -> Constraints:
        """Build from the keyword form users write: ``{"min": 0, "max": 1}``."""
        if not spec:
            return EMPTY
        unknown = set(spec) - set(_APPLIES_TO)
        if unknown:
            raise InvalidArgument(
                f"unknown constraint {sorted(unknown)[0]!r} "
                f"(known: {', '.join(sorted(_APPLIES_TO))})"
            )
        try:
            built = cls(
                min=_opt(float, spec.get("min")),
                max=_opt(float, spec.get("max")),
                min_length=_opt(int, spec.get("min_length")),
                max_length=_opt(int, spec.get("max_length")),
                choices=tuple(spec["choices"]) if spec.get("choices") is not None else None,
                pattern=spec.get("pattern"),
                shape=tuple(int(d) for d in spec["shape"])
                if spec.get("shape") is not None
                else None,
                dtype=spec.get("dtype"),
                dimensions=_opt(int, spec.get("dimensions")),
            )
        except (TypeError, ValueError, OverflowError) as exc:
            raise InvalidArgument(f"malformed constraints: {_short(exc)}") from None
        built._check_bounds()
        return built

    def _check_bounds(self) -> None:
        """Refuse what could never be checked sensibly or would make every check expensive."""
        for name in ("min", "max"):
            bound = getattr(self, name)
            if bound is not None and math.isnan(bound):
                raise InvalidArgument(f"constraint {name!r} is NaN")
        for name in ("min_length", "max_length", "dimensions"):
            size = getattr(self, name)
            if size is not None and size < 0:
                raise InvalidArgument(f"constraint {name!r} is negative ({size})")
        if self.dtype is not None and not isinstance(self.dtype, str):
            raise InvalidArgument("constraint 'dtype' must be a string")
        if self.pattern is not None:
            if not isinstance(self.pattern, str):
                raise InvalidArgument("constraint 'pattern' must be a string")
            if len(self.pattern) > MAX_PATTERN_LENGTH:
                raise InvalidArgument(
                    f"constraint 'pattern' is longer than {MAX_PATTERN_LENGTH} characters"
                )
        if self.choices is not None:
            if len(self.choices) > MAX_CHOICES:
                raise InvalidArgument(f"constraint 'choices' has more than {MAX_CHOICES} items")
            if not all(isinstance(c, bool | int | float | str) for c in self.choices):
                raise InvalidArgument(
                    "constraint 'choices' may only hold numbers, booleans, strings"
                )
            try:
                size = len(json.dumps(list(self.choices), allow_nan=True))
            except (TypeError, ValueError) as exc:
                raise InvalidArgument(f"constraint 'choices': {_short(exc)}") from None
            if size > MAX_CHOICES_BYTES:
                raise InvalidArgument(
                    f"constraint 'choices' takes more than {MAX_CHOICES_BYTES} bytes"
                )
        if self.shape is not None and len(self.shape) > 64:
            raise InvalidArgument("constraint 'shape' has more than 64 dimensions")

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self).items()
            if v is not None
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, allow_nan=True) if self else ""

    @classmethod
    def from_json(cls, text: str | bytes) -> Constraints:
        return cls.from_dict(_json_object(text, "constraints")) if text else EMPTY

    def __bool__(self) -> bool:
        return self != EMPTY

    def to_proto(self) -> pb.Constraints:
        msg = pb.Constraints()
        for name in ("min", "max", "min_length", "max_length", "dimensions"):
            value = getattr(self, name)
            if value is not None:
                setattr(msg, name, value)
        if self.choices is not None:
            msg.choices_json = json.dumps(list(self.choices)).encode()
        if self.pattern is not None:
            msg.pattern = self.pattern
        if self.shape is not None:
            msg.shape.extend(self.shape)
            msg.has_shape = True
        if self.dtype is not None:
            msg.dtype = self.dtype
        return msg

    @classmethod
    def from_proto(cls, msg: pb.Constraints) -> Constraints:
        spec: dict[str, Any] = {
            name: getattr(msg, name)
            for name in ("min", "max", "min_length", "max_length", "dimensions")
            if msg.HasField(name)
        }
        if msg.choices_json:
            if len(msg.choices_json) > MAX_CHOICES_BYTES:
                raise InvalidArgument(
                    f"constraint 'choices' takes more than {MAX_CHOICES_BYTES} bytes"
                )
            spec["choices"] = _json_value(msg.choices_json, "constraint 'choices'")
        if msg.pattern:
            spec["pattern"] = msg.pattern
        if msg.has_shape:
            spec["shape"] = list(msg.shape)
        if msg.dtype:
            spec["dtype"] = msg.dtype
        return cls.from_dict(spec)

    def check_applies(self, type_name: str) -> None:
        """Refuse a declaration whose constraints cannot apply to its type."""
        for name, value in asdict(self).items():
            if value is not None and type_name not in _APPLIES_TO[name]:
                raise InvalidArgument(f"constraint {name!r} does not apply to type {type_name}")
        if self.pattern is not None:
            _compiled(self.pattern)
        if self.dtype is not None and self.dtype not in vt.TENSOR_DTYPES:
            raise InvalidArgument(f"constraint 'dtype': unknown dtype {self.dtype!r}")

    def validate(self, value: Any, type_name: str, what: str = "value") -> None:
        """Raise InvalidArgument naming the broken constraint; return None when ``value`` fits."""
        if not self:
            return
        if type_name in _NUMERIC:
            self._check_range(value, what)
        elif type_name in (vt.TENSOR, vt.EMBEDDING):
            self._check_array(value, type_name, what)
        if type_name in _SIZED:
            self._check_length(value, what)
        if self.choices is not None and value not in self.choices:
            raise InvalidArgument(
                f"{what} {_preview(value)} is not one of the allowed choices "
                f"{_preview(list(self.choices))}"
            )
        if self.pattern is not None and not _compiled(self.pattern).fullmatch(value):
            raise InvalidArgument(
                f"{what} {_preview(value)} does not match pattern {self.pattern!r}"
            )

    def _check_range(self, value: float, what: str) -> None:
        if (
            isinstance(value, float)
            and math.isnan(value)
            and (self.min is not None or self.max is not None)
        ):
            raise InvalidArgument(f"{what} is NaN, outside the range [{self.min}, {self.max}]")
        if self.min is not None and value < self.min:
            raise InvalidArgument(f"{what} {value!r} is below the minimum {self.min:g}")
        if self.max is not None and value > self.max:
            raise InvalidArgument(f"{what} {value!r} is above the maximum {self.max:g}")

    def _check_length(self, value: Any, what: str) -> None:
        length = len(value)
        if self.min_length is not None and length < self.min_length:
            raise InvalidArgument(
                f"{what} has length {length}, below the minimum length {self.min_length}"
            )
        if self.max_length is not None and length > self.max_length:
            raise InvalidArgument(
                f"{what} has length {length}, above the maximum length {self.max_length}"
            )

    def _check_array(self, array: np.ndarray, type_name: str, what: str) -> None:
        if self.dtype is not None and array.dtype.name != self.dtype:
            raise InvalidArgument(f"{what} has dtype {array.dtype.name}, expected {self.dtype}")
        if self.shape is not None and (
            len(self.shape) != array.ndim
            or any(want not in (-1, got) for want, got in zip(self.shape, array.shape, strict=True))
        ):
            raise InvalidArgument(
                f"{what} has shape {list(array.shape)}, expected {list(self.shape)}"
            )
        if self.dimensions is not None and array.shape != (self.dimensions,):
            raise InvalidArgument(
                f"{what} has {array.shape[0] if array.ndim else 0} dimensions, expected {self.dimensions}"
            )
        if array.size and (self.min is not None or self.max is not None):
            if array.dtype.kind == "c":
                raise InvalidArgument(f"{what}: min/max do not apply to complex {type_name}s")
            low, high = float(array.min()), float(array.max())
            if self.min is not None and not low >= self.min:
                raise InvalidArgument(
                    f"{what} has an element {low!r} below the minimum {self.min:g}"
                )
            if self.max is not None and not high <= self.max:
                raise InvalidArgument(
                    f"{what} has an element {high!r} above the maximum {self.max:g}"
                )


EMPTY = Constraints()


def _opt(conv: Any, value: Any) -> Any:
    return None if value is None else conv(value)


def _short(exc: BaseException, limit: int = 200) -> str:
    return _clip(str(exc), limit)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _preview(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut short: error messages must stay small whatever the value."""
    return _clip(repr(value), limit)


def _json_value(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidArgument(f"{what} is not valid JSON: {_short(exc)}") from None


def _json_object(text: str | bytes, what: str) -> Mapping[str, Any]:
    value = _json_value(text, what)
    if not isinstance(value, Mapping):
        raise InvalidArgument(f"{what} must be a JSON object")
    return value


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = MAX_PATTERN_MEMORY


@lru_cache(maxsize=256)
def _compiled(pattern: str) -> Any:
    """The RE2 program of ``pattern``: matching is linear in the value, whatever the pattern."""
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        raise InvalidArgument(
            f"constraint 'pattern' is not a valid RE2 regular expression: {_short(exc)} "
            "(RE2 has no lookaround or backreferences)"
        ) from None
