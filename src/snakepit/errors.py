"""Exceptions that keep a failed call's gRPC status code and the remote error.

One class per status code the protocol uses, so callers can write
``except snakepit.errors.NotFound`` and tools can raise the same classes to choose the status
their caller sees. ``ToolError`` marks an exception raised by a tool's own code.
"""

from __future__ import annotations

import grpc


class SnakepitError(Exception):
    """Base of every error this package raises for a failed call."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(
        self,
        message: str,
        *,
        remote_type: str | None = None,
        remote_traceback: str | None = None,
        worker_id: str | None = None,
        not_started: bool = False,
        code: grpc.StatusCode | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.remote_type = remote_type
        self.remote_traceback = remote_traceback
        self.worker_id = worker_id
        self.not_started = not_started
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        prefix = f"{self.remote_type}: " if self.remote_type else ""
        return f"{prefix}{self.message}"


class InvalidArgument(SnakepitError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(SnakepitError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SnakepitError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(SnakepitError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class DeadlineExceeded(SnakepitError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unavailable(SnakepitError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(SnakepitError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Cancelled(SnakepitError):
    code = grpc.StatusCode.CANCELLED


class Unimplemented(SnakepitError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(SnakepitError):
    code = grpc.StatusCode.INTERNAL


class Unauthenticated(SnakepitError):
    """The caller did not prove who it is: no credential, or one that is wrong or expired."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(SnakepitError):
    """The caller is known but may not do this (e.g. ask for the routing table)."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ToolError(Internal):
    """A tool raised an exception; ``remote_type`` and ``remote_traceback`` say which and where."""


_BY_CODE: dict[grpc.StatusCode, type[SnakepitError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        ResourceExhausted,
        DeadlineExceeded,
        Unavailable,
        FailedPrecondition,
        Cancelled,
        Unimplemented,
        Internal,
        Unauthenticated,
        PermissionDenied,
    )
}


_BY_NAME = {cls.__name__: cls for cls in _BY_CODE.values()}


def error_class_named(name: str) -> type[SnakepitError] | None:
    """The snakepit error class called ``name`` (an ErrorDetail's ``type``), if there is one."""
    return _BY_NAME.get(name)


def error_class_for(code: grpc.StatusCode, *, from_tool: bool = False) -> type[SnakepitError]:
    """The exception class a caller sees for ``code``."""
    if from_tool and code == grpc.StatusCode.INTERNAL:
        return ToolError
    return _BY_CODE.get(code, SnakepitError)
