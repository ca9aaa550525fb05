"""JSON structured logs, one object per line, carrying the current call's correlation id."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import sys
from typing import Any

from . import tracing

correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="")

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def __init__(self, component: str, component_id: str) -> None:
        super().__init__()
        self.component = component
        self.component_id = component_id

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "component": self.component,
            "id": self.component_id,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        cid = correlation_id.get()
        if cid:
            entry["correlation_id"] = cid
        tid = tracing.trace_id()
        if tid:
            entry["trace_id"] = tid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


GRPC_CORE_LOGGER = "grpc._cython.cygrpc"
_ENDED_MID_WRITE = "ExecuteBatchError raised in core by servicer method"


class CallEndedMidWrite(logging.Filter):
    """grpc.aio logs at ERROR, with a traceback, a server's write that gRPC core refused
    because the call had already ended: the caller cancelled, went away or ran out of time
    while its answer was being written (a watcher closed mid-update, a client killed during a
    stream). Whether the line appears at all is a race between the failed write and gRPC
    noticing the caller's close (grpc/grpc#32551 turned it from an unretrieved task exception
    into this log line). Nothing failed on the server, so an operator should not see an error:
    it becomes one INFO line naming the method, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name != GRPC_CORE_LOGGER or not record.getMessage().startswith(_ENDED_MID_WRITE):
            return True
        method = record.getMessage().removeprefix(_ENDED_MID_WRITE).strip(" []")
        record.msg = "a call ended while its answer was being written (the caller went away): %s"
        record.args = (method,)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info, record.exc_text = None, None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


def setup(component: str, component_id: str, level: str | None = None) -> None:
    """Send every log record to stderr as JSON; ``SNAKEPIT_LOG_LEVEL`` sets the level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component, component_id))
    handler.addFilter(CallEndedMidWrite())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("SNAKEPIT_LOG_LEVEL", "INFO")).upper())
