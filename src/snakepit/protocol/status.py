"""Errors on the wire: a gRPC status code plus an ``ErrorDetail`` in trailing metadata.

Servers turn exceptions into that pair with ``error_metadata``/``status_of``; clients turn it back
into a ``snakepit.errors`` exception with ``error_from_rpc``. The router forwards trailing metadata
unchanged, so a worker's error reaches the client as the worker raised it.
"""

from __future__ import annotations

import logging
import traceback
import uuid
from collections.abc import Sequence
from typing import Any

import grpc

from ..bridge.v1 import bridge_pb2 as pb
from ..errors import Internal, SnakepitError, Unavailable, error_class_for, error_class_named

SESSION_ID_KEY = "snakepit-session-id"
CORRELATION_ID_KEY = "snakepit-correlation-id"
WORKER_ID_KEY = "snakepit-worker-id"
ERROR_DETAIL_KEY = "snakepit-error-bin"

Metadata = Sequence[tuple[str, str | bytes]]

# gRPC refuses response metadata above 16 KiB, and above 8 KiB (its soft limit) refuses it at
# random; the caller then sees RESOURCE_EXHAUSTED instead of the error. So the parts are cut to
# fit well under 8 KiB together, counted in UTF-8 bytes: the head of a message, the head and tail
# of a traceback; the status details (percent-encoded on the wire) carry a short ASCII form.
MAX_MESSAGE_BYTES = 1000
MAX_TRACEBACK_BYTES = 3500
MAX_TYPE_BYTES = 200
MAX_DETAILS_CHARS = 300

log = logging.getLogger("snakepit.errors")


def _head(text: str, max_bytes: int) -> str:
    return text.encode("utf-8", "surrogatepass")[:max_bytes].decode("utf-8", "ignore")


def _tail(text: str, max_bytes: int) -> str:
    return text.encode("utf-8", "surrogatepass")[-max_bytes:].decode("utf-8", "ignore")


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def truncate(text: str, max_bytes: int) -> str:
    """The head of ``text`` within ``max_bytes`` (UTF-8), saying how much was cut."""
    if _size(text) <= max_bytes:
        return text
    head = _head(text, max_bytes - 40)
    return f"{head}... [{len(text) - len(head)} more characters]"


def truncate_middle(text: str, max_bytes: int) -> str:
    """Head and tail of ``text`` within ``max_bytes``: a traceback's first frames and its end,
    where it was raised (a long message in between is what gets cut)."""
    if _size(text) <= max_bytes:
        return text
    keep = max_bytes - 60
    head, tail = _head(text, keep * 2 // 3), _tail(text, keep // 3)
    return f"{head}\n... [{len(text) - len(head) - len(tail)} characters cut] ...\n{tail}"


def status_details(message: str) -> str:
    """The short, ASCII form of a message that travels as the gRPC status details."""
    short = message if len(message) <= MAX_DETAILS_CHARS else message[:MAX_DETAILS_CHARS] + "..."
    return short.encode("ascii", "backslashreplace").decode("ascii")[: MAX_DETAILS_CHARS * 2]


def detail_of(
    exc: BaseException, worker_id: str = "", *, with_traceback: bool = True
) -> pb.ErrorDetail:
    if isinstance(exc, SnakepitError):
        return pb.ErrorDetail(
            type=truncate(exc.remote_type or type(exc).__name__, MAX_TYPE_BYTES),
            message=truncate(exc.message, MAX_MESSAGE_BYTES),
            traceback=truncate_middle(exc.remote_traceback or "", MAX_TRACEBACK_BYTES),
            worker_id=exc.worker_id or worker_id,
            not_started=exc.not_started,
        )
    tb = "".join(traceback.format_exception(exc)) if with_traceback else ""
    return pb.ErrorDetail(
        type=truncate(type(exc).__name__, MAX_TYPE_BYTES),
        message=truncate(str(exc), MAX_MESSAGE_BYTES),
        traceback=truncate_middle(tb, MAX_TRACEBACK_BYTES),
        worker_id=worker_id,
    )


def hide_internal(exc: BaseException) -> BaseException:
    """What a caller may see of ``exc`` raised by the server's own code (not a tool's).

    Our own errors pass as they are. Anything else is a bug: it is logged here with its
    traceback under a fresh correlation id, and the caller gets only INTERNAL and that id, so
    no server file path, line or internal state leaves the process.
    """
    if isinstance(exc, SnakepitError):
        return exc
    cid = uuid.uuid4().hex[:16]
    log.error("internal error", exc_info=exc, extra={"error_id": cid})
    return Internal(f"internal error (error id {cid}; the server log has the details)")


def status_of(exc: BaseException) -> grpc.StatusCode:
    """The status code an exception travels with: its own for ours, INTERNAL for a tool's."""
    if isinstance(exc, SnakepitError):
        return exc.code
    return grpc.StatusCode.INTERNAL


def error_metadata(detail: pb.ErrorDetail) -> tuple[tuple[str, bytes]]:
    return ((ERROR_DETAIL_KEY, detail.SerializeToString()),)


def find_metadata(metadata: Any, key: str) -> str | bytes | None:
    for item in metadata or ():
        if item[0] == key:
            return item[1]  # type: ignore[no-any-return]
    return None


def error_from_status(
    code: grpc.StatusCode, details: str | None, trailing: Any, *, from_tool_default: bool = False
) -> SnakepitError:
    """Rebuild the exception a server raised from what crossed the wire."""
    raw = find_metadata(trailing, ERROR_DETAIL_KEY)
    detail = pb.ErrorDetail()
    if isinstance(raw, bytes):
        try:
            detail.ParseFromString(raw)
        except Exception:  # a garbled detail must not hide the status itself
            detail.Clear()
    from_tool = bool(detail.traceback) or from_tool_default
    cls = error_class_for(code, from_tool=from_tool)
    remote_type = detail.type or None
    if remote_type == cls.__name__:
        remote_type = None
    return cls(
        detail.message or details or code.name,
        remote_type=remote_type,
        remote_traceback=detail.traceback or None,
        worker_id=detail.worker_id or None,
        not_started=detail.not_started,
        code=code,
    )


# What grpc core says of an answer that ended without a status (no trailers): a proxy that
# does not speak gRPC cut it off because its server went away midway (HAProxy 2.6 ends it with
# an empty DATA frame carrying END_STREAM; docs/architecture.md, "Queue and errors").
_CUT_OFF = "Data frame with END_STREAM flag received"


# What grpc core says of a stream the other end reset.
_RESET = "RST_STREAM"


def error_from_rpc(exc: grpc.RpcError) -> SnakepitError:
    """Turn a grpc (sync or aio) RpcError into the matching ``snakepit.errors`` exception.

    An answer cut off before its status is UNAVAILABLE, as when the worker's connection breaks
    mid-call: the call may have run, so it is not sent again (``never_started`` is false).

    A reset stream that had already brought snakepit's answer is that answer: HAProxy 2.6
    refuses a request before its body has ended (an oversized message,
    ``router/haproxy/message_size``), then resets the stream, since the caller is still
    sending, and grpc reports the reset (CANCELLED) though the answer's headers, the error
    detail among them, had arrived."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = exc.details() if hasattr(exc, "details") else str(exc)
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    if code == grpc.StatusCode.UNKNOWN and details and _CUT_OFF in details:
        code = grpc.StatusCode.UNAVAILABLE
        details = f"the answer was cut off before its status, the worker lost mid-call ({details})"
    if code == grpc.StatusCode.CANCELLED and details and _RESET in details:
        code = _answered_code(trailing) or code
    return error_from_status(code, details, trailing)


def _answered_code(trailing: Any) -> grpc.StatusCode | None:
    """The status of the snakepit error whose detail ``trailing`` carries (not a tool's own
    exception, which has a traceback); None when it carries none."""
    raw = find_metadata(trailing, ERROR_DETAIL_KEY)
    if not isinstance(raw, bytes):
        return None
    detail = pb.ErrorDetail()
    try:
        detail.ParseFromString(raw)
    except Exception:
        return None
    cls = None if detail.traceback else error_class_named(detail.type)
    return None if cls is None else cls.code


async def abort_with(
    context: grpc.aio.ServicerContext[Any, Any], exc: BaseException, worker_id: str = ""
) -> None:
    """End an aio call with ``exc``'s status code and its ErrorDetail; never returns."""
    detail = detail_of(exc, worker_id, with_traceback=not isinstance(exc, SnakepitError))
    context.set_trailing_metadata(error_metadata(detail))
    await context.abort(status_of(exc), status_details(detail.message or detail.type))


_CONNECT_FAILURES = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
)


def never_started(error: SnakepitError) -> bool:
    """True when the failed call certainly never ran, so sending it elsewhere is safe.

    Either the server said so (``not_started``: draining, at its limit, unknown tool) or the
    connection was never made. A call cut off mid-flight (the worker died while running it) is
    not retried: running a tool twice is worse than one clear UNAVAILABLE.
    """
    if error.not_started:
        return True
    return error.code == grpc.StatusCode.UNAVAILABLE and any(
        marker in error.message.lower() for marker in _CONNECT_FAILURES
    )


def worker_failure(worker_id: str, details: str, *, started: bool) -> SnakepitError:
    """UNAVAILABLE in snakepit's words for a call whose connection to a worker failed, which the
    worker itself could not say: not reached (never ran, safe to send elsewhere) or lost during
    the call (it may have run, so no one sends it again)."""
    who = f"worker {worker_id}" if worker_id else "the worker"
    if not started:
        return Unavailable(f"{who} could not be reached ({details})", not_started=True)
    return Unavailable(
        f"{who} was lost during the call ({details}): it may have run, so it was not sent again"
    )
