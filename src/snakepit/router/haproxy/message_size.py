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

HAProxy 2.6 resets a stream it answered before its request ended, with CANCEL
(haproxy/haproxy#1219). snakepit's clients and grpc-go read the answer that came first; a client
on gRPC's C core (grpcio's own channel, C++, Ruby) reports the reset, CANCELLED. So a message
up to ``DRAIN_EXTRA`` over the limit goes to a Lua applet (``message_size.lua``) that reads the
request to its end and then answers: every client reads RESOURCE_EXHAUSTED. Reading costs
HAProxy ~1 ms of CPU per 1 MB (0.08 s for 100 MB, measured) and the caller the upload; a
longer message is answered from its prefix at once, as before (CANCELLED for the C core).
"""

from __future__ import annotations

from importlib import resources

from ...errors import ResourceExhausted
from ...protocol import SERVICE_NAME, pb
from .replies import detail, error_headers, quote

HEX_DIGITS = "0123456789ABCDEF"
# The prefix: a flag byte, then the length.
PREFIX = 5
WIDTH = 8  # hex digits of the 4-byte length
# A message at most this much over the limit is read to its end before the refusal goes out.
DRAIN_EXTRA = 256 << 20
LUA_SCRIPT = "message_size.lua"
LUA_SERVICE = "snakepit_answer_after_body"


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


def lua_script_path() -> str:
    """Where the applet's script is (package data, read by HAProxy at start-up)."""
    return str(resources.files(__package__).joinpath(LUA_SCRIPT))


def global_lines(max_message_bytes: int) -> list[str]:
    """``global`` lines: the applet, when there is a limit to keep."""
    if max_message_bytes <= 0:
        return []
    return [f"  lua-load {quote(lua_script_path())}"]


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
    prefixed = f"{unary} {{ req.body_len ge {PREFIX} }}"
    drained = min(max_message_bytes + DRAIN_EXTRA, 16**WIDTH - 2)
    over_limit = f"{{ req.body,bytes(1,4),hex -m reg {hex_above(max_message_bytes)} }}"
    over_drain = f"{{ req.body,bytes(1,4),hex -m reg {hex_above(drained)} }}"
    refused = "{ var(txn.refusal_status) -m found }"
    # One regular expression per call as before; the rest only for a refused one.
    return [
        f"  http-request wait-for-body time {wait_ms}ms at-least {PREFIX} if {unary}",
        f"  http-request set-var(txn.refusal_status) str({refusal.code.value[0]}) "
        f"if {prefixed} {over_limit}",
        f"  http-request return status 200 {error_headers(refusal)} if {refused} {over_drain}",
        f"  http-request set-var-fmt(txn.refusal_message) {quote(refusal.message)} if {refused}",
        f"  http-request set-var-fmt(txn.refusal_detail) {detail(refusal)} if {refused}",
        f"  http-request use-service lua.{LUA_SERVICE} if {refused}",
    ]
