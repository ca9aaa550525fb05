"""HAProxy's log of the tool calls it carries, turned into the router's call metrics.

Tool calls through HAProxy never reach the Python router, so its per-call metrics (calls by
tool and code, latency, queue wait, rejections, request bytes, time on each worker) are made
from HAProxy's own account of each call: one line per call (``config.call_log_target``, fields
``config.CALL_LOG_FIELDS``) that HAProxy forwards from a ring over a unix stream socket
(``config.call_log_ring``) the router reads on its event loop. ``parse`` decides what a line
says (pure); ``CallLog`` applies it to ``RouterMetrics``.

What a line cannot say, and what is done instead:

- *The status of an answer that carried a message*: gRPC puts it in the trailers and HAProxy 2.6
  cannot fetch trailers (haproxy/haproxy#112). A worker answers ``ExecuteTool`` with a message
  only on success (a failure aborts the call before any message: a trailers-only answer, whose
  ``grpc-status`` is a header HAProxy reads), so a cleanly ended ``ExecuteTool`` with no status
  header is ``OK``; one whose worker went away mid-answer is ``unknown``, which is what a gRPC
  client saw (UNKNOWN: HAProxy ended the answer without a status). Streaming calls, whose
  first chunk comes before their outcome is known, go through the Python router
  (``config.FAST_METHODS``), which counts them itself.
- *Response bytes*: HAProxy counts the HTTP/2 headers and trailers with the data (``%B``), not
  the messages the Python router counts; the line carries the answer's message length instead,
  read from its gRPC prefix (``config.call_log_answer_lines``).
- *Time*: HAProxy's timers (``%Ta``, ``%Tw``...) are milliseconds; a call's own duration is
  taken in microseconds from the dates HAProxy logs for its start and end (``txn.t0``,
  ``date(0,us)``), which also place its spans in time (the line arrives up to
  ``BATCH_SECONDS`` later). Its time queued and to receive the request stay milliseconds.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
import socket
from collections.abc import Callable
from typing import Any, NamedTuple

import grpc

from ...metrics import RouterMetrics
from ...protocol import SERVICE_NAME
from .config import CALL_LOG_FIELDS, CALL_LOG_LINE, CONTROL_BACKEND, FAST_METHODS
from .message_size import PREFIX as GRPC_PREFIX
from .spans import record

log = logging.getLogger("snakepit.router")

_FIELDS = len(CALL_LOG_FIELDS)
(
    _BACKEND, _SERVER, _TERM, _TW, _TA, _TR, _TC, _RC, _SQ, _BQ, _GRPC, _BODY, _SENT, _PATH,
    _PARENT, _SPAN, _ATTEMPT, _STARTED, _ENDED, _TOOL,
) = (
    CALL_LOG_FIELDS.index(f)
    for f in (
        "%b", "%s", "%ts", "%Tw", "%Ta", "%TR", "%Tc", "%rc", "%sq", "%bq",
        "%[var(txn.grpc)]", "%[var(txn.body)]", "%[var(txn.sent)]", "%HPO", "%[var(txn.parent)]",
        "%[var(txn.span)]", "%[var(txn.attempt)]", "%[var(txn.t0)]", "%[date(0,us)]",
        "%[var(txn.tool)]",
    )
)  # fmt: skip
_METHODS = {f"/{SERVICE_NAME}/{m}".encode(): m for m in FAST_METHODS}
_CODES = {str(code.value[0]).encode(): str(code.name) for code in grpc.StatusCode}
_NO_SERVER = b"<NOSRV>"
MAX_TOOL_HEX = 1024  # names over 512 bytes are not labelled (as ``metrics.common.tool_name_of``)
UNKNOWN = "unknown"
# A line longer than this without its newline is no call log line (HAProxy truncates its lines
# at CALL_LOG_LINE): it is dropped rather than buffered without end.
MAX_PENDING = 4 * CALL_LOG_LINE
BATCH_SECONDS = 0.05  # how often a busy call log is read (``_Lines``)


class Call(NamedTuple):
    """What one line of the call log says about a call HAProxy ended."""

    method: str  # ExecuteTool (config.FAST_METHODS)
    tool_hex: bytes  # the tool name in hex; b"" when unknown
    code: str  # gRPC status name, or "unknown"
    seconds: float  # first request byte to the end
    waited: float | None  # time queued, for a call that queued and then got a worker
    slot: bytes  # the server of the attempt on a worker; b"" when none was made
    attempt: float  # seconds of that attempt
    rejection: str  # a ``metrics.router.REJECTION_REASONS`` value for a call never sent; ""
    received: int  # request message bytes
    sent: int  # the answer's message bytes (0: it had none, or it was cut off)
    retries: int  # connections tried again (each failed to connect: UNAVAILABLE)
    parent: str = ""  # the caller's traceparent (with tracing on); ""
    span_id: int = 0  # the id HAProxy gave the router's span (``config.trace_lines``); 0: none
    attempt_span_id: int = 0  # ... and the span of its attempt on a worker
    ended_us: int = 0  # when HAProxy ended the call, microseconds since the epoch; 0: unknown


def parse(line: bytes) -> Call | None:
    """The call a log line describes; None for a line that is not a tool call HAProxy carried
    (other RPCs, and tool calls it passed to the Python router, which counts them itself)."""
    fields = line.rstrip(b"\n").split(b" ")
    if len(fields) != _FIELDS:
        return None
    method = _METHODS.get(fields[_PATH])
    if method is None or fields[_BACKEND] == _CONTROL:
        return None
    state = fields[_TERM]
    code = _CODES.get(fields[_GRPC]) or _code_without_status(method, state)
    total, queued, request, connect = (
        _ms(fields[_TA]), _ms(fields[_TW]), _ms(fields[_TR]), _ms(fields[_TC]),
    )  # fmt: skip
    started, ended = _ms(fields[_STARTED]), _ms(fields[_ENDED])
    exact = started > 0 and ended >= started  # microseconds; else %Ta's milliseconds
    seconds = (ended - started) / 1e6 if exact else max(total, 0) / 1000
    # A connection to a worker was made (after any queueing). An applet that answered the call
    # itself (``<lua.…>``: ``message_size``'s refusal after the body) logs a connect time of 0.
    applet = fields[_SERVER].startswith(b"<") and fields[_SERVER] != _NO_SERVER
    sent = connect >= 0 and not applet
    was_queued = fields[_SQ] != b"0" or fields[_BQ] != b"0"
    tool = fields[_TOOL]
    body = _ms(fields[_BODY])
    return Call(
        method=method,
        tool_hex=tool if len(tool) <= MAX_TOOL_HEX and tool != b"-" else b"",
        code=code,
        seconds=seconds,
        waited=queued / 1000 if was_queued and sent and queued >= 0 else None,
        slot=fields[_SERVER] if sent else b"",
        attempt=max(seconds - (max(queued, 0) + max(request, 0)) / 1000, 0),
        rejection="" if sent or applet else _rejection(state, fields[_SERVER], code),
        received=max(body - GRPC_PREFIX, 0),
        sent=_hex(fields[_SENT]) if code == "OK" else 0,  # a cut answer was not all sent
        retries=max(_ms(fields[_RC].lstrip(b"+")), 0),
        ended_us=ended if exact else 0,
        **_trace_of(fields[_PARENT], fields[_SPAN], fields[_ATTEMPT]),
    )


_CONTROL = CONTROL_BACKEND.encode()


def _trace_of(parent: bytes, span: bytes, attempt: bytes) -> dict[str, Any]:
    """The trace fields of a call HAProxy gave span ids (its traceparent matched the pattern
    in ``config.trace_lines``); none otherwise."""
    if len(span) != 16 or len(attempt) != 16 or parent == b"-":
        return {}
    try:
        return {
            "parent": parent.decode("ascii"),
            "span_id": int(span, 16),
            "attempt_span_id": int(attempt, 16),
        }
    except ValueError:
        return {}


def _hex(field: bytes) -> int:
    """A length HAProxy logged in hex (``config.call_log_answer_lines``); 0 for "-"."""
    try:
        return int(field, 16)
    except ValueError:
        return 0


def _ms(field: bytes) -> int:
    try:
        return int(field)
    except ValueError:
        return -1


def _code_without_status(method: str, state: bytes) -> str:
    """The status of a call whose response headers had no ``grpc-status`` (see the module)."""
    if state[:1] == b"C":  # the caller went away (cancelled, or its deadline passed)
        return "CANCELLED"
    if state == b"--" and method == "ExecuteTool":
        return "OK"
    return UNKNOWN


def _rejection(state: bytes, server: bytes, code: str) -> str:
    """Why a call that never reached a worker did not: the router's rejection reasons."""
    if state[1:2] == b"Q" and code == "DEADLINE_EXCEEDED":
        return "queue_timeout"  # HAProxy's 503 after ``timeout queue``, answered as such
    if server == _NO_SERVER and code == "RESOURCE_EXHAUSTED":
        return "queue_full"  # the backend's queue or its principal's line was full
    if server == _NO_SERVER and code == "DEADLINE_EXCEEDED":
        return "queue_timeout"  # waited out its principal's line (``principal_shares``)
    if server == _NO_SERVER and code == "UNAVAILABLE":
        # HAProxy found no worker up as it picked one (``config._answer_503``). A call that
        # finds none ready before that goes to the Python router, which counts it there if
        # it waits in vain.
        return "no_worker"
    return ""


class CallLog:
    """Reads the call log on the router's event loop: counts each call into ``metrics`` and,
    with a ``tracer``, records the router's span of each traced call (``spans.record``).

    ``worker_of`` names the worker a server slot carries (``servers.ServerSync.worker_of``).
    """

    def __init__(
        self,
        metrics: RouterMetrics | None,
        worker_of: Callable[[bytes], str | None],
        tracer: Any = None,
    ) -> None:
        self.metrics = metrics
        self.worker_of = worker_of
        self.tracer = tracer
        self._tools: dict[bytes, str] = {}  # hex -> name; bounded like the labels themselves
        self.server: asyncio.AbstractServer | None = None

    def line_received(self, line: bytes) -> None:
        call = parse(line)
        if call is not None:
            self.apply(call)

    def apply(self, call: Call) -> None:
        if self.tracer is not None and call.span_id:
            worker = self.worker_of(call.slot) if call.slot else None
            record(self.tracer, call, self._tool(call.tool_hex), worker)
        if self.metrics is not None:
            self._count(self.metrics, call)

    def _count(self, metrics: RouterMetrics, call: Call) -> None:
        metrics.call_seen(call.method, self._tool(call.tool_hex), call.code, call.seconds)
        if call.received:
            metrics.request_bytes(call.method, call.received)
        if call.sent:
            metrics.response_bytes(call.method, call.sent)
        if call.waited is not None:
            metrics.queue_wait.observe(call.waited)
        if call.slot:
            worker = self.worker_of(call.slot)
            if worker is not None:
                metrics.attempt_seconds(worker, call.attempt)
        if call.rejection:
            metrics.rejected_for(call.rejection)
        if call.retries:
            metrics.retries.labels("UNAVAILABLE").inc(call.retries)

    def _tool(self, tool_hex: bytes) -> str:
        name = self._tools.get(tool_hex)
        if name is None:
            try:
                name = binascii.unhexlify(tool_hex).decode("utf-8", "replace")
            except (binascii.Error, ValueError):
                name = ""
            if len(self._tools) >= 1000:  # random names: keep the cache small, labels are
                self._tools.clear()  # bounded by ``BoundedLabels`` anyway
            self._tools[tool_hex] = name
        return name

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


class _Lines(asyncio.Protocol):
    """One connection of HAProxy's ring forwarder: newline-terminated lines.

    Read in batches: after a read the connection is left alone for ``BATCH_SECONDS`` while
    lines gather in the socket (and in HAProxy's ring behind it), so under load one wake-up of
    the event loop reads hundreds. Read as they came, a line or two per wake-up, each line cost
    the router 35-45 us of CPU on this 2-core machine instead of the 5 us it takes in a
    loop (the interpreter's caches are cold each time it wakes between the worker's and
    HAProxy's turns). A line that finds the connection idle is read at once."""

    def __init__(self, log: CallLog) -> None:
        self.log = log
        self.pending = b""
        self.transport: asyncio.Transport | None = None
        self._resume: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._resume is not None:
            self._resume.cancel()
        self.transport = None

    def data_received(self, data: bytes) -> None:
        lines = (self.pending + data).split(b"\n")
        self.pending = lines.pop()
        if len(self.pending) > MAX_PENDING:
            self.pending = b""
        for line in lines:
            try:
                self.log.line_received(line)
            except Exception:  # one bad line must not close the connection (and lose the rest)
                log.exception("call log: a line could not be counted: %r", line[:200])
        if self.transport is not None and self._resume is None:
            self.transport.pause_reading()
            self._resume = asyncio.get_running_loop().call_later(BATCH_SECONDS, self._read_again)

    def _read_again(self) -> None:
        self._resume = None
        if self.transport is not None:
            self.transport.resume_reading()


def abstract_address(name: str) -> str:
    """HAProxy's name of a Linux abstract socket (no file to leave behind)."""
    return f"abns@{name}"


async def listen(
    name: str,
    metrics: RouterMetrics | None,
    worker_of: Callable[[bytes], str | None],
    tracer: Any = None,
) -> CallLog:
    """Read the call log on abstract socket ``name`` from now on (before HAProxy starts, so
    its forwarder's first connection finds a listener)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # HAProxy connects to abstract names padded with NULs to the whole sun_path (108 bytes).
        sock.bind(("\0" + name).ljust(108, "\0"))
    except BaseException:
        sock.close()
        raise
    reader = CallLog(metrics, worker_of, tracer)
    reader.server = await asyncio.get_running_loop().create_unix_server(
        lambda: _Lines(reader), sock=sock
    )
    return reader
