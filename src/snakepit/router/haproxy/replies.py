"""gRPC error answers HAProxy gives itself: ``http-request return`` arguments built from
snakepit's errors, so a caller sees the status code, message and error detail the Python router
would give (``grpc-status``, ``grpc-message``, the ``snakepit-error-bin`` detail)."""

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
