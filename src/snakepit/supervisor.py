"""Worker processes on one machine, restarted when they die (the seed's Worker.Starter).

Each slot keeps one ``snakepit worker`` process alive, forever: a crashed process is started
again after an exponential backoff capped at ``max_backoff``. A slot that crashes more than
``max_restarts`` times within ``window`` seconds counts as ``failing`` and waits the full
``max_backoff`` between starts, but never gives up: a caller that can crash workers on purpose
must not be able to take the pool down for good (docs/security.md).
Workers die with their parent, even when the parent is killed with SIGKILL: they ask the kernel
for a parent-death signal as they start (``die_with_parent``).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("snakepit.supervisor")

PARENT_PID_ENV = "SNAKEPIT_PARENT_PID"
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a worker started by ``snakepit serve``: exit when the supervising process dies."""
    parent = os.environ.get(PARENT_PID_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != int(parent):  # the parent died before the signal was armed
        os._exit(0)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def sweep_stale_dirs(prefix: str) -> None:
    """Remove this user's temporary directories named ``<prefix><pid>-…`` whose process is
    gone (a process killed with SIGKILL cannot remove its own)."""
    for path in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        pid = path.name[len(prefix) :].split("-", 1)[0]
        try:
            mine = path.stat().st_uid == os.getuid()
        except OSError:
            continue
        if mine and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class RestartPolicy:
    max_restarts: int = 10
    window: float = 60.0
    initial_backoff: float = 0.05
    max_backoff: float = 5.0


class WorkerSlot:
    """One supervised worker process with a stable id and (usually) a stable port.

    ``argv`` is the worker command without its port; the slot appends ``--port``.
    """

    def __init__(
        self,
        worker_id: str,
        argv: Sequence[str],
        *,
        host: str = "127.0.0.1",
        policy: RestartPolicy | None = None,
        on_address: Callable[[WorkerSlot], None] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.host = host
        self.port = free_port(host)
        self.policy = policy or RestartPolicy()
        self._argv = argv
        self._on_address = on_address
        self._env = env
        self.process: asyncio.subprocess.Process | None = None
        self.restarts: collections.deque[float] = collections.deque()
        self.failing = False
        self._stopping = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def run(self) -> None:
        backoff = self.policy.initial_backoff
        while not self._stopping:
            started = time.monotonic()
            env = {**os.environ, **(self._env or {}), PARENT_PID_ENV: str(os.getpid())}
            argv = [*self._argv, "--port", str(self.port)]
            self.process = await asyncio.create_subprocess_exec(*argv, env=env)
            code = await self.process.wait()
            if self._stopping:
                return
            ran = time.monotonic() - started
            if code == 0:
                # A clean exit is a recycle (max requests, age, memory) after a drain: not a
                # fault, so it is neither counted against the restart intensity nor delayed.
                log.info(
                    "worker recycled", extra={"worker": self.worker_id, "ran_s": round(ran, 3)}
                )
                continue
            log.warning(
                "worker exited",
                extra={"worker": self.worker_id, "code": code, "ran_s": round(ran, 3)},
            )
            self.failing = not self._may_restart()
            if self.failing:
                log.error(
                    "worker restarting too often; backing off",
                    extra={
                        "worker": self.worker_id,
                        "max_restarts": self.policy.max_restarts,
                        "window_s": self.policy.window,
                        "backoff_s": self.policy.max_backoff,
                    },
                )
                backoff = self.policy.max_backoff
            if ran < 1.0 and code == 1:
                # It probably could not bind its port: take another one.
                self.port = free_port(self.host)
                if self._on_address is not None:
                    self._on_address(self)
            elif ran > self.policy.window:
                backoff = self.policy.initial_backoff
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.policy.max_backoff)

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self.restarts.append(now)
        while self.restarts and now - self.restarts[0] > self.policy.window:
            self.restarts.popleft()
        return len(self.restarts) <= self.policy.max_restarts

    async def stop(self, timeout: float) -> None:
        """SIGTERM (the worker drains), then SIGKILL after ``timeout``."""
        self._stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(process.wait(), timeout)
        except TimeoutError:
            process.kill()
            await process.wait()
