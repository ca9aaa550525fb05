"""Background processes with a PID file and a log file each, stopped by PID and nothing else.

Every component of the cluster is started here in its own session (process group), so stopping it
never touches a process this tool did not start. The PID file also records the process start time
from /proc, which guards against signalling an unrelated process that reused the PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from .config import Config
from .run import log


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: the process start time in clock ticks since boot."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def pid_file(cfg: Config, name: str) -> Path:
    return cfg.pid_dir / f"{name}.pid"


def log_file(cfg: Config, name: str) -> Path:
    return cfg.log_dir / f"{name}.log"


def read_pid(cfg: Config, name: str) -> int | None:
    """The PID of a component we started and that still runs, else None."""
    path = pid_file(cfg, name)
    try:
        pid_text, start, *_ = path.read_text().split("\n")
        pid = int(pid_text)
    except (OSError, ValueError):
        return None
    return pid if _start_time(pid) == start else None


def start(
    cfg: Config,
    name: str,
    argv: Sequence[str | os.PathLike[str]],
    env: Mapping[str, str] | None = None,
) -> int:
    """Start ``argv`` detached, output appended to logs/NAME.log, PID in pids/NAME.pid."""
    if (pid := read_pid(cfg, name)) is not None:
        raise RuntimeError(f"{name} already runs as PID {pid}")
    cfg.log_dir.mkdir(parents=True, exist_ok=True)
    cfg.pid_dir.mkdir(parents=True, exist_ok=True)
    args = [str(a) for a in argv]
    with log_file(cfg, name).open("ab") as out:
        out.write(f"\n==== {time.strftime('%F %T')} {' '.join(args)}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **env} if env else None,
            close_fds=True,
        )
    start_ticks = _start_time(proc.pid) or ""
    pid_file(cfg, name).write_text(f"{proc.pid}\n{start_ticks}\n{args[0]}\n")
    return proc.pid


def log_tail(cfg: Config, name: str, lines: int = 30) -> str:
    try:
        text = log_file(cfg, name).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def wait_ready(cfg: Config, name: str, probe: Callable[[], bool], timeout: float) -> float:
    """Wait until ``probe`` passes; fail at once (with the log tail) if the process died."""
    begin = time.monotonic()
    while True:
        if read_pid(cfg, name) is None:
            raise RuntimeError(
                f"{name} exited during start-up; last log lines:\n{log_tail(cfg, name)}"
            )
        try:
            if probe():
                return time.monotonic() - begin
        except Exception:  # not ready yet
            pass
        if time.monotonic() - begin > timeout:
            raise TimeoutError(
                f"{name} not ready after {timeout:.0f}s; last log lines:\n{log_tail(cfg, name)}"
            )
        time.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our own un-reaped child) counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def stop(cfg: Config, name: str, timeout: float = 15.0) -> bool:
    """SIGTERM the component's process group, SIGKILL after ``timeout``. True if it was running."""
    pid = read_pid(cfg, name)
    pid_file(cfg, name).unlink(missing_ok=True)
    if pid is None:
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)  # stray helpers left in its group
                return True
            time.sleep(0.1)
        log(f"{name} (PID {pid}) ignored {sig.name}")
    return True


def running(cfg: Config) -> dict[str, int]:
    """Components with a PID file whose process is still alive."""
    result: dict[str, int] = {}
    if cfg.pid_dir.is_dir():
        for path in sorted(cfg.pid_dir.glob("*.pid")):
            if (pid := read_pid(cfg, path.stem)) is not None:
                result[path.stem] = pid
    return result


def mentioning(marks: Sequence[str]) -> dict[str, int]:
    """``{"argv0:PID": PID}`` of every process (but this one) whose command line contains one of
    ``marks``: what a runtime left behind outside our PID files (shims, proxies)."""
    found: dict[str, int] = {}
    me = os.getpid()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == me:
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if any(m in cmdline for m in marks):
            found[f"{cmdline.split()[0]}:{proc.name}"] = int(proc.name)
    return found
