"""``snakepit status --watch`` redraws the pool table until Ctrl-C, against a real router."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.fixtures import processes
from tests.fixtures.processes import ProcessFactory


def test_status_watch_redraws_until_interrupted(procs: ProcessFactory) -> None:
    router = procs.router([])
    watch = subprocess.Popen(
        [sys.executable, "-m", "snakepit", "status", "--watch", "0.2", "--target", router.address],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=processes.child_env(),
    )
    # Interrupt once three frames are drawn (on a busy machine the import alone can take
    # seconds, so a fixed sleep interrupted it before the first frame).
    assert watch.stdout is not None
    seen: list[str] = []
    deadline = time.monotonic() + 60
    while sum("workers 0/0 ready" in line for line in seen) < 3 and time.monotonic() < deadline:
        line = watch.stdout.readline().decode()
        if not line:
            break
        seen.append(line)
    watch.send_signal(signal.SIGINT)
    rest, err = watch.communicate(timeout=10)
    assert watch.returncode == 0, err.decode()
    out = "".join(seen) + rest.decode()
    frames = out.count("every 0.2s")
    drawn = out.count("workers 0/0 ready")
    assert drawn >= 3, out
    assert frames - 1 <= drawn <= frames, out  # Ctrl-C may cut the last frame short
