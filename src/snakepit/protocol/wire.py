"""Protobuf wire format primitives, for the messages that carry tool arguments and results.

The generated protobuf classes copy every bytes field at least twice (into the arena on parse,
out of it on access), and a 100 MB tensor pays ~60 ms a copy on these machines. The hot tool
messages are therefore written and read here, straight from and into the buffers gRPC hands us,
so a tensor's bytes are viewed (``memoryview``) rather than copied. The bytes produced are plain
protobuf: any other protobuf implementation reads them, and tests check both directions against
the generated classes.
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import InvalidArgument

WIRE_VARINT = 0
WIRE_FIXED64 = 1
WIRE_LEN = 2
WIRE_FIXED32 = 5

Chunk = bytes | memoryview


def varint(value: int) -> bytes:
    """Encode a non-negative int (or an int64 as two's complement) as a protobuf varint."""
    if value < 0:
        value += 1 << 64
    if value < 0x80:
        return bytes((value,))
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint((field << 3) | wire_type)


def len_field(field: int, payload_len: int) -> bytes:
    """The tag and length prefix of a length-delimited field."""
    return varint((field << 3) | WIRE_LEN) + varint(payload_len)


class WireMessage:
    """A length-delimited protobuf field builder: chunks plus their total size."""

    __slots__ = ("chunks", "size")

    def __init__(self) -> None:
        self.chunks: list[Chunk] = []
        self.size = 0

    def add_bytes(self, field: int, payload: Chunk) -> None:
        head = len_field(field, len(payload))
        self.chunks.append(head)
        self.chunks.append(payload)
        self.size += len(head) + len(payload)

    def add_str(self, field: int, text: str) -> None:
        if text:
            self.add_bytes(field, text.encode())

    def add_message(self, field: int, message: WireMessage) -> None:
        head = len_field(field, message.size)
        self.chunks.append(head)
        self.chunks.extend(message.chunks)
        self.size += len(head) + message.size

    def add_raw(self, data: bytes) -> None:
        self.chunks.append(data)
        self.size += len(data)

    def to_bytes(self) -> bytes:
        return b"".join(self.chunks)


def read_varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise InvalidArgument("malformed message: truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7
        if shift >= 70:
            raise InvalidArgument("malformed message: varint too long")


def to_int64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def iter_fields(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """Yield ``(field, wire_type, value_or_start, stop)`` for each field in ``buf[pos:end]``.

    For varints ``value_or_start`` is the value and ``stop`` is unused; for length-delimited and
    fixed fields it is the payload's start and ``stop`` its end. Unknown fields are the caller's
    to skip, which keeps the format forward-compatible.
    """
    while pos < end:
        # One-byte varints (tags of fields 1-15, lengths below 128) without a call: most of a
        # small message's fields, decoded on the worker's event loop for every call.
        key = buf[pos]
        if key < 0x80:
            pos += 1
        else:
            key, pos = read_varint(buf, pos, end)
        field, wire_type = key >> 3, key & 7
        if field == 0:
            raise InvalidArgument("malformed message: field number 0")
        if wire_type == WIRE_VARINT:
            value, pos = read_varint(buf, pos, end)
            yield field, wire_type, value, pos
        elif wire_type == WIRE_LEN:
            length = buf[pos] if pos < end else 0x80
            if length < 0x80:
                pos += 1
            else:
                length, pos = read_varint(buf, pos, end)
            stop = pos + length
            if stop > end:
                raise InvalidArgument("malformed message: length-delimited field runs past the end")
            yield field, wire_type, pos, stop
            pos = stop
        elif wire_type == WIRE_FIXED64:
            if pos + 8 > end:
                raise InvalidArgument("malformed message: truncated fixed64 field")
            yield field, wire_type, pos, pos + 8
            pos += 8
        elif wire_type == WIRE_FIXED32:
            if pos + 4 > end:
                raise InvalidArgument("malformed message: truncated fixed32 field")
            yield field, wire_type, pos, pos + 4
            pos += 4
        else:
            raise InvalidArgument(f"malformed message: unsupported wire type {wire_type}")


def read_pair(buf: memoryview, start: int, stop: int) -> tuple[int, int, int, int] | None:
    """A message laid out as every encoder writes a map entry or a ``Value``: field 1 then one
    more length-delimited field, one-byte tags, nothing else. Returns ``(first_start,
    first_stop, second_field, second_start)`` (the second runs to ``stop``); None for any other
    layout, which the caller then reads field by field with ``iter_fields``.

    Reading those two fields here, without a generator, halves the cost of decoding a small
    call's arguments, which the worker does on its event loop for every call.
    """
    if stop - start < 4 or buf[start] != 0x0A:  # field 1, length-delimited
        return None
    first_start = start + 2
    first_stop = first_start + buf[start + 1]
    if buf[start + 1] >= 0x80 or first_stop + 2 > stop:
        return None
    key = buf[first_stop]
    if key >= 0x80 or key & 7 != WIRE_LEN:
        return None
    length, second_start = buf[first_stop + 1], first_stop + 2
    if length >= 0x80:
        length, second_start = read_varint(buf, first_stop + 1, stop)
    if second_start + length != stop:
        return None
    return first_start, first_stop, key >> 3, second_start


def read_packed_int64(buf: memoryview, start: int, stop: int) -> list[int]:
    values = []
    pos = start
    while pos < stop:
        value, pos = read_varint(buf, pos, stop)
        values.append(to_int64(value))
    return values
