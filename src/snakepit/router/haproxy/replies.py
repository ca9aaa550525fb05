"""gRPC error answers HAProxy gives itself: ``http-request return`` arguments built from
snakepit's errors, so a caller sees the status code, message and error detail the Python router
would give (``grpc-status``, ``grpc-message``, the ``snakepit-error-bin`` detail), in an answer
every gRPC client takes for one (``whole_answer_lines``)."""

from __future__ import annotations

import base64

from ...errors import SnakepitError
from ...protocol.status import ERROR_DETAIL_KEY, detail_of


def quote(text: str) -> str:
    """A double-quoted HAProxy argument (log-format: '%' is doubled)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def detail(error: SnakepitError) -> str:
    """The ``snakepit-error-bin`` header's value for ``error`` (base64, as gRPC sends it)."""
    return base64.b64encode(detail_of(error).SerializeToString()).decode()


def error_headers(error: SnakepitError) -> str:
    """``hdr`` arguments that make an HAProxy reply a gRPC error: status, message, detail."""
    return (
        f"hdr grpc-status {error.code.value[0]} "
        f"hdr grpc-message {quote(error.message)} hdr {ERROR_DETAIL_KEY} {detail(error)}"
    )


# True for an answer HAProxy made itself with ``error_headers``: a gRPC server's answer always
# has a content type, HAProxy's error pages (text/html) no ``grpc-status``.
OWN_GRPC_ANSWER = "{ res.hdr(grpc-status) -m found } !{ res.hdr(content-type) -m found }"


def whole_answer_lines() -> list[str]:
    """Frontend ``http-after-response`` lines that make HAProxy's own gRPC answers whole ones:
    HTTP status 200 and ``content-type: application/grpc``, as gRPC's "Trailers-Only" answer.

    HAProxy 2.6 gives a reply without a payload no content type (and ignores one set with
    ``hdr``), and ``http-error`` keeps the error's HTTP status (503 for a queue timeout).
    gRPC's C core (Python's grpcio, snakepit's clients) reads ``grpc-status`` regardless, but
    grpc-go takes an answer without the content type for "malformed header: missing HTTP
    content-type" (UNKNOWN) and any status but 200 for the HTTP status's code (503:
    UNAVAILABLE), whatever its ``grpc-status`` says. These run after the backend's rules
    (``config._answer_503`` gives the 503 its ``grpc-status`` first)."""
    return [
        f"  http-after-response set-status 200 if {OWN_GRPC_ANSWER}",
        f"  http-after-response set-header content-type application/grpc if {OWN_GRPC_ANSWER}",
    ]
