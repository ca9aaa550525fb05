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
        env=processes.test_env(),
    )
    time.sleep(2.5)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=10)
    assert watch.returncode == 0, err.decode()
    frames = out.decode().count("every 0.2s")
    assert frames >= 3, out.decode()
    assert out.decode().count("workers 0/0 ready") == frames
