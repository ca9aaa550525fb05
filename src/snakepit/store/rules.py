"""The checks every backend makes the same way, so memory, Redis and remote refuse alike.

A variable's *declaration* (type, constraints, metadata and a random token) is frozen into one
string. Backends store that string next to the value: the Redis backend validates a write in
Python against the declaration string it last saw and lets its Lua script refuse the write if
the stored string differs, which keeps validation out of Lua and a write at one round trip.
"""

from __future__ import annotations

import json
import math
import secrets
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from types import MappingProxyType
from typing import Any, Protocol

import numpy as np

from ..errors import InvalidArgument
from ..protocol import Constraints, decode_value, encode_value
from ..protocol import value_types as vt
from ..protocol.constraints import EMPTY
from .limits import DEFAULT_LIMITS, StoreLimits

MAX_ID_LENGTH = 256
MAX_NAME_LENGTH = 256
# Lua (and so the Redis backend) adds integers exactly only below this magnitude.
EXACT_INT_LIMIT = 2**53
_NO_METADATA: Mapping[str, str] = MappingProxyType({})
UNDECODED: Any = object()  # a checked value that was never decoded here (see ``Encoded``)


def new_session_id() -> str:
    return uuid.uuid4().hex


def check_session_id(session_id: str) -> str:
    """Refuse ids that are empty, too long, or could alias another session's Redis keys."""
    if not isinstance(session_id, str) or not session_id:
        raise InvalidArgument("session id is empty")
    if len(session_id) > MAX_ID_LENGTH:
        raise InvalidArgument(f"session id is longer than {MAX_ID_LENGTH} characters")
    if not session_id.isprintable() or "{" in session_id or "}" in session_id:
        raise InvalidArgument(
            f"session id {session_id!r} may only hold printable characters other than '{{' and '}}'"
        )
    return session_id


def check_name(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise InvalidArgument("variable name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"variable name is longer than {MAX_NAME_LENGTH} characters")
    return name


def check_ttl(ttl: float | None, default: float, limits: StoreLimits = DEFAULT_LIMITS) -> float:
    """A session's TTL in seconds: ``None`` or 0 means the store's default."""
    return limits.check_ttl(ttl, default)


def check_metadata(
    metadata: Mapping[str, str] | None, limits: StoreLimits = DEFAULT_LIMITS, what: str = "session"
) -> dict[str, str]:
    return limits.check_metadata(metadata, what)


_SCALAR_HEAD = {vt.INTEGER: b"\n\x07integer\x12", vt.FLOAT: b"\n\x05float\x12"}


def store_bytes(value: Any, type_name: str) -> bytes:
    """The stored form of a checked value: codec bytes, arrays always binary (never JSON).

    Integers and finite floats, the bulk of session variables, are written directly: the same
    bytes the codec writes, in a fifth of the time.
    """
    head = _SCALAR_HEAD.get(type_name)
    if head is not None and (type(value) is int or (type(value) is float and math.isfinite(value))):
        text = repr(value).encode()
        if len(text) < 128:
            return head + bytes((len(text),)) + text
    return encode_value(value, type_name, threshold=0)


def load_bytes(data: bytes) -> Any:
    """A stored value back: integers and floats read directly, the rest through the codec."""
    if len(data) < 128 and data[:1] == b"\n":
        n = data[1]
        if data[2 + n : 4 + n] == bytes((0x12, len(data) - 4 - n)):
            kind = data[2 : 2 + n]
            if kind == b"integer":
                return int(data[4 + n :])
            if kind == b"float":
                return float(data[4 + n :])
    return decode_value(data)


# Types whose stored form is copied, not parsed, when read (raw bytes, binary arrays).
_COPIED = frozenset({vt.BYTES, vt.TENSOR, vt.EMBEDDING})


@dataclass(frozen=True, slots=True)
class Declaration:
    """A variable's type, constraints and metadata, plus a token naming this declaration."""

    type: str
    constraints: Constraints = EMPTY
    metadata: Mapping[str, str] = field(default_factory=lambda: _NO_METADATA)
    token: str = ""

    @classmethod
    def new(
        cls,
        type_name: str,
        constraints: Constraints = EMPTY,
        metadata: Mapping[str, str] | None = None,
        limits: StoreLimits = DEFAULT_LIMITS,
    ) -> Declaration:
        vt.check_type_name(type_name)
        constraints.check_applies(type_name)
        meta = MappingProxyType(limits.check_metadata(metadata, "variable"))
        return cls(type_name, constraints, meta, secrets.token_hex(8))

    def encode(self) -> str:
        meta = json.dumps(dict(self.metadata), sort_keys=True) if self.metadata else ""
        return f"{self.type}\n{self.token}\n{self.constraints.to_json()}\n{meta}"

    def prepare(
        self, value: Any, name: str, limits: StoreLimits = DEFAULT_LIMITS
    ) -> tuple[Any, bytes]:
        """Check ``value`` against this declaration: ``(coerced value, stored bytes)``.

        Pure and thread-safe, so a store may run it off its event loop for a large value.
        """
        what = f"value of {name!r}"
        coerced = vt.coerce(value, self.type, what)
        self.constraints.validate(coerced, self.type, what)
        data = store_bytes(coerced, self.type)
        limits.check_value_size(name, len(data), parsed=self.type not in _COPIED)
        return coerced, data


@lru_cache(maxsize=4096)
def parse_declaration(text: str) -> Declaration:
    """The declaration a stored string describes (cached: the same strings recur constantly)."""
    try:
        type_name, token, constraints, meta = text.split("\n", 3)
    except ValueError as exc:
        raise InvalidArgument(f"malformed variable declaration {text[:80]!r}") from exc
    try:
        metadata = MappingProxyType(json.loads(meta)) if meta else _NO_METADATA
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"malformed variable declaration {text[:80]!r}") from exc
    return Declaration(type_name, Constraints.from_json(constraints), metadata, token)


_IMMUTABLE = frozenset({vt.NULL, vt.BOOLEAN, vt.INTEGER, vt.FLOAT, vt.STRING, vt.BYTES})


def written_value(coerced: Any, data: bytes, type_name: str) -> Any:
    """The value a write returns: the checked value when immutable, else ``UNDECODED`` (the
    variable decodes its stored bytes when asked, so the caller never holds an alias of what
    was stored, and a router that only answers with the bytes never decodes them)."""
    return coerced if type_name in _IMMUTABLE else UNDECODED


def inferred_declaration(
    value: Any, type_name: str | None, limits: StoreLimits = DEFAULT_LIMITS
) -> Declaration:
    """The declaration a write gives a variable that does not exist yet."""
    return Declaration.new(type_name or vt.infer_type(value), limits=limits)


def increment_type(by: Any, name: str, declared: str | None) -> str:
    """The numeric type an increment of ``name`` by ``by`` works in, or InvalidArgument."""
    if isinstance(by, bool | np.bool_) or not isinstance(
        by, int | float | np.integer | np.floating
    ):
        raise InvalidArgument(f"increment of {name!r} needs a number, got {vt.describe(by)}")
    integral = isinstance(by, int | np.integer)
    if declared is None:
        return vt.INTEGER if integral else vt.FLOAT
    if declared == vt.INTEGER:
        if not integral:
            raise InvalidArgument(f"variable {name!r} is an integer; cannot add the float {by!r}")
        return vt.INTEGER
    if declared == vt.FLOAT:
        return vt.FLOAT
    raise InvalidArgument(
        f"variable {name!r} has type {declared}; "
        "only integer and float variables can be incremented"
    )


def add(current: Any, by: Any, kind: str) -> int | float:
    return int(current) + int(by) if kind == vt.INTEGER else float(current) + float(by)


class Checker(Protocol):
    """Where an ``Encoded`` value is decoded and checked (``store.offload.ValueHelpers``)."""

    async def check(
        self, decl_text: str, type_name: str, name: str, what: str, data: bytes
    ) -> tuple[str, bytes]:
        """``check_encoded`` of these arguments, run elsewhere."""
        ...


@dataclass(frozen=True, slots=True)
class Encoded:
    """A written value still in its wire form (a serialised ``Value``), too large to decode on
    the event loop: ``check_value`` has ``checker`` decode, check and re-encode it (in a helper
    process), or does it here when there is none. ``what`` names the value in decode errors,
    as the inline decoder does (``SetVariable 'x': malformed value: ...``)."""

    data: bytes
    what: str
    checker: Checker | None = None


def check_encoded(
    decl_text: str,
    type_name: str,
    name: str,
    what: str,
    data: bytes | memoryview,
    limits: StoreLimits,
) -> tuple[str, bytes]:
    """Decode ``data``, check it against the declaration ``decl_text`` (empty: the one a new
    variable gets, typed ``type_name`` or inferred) and return ``(declaration text, stored
    bytes)``. Bytes in, text and bytes out: what a helper process runs for ``check_value``, with
    the same steps and messages as a value checked inline."""
    try:
        value = decode_value(data)
    except InvalidArgument as exc:
        raise InvalidArgument(f"{what}: {exc.message}") from None
    if decl_text:
        decl = parse_declaration(decl_text)
    else:
        decl = inferred_declaration(value, type_name or None, limits)
        decl_text = decl.encode()
    _, stored = decl.prepare(value, name, limits)
    return decl_text, stored


async def check_value(
    decl: Declaration | None,
    value: Any,
    name: str,
    limits: StoreLimits = DEFAULT_LIMITS,
    type_name: str | None = None,
) -> tuple[Declaration, Any, bytes]:
    """Check a written ``value`` against ``decl`` (None: a new variable's, typed ``type_name``
    or inferred): ``(declaration, checked value or UNDECODED, stored bytes)``.

    The one path every backend writes through. A Python value (every small one) is checked
    here and now, without awaiting, so a memory store's write stays atomic; an ``Encoded`` one
    awaits its checker, after which the caller must look again at what it checked against.
    """
    if isinstance(value, Encoded):
        text = "" if decl is None else decl.encode()
        args = (text, type_name or "", name, value.what, value.data)
        if value.checker is None:
            text, stored = check_encoded(*args, limits)
        else:
            text, stored = await value.checker.check(*args)
        return (parse_declaration(text) if decl is None else decl), UNDECODED, stored
    if decl is None:
        decl = inferred_declaration(value, type_name, limits)
    coerced, stored = decl.prepare(value, name, limits)
    return decl, coerced, stored
