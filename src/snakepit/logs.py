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


def setup(component: str, component_id: str, level: str | None = None) -> None:
    """Send every log record to stderr as JSON; ``SNAKEPIT_LOG_LEVEL`` sets the level."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(component, component_id))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level or os.environ.get("SNAKEPIT_LOG_LEVEL", "INFO")).upper())
