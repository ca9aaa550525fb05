"""HAProxy refuses a request message over the router's ``--max-message-mb`` itself.

A gRPC message travels behind a 5-byte prefix: a compression flag and its length (4 bytes, big
endian). HAProxy streams request bodies on unread, so an oversized message used to reach the
server behind it (a worker, or the Python router) whole or in part; that server answered
RESOURCE_EXHAUSTED at once, before the body ended, and HAProxy 2.6 turned that early answer
into a stream reset, which the caller saw as CANCELLED: the wrong status, no message, and a
100 MB write carried through HAProxy for nothing. So HAProxy reads the prefix (it waits for
the first 5 bytes of every request but a client-streaming one, which may send nothing before
it hears from the server) and answers a length over the limit itself: RESOURCE_EXHAUSTED,
naming the limit and its flag.

HAProxy 2.6 has no converter from bytes to an integer, so the length is compared as 8
upper-case hex digits against a regular expression that matches exactly the values over the
limit (``hex_above``).
"""

from __future__ import annotations

from ...errors import ResourceExhausted
from ...protocol import SERVICE_NAME, pb
from .replies import error_headers

HEX_DIGITS = "0123456789ABCDEF"
# The prefix: a flag byte, then the length.
PREFIX = 5
WIDTH = 8  # hex digits of the 4-byte length


def hex_above(limit: int) -> str:
    """A regular expression matching the ``WIDTH``-digit upper-case hex numbers > ``limit``."""
    if not 0 <= limit < 16**WIDTH - 1:
        raise ValueError(f"limit must be in 0..{16**WIDTH - 2}, got {limit}")
    digits = f"{limit:0{WIDTH}X}"
    branches = []
    for i, digit in enumerate(digits):
        higher = HEX_DIGITS[HEX_DIGITS.index(digit) + 1 :]
        if higher:
            rest = WIDTH - i - 1
            branches.append(digits[:i] + f"[{higher}]" + (f"[0-9A-F]{{{rest}}}" if rest else ""))
    return "^(" + "|".join(branches) + ")$"


def client_streaming_paths() -> list[str]:
    """Paths of the RPCs whose caller may send nothing until the server has spoken."""
    service = pb.DESCRIPTOR.services_by_name["BridgeService"]
    return [f"/{SERVICE_NAME}/{m.name}" for m in service.methods if m.client_streaming]


def oversize_lines(max_message_bytes: int, wait_ms: int) -> list[str]:
    """Frontend lines that refuse a request message longer than ``max_message_bytes``, placed
    after the tool calls' own ``wait-for-body`` (which has the prefix by then); 0: none."""
    if max_message_bytes <= 0:
        return []
    megabytes = max_message_bytes / (1 << 20)
    refusal = ResourceExhausted(
        f"the request's message is larger than this router's limit of {megabytes:g} MiB "
        "(--max-message-mb)"
    )
    unary = f"!{{ path {' '.join(client_streaming_paths())} }}"
    length = f"req.body,bytes(1,4),hex -m reg {hex_above(max_message_bytes)}"
    return [
        f"  http-request wait-for-body time {wait_ms}ms at-least {PREFIX} if {unary}",
        f"  http-request return status 200 {error_headers(refusal)} "
        f"if {unary} {{ req.body_len ge {PREFIX} }} {{ {length} }}",
    ]
