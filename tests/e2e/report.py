"""Figures the e2e tests measure (times, calls/s, failures per fault), printed after the run.

``report(line)`` records a line; the plugin prints them all in pytest's terminal summary and
writes them to ``$SNAKEPIT_E2E_REPORT`` when set, so CI logs keep the numbers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

_LINES: list[str] = []
_STARTED = time.monotonic()


def report(line: str) -> None:
    _LINES.append(line)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _LINES:
        return
    lines = [*_LINES, f"wall time of the session: {time.monotonic() - _STARTED:.0f} s"]
    terminalreporter.section("snakepit measurements")
    for line in lines:
        terminalreporter.write_line(line)
    target = os.environ.get("SNAKEPIT_E2E_REPORT")
    if target:
        Path(target).write_text("\n".join(lines) + "\n")
