"""Small helpers around subprocess and logging shared by the cluster modules."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

Cmd = Sequence[str | os.PathLike[str]]


def log(message: str) -> None:
    """Progress goes to stderr so that stdout keeps only what callers parse (the export line)."""
    print(f"[local-cluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run(
    cmd: Cmd,
    *,
    check: bool = True,
    capture: bool = False,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    input: str | None = None,
    quiet: bool = False,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output so the error names the real cause."""
    args = [str(c) for c in cmd]
    full_env = {**os.environ, **env} if env else None
    proc = subprocess.run(
        args,
        check=False,
        text=True,
        env=full_env,
        cwd=cwd,
        input=input,
        stdout=subprocess.PIPE if capture or quiet else None,
        stderr=subprocess.PIPE if capture or quiet else None,
    )
    if check and proc.returncode != 0:
        detail = ""
        if proc.stdout or proc.stderr:
            detail = f"\n--- stdout ---\n{proc.stdout or ''}\n--- stderr ---\n{proc.stderr or ''}"
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(args)}{detail}")
    return proc


def output(cmd: Cmd, **kwargs: object) -> str:
    return run(cmd, capture=True, **kwargs).stdout  # type: ignore[arg-type]


def wait_for(what: str, probe: Callable[[], bool], timeout: float, interval: float = 0.25) -> float:
    """Poll ``probe`` until it returns true; return the seconds waited or raise TimeoutError."""
    start = time.monotonic()
    while True:
        try:
            if probe():
                return time.monotonic() - start
        except Exception:  # a probe that errors is simply "not yet"
            pass
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def write_file(path: Path, content: str | bytes, mode: int = 0o644) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    path.chmod(mode)
    return path
