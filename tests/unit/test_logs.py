"""The JSON log lines, and what they make of grpc.aio's own log records."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from snakepit import logs


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    """Logs as ``logs.setup`` sends them (JSON, the filters), into a buffer."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(logs.JsonFormatter("router", "r1"))
    handler.addFilter(logs.CallEndedMidWrite())
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    yield out
    root.handlers[:], level = saved
    root.setLevel(level)


def _grpc_batch_error() -> None:
    """What grpc.aio's server logs when a write fails because the call already ended."""
    try:
        raise RuntimeError('Failed "execute_batch": (SendMessageOperation,)')
    except RuntimeError:
        logging.getLogger(logs.GRPC_CORE_LOGGER).exception(
            "ExecuteBatchError raised in core by servicer method [%s]",
            "/snakepit.bridge.v1.BridgeService/WatchVariables",
        )


def test_a_call_that_ended_mid_write_is_one_info_line_without_traceback(
    captured: io.StringIO,
) -> None:
    logging.getLogger().setLevel(logging.INFO)
    _grpc_batch_error()
    (line,) = captured.getvalue().splitlines()
    entry = json.loads(line)
    assert entry["level"] == "info"
    assert entry["msg"] == (
        "a call ended while its answer was being written (the caller went away): "
        "/snakepit.bridge.v1.BridgeService/WatchVariables"
    )
    assert "exc" not in entry


def test_below_the_configured_level_it_is_not_written(captured: io.StringIO) -> None:
    logging.getLogger().setLevel(logging.WARNING)  # what `snakepit serve` runs at
    _grpc_batch_error()
    assert captured.getvalue() == ""


def test_other_grpc_errors_keep_their_level_and_traceback(captured: io.StringIO) -> None:
    logging.getLogger().setLevel(logging.WARNING)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger(logs.GRPC_CORE_LOGGER).exception(
            "Unexpected [ValueError] raised by servicer method [%s]", "/x/Y"
        )
    entry = json.loads(captured.getvalue())
    assert entry["level"] == "error"
    assert "ValueError: boom" in entry["exc"]
