"""A steady load of calls against a pool while a test breaks things, with its own bookkeeping.

Each load thread has a session of its own and alternates a stateless call (``add``) with an
atomic increment of its session's counter, so afterwards the test can check both that calls kept
succeeding and that no acknowledged write was lost (the counter is at least the number of
acknowledged increments).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from snakepit import Client
from snakepit.errors import SnakepitError


@dataclass
class Window:
    """What the load saw between two instants."""

    name: str
    seconds: float = 0.0
    calls: int = 0
    failures: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return self.calls / self.seconds if self.seconds else 0.0

    def summary(self) -> str:
        kinds = sorted({f.split(":")[0] for f in self.failures})
        detail = f" ({', '.join(kinds)})" if kinds else ""
        return (
            f"{self.name}: {self.calls} calls in {self.seconds:.1f} s ({self.rate:.0f}/s), "
            f"{len(self.failures)} failed{detail}"
        )


@dataclass
class _Worker:
    session_id: str
    acked: int = 0
    attempted: int = 0


class SteadyLoad:
    def __init__(self, target: str, threads: int = 2, timeout: float = 30.0) -> None:
        self.target = target
        self.timeout = timeout
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._events: list[tuple[float, str | None]] = []  # (time, error or None)
        self._workers = [_Worker(f"load-{i}-{time.monotonic_ns()}") for i in range(threads)]
        self._threads = [
            threading.Thread(target=self._run, args=(w,), daemon=True) for w in self._workers
        ]

    def __enter__(self) -> SteadyLoad:
        with Client(self.target, timeout=self.timeout) as client:
            for worker in self._workers:
                client.session(worker.session_id, keep=True)
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)

    def _run(self, worker: _Worker) -> None:
        with Client(self.target, timeout=self.timeout) as client:
            session = client.session(worker.session_id, keep=True)
            i = 0
            while not self._stop.is_set():
                i += 1
                error = None
                try:
                    if i % 2:
                        assert session.execute("add", a=i, b=1) == i + 1
                    else:
                        worker.attempted += 1
                        session.execute("counter_increment")
                        worker.acked += 1
                except SnakepitError as exc:
                    error = f"{exc.code.name}: {exc}"
                    time.sleep(0.05)
                except Exception as exc:  # a wrong answer is a failure too
                    error = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self._events.append((time.monotonic(), error))

    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[Window]:
        """Measure the load while the block runs (the fault and the recovery it waits for)."""
        result = Window(name)
        start = time.monotonic()
        yield result
        end = time.monotonic()
        with self._lock:
            seen = [e for t, e in self._events if start <= t <= end]
        result.seconds = end - start
        result.calls = len(seen)
        result.failures = [e for e in seen if e is not None]

    def check_no_acknowledged_write_lost(self) -> None:
        """Stop the load, then compare each session's counter with what was acknowledged."""
        self.stop()
        with Client(self.target, timeout=self.timeout) as client:
            for worker in self._workers:
                counter = client.session(worker.session_id, keep=True).get("counter", 0)
                assert worker.acked <= counter <= worker.attempted, (worker, counter)
