"""heap.keep_large_buffers: a large message's buffer is reused, not mapped afresh per call."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

# In a child process: the settings are the process's for good, and the count is its own.
CHILD = """
import json, resource, sys
from snakepit.heap import keep_large_buffers
took = keep_large_buffers(64) if sys.argv[1] == "kept" else None
payload = memoryview(bytearray(48 * 1024 * 1024))  # above glibc's own 32 MB ceiling
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    message = b"".join((b"header", payload))  # what encoding an answer does
    del message
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"took": took, "faults": faults}))
"""
PAGES = 48 * 1024 * 1024 // 4096


def _run(mode: str) -> dict[str, object]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"},
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


def test_a_48_mb_message_reuses_the_last_ones_pages() -> None:
    kept = _run("kept")
    assert kept["took"] is True  # glibc here
    faults = kept["faults"]
    assert isinstance(faults, list)
    # The first message faults its pages in; every later one reuses them.
    assert faults[0] > PAGES // 2
    assert max(faults[1:]) < PAGES // 20, faults


def test_without_it_every_message_faults_its_pages_in_again() -> None:
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    if thp.exists() and "[always]" in thp.read_text():
        pytest.skip("transparent huge pages for every mapping: far fewer faults to count")
    faults = _run("default")["faults"]
    assert isinstance(faults, list)
    assert min(faults) > PAGES // 2, faults
