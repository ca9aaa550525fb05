"""A mixed load on a pool, with bookkeeping strict enough to back "0 failed calls".

``MixedLoad`` runs many sessions at once (one asyncio task each, 32 by default, so 32 calls are
in flight) from a thread of its own. Each session loops over a mix of calls:

- ``add``: a short call whose answer is checked;
- ``sleep``: a long call (0.5 to 2 s) that spans whatever the test breaks;
- ``stream``: a streaming call read slowly (a pause between items);
- ``tensor``: a tensor of a few MB scaled by a worker, the answer checked;
- ``increment``: an atomic increment of the session's counter (acknowledged ones are counted);
- ``set``: a write of a session variable (the last acknowledged value is remembered).

A ``window`` counts the calls that *started* inside it and waits, when it closes, for all of
them to end, so a call that fails after the window closed is still counted, and a call stuck
until its deadline is seen. ``Window.check`` then asks for no failure *and* a minimum number of
successful calls: a load that died, or calls that hung, can't pass as "nothing failed".
``check_no_acknowledged_write_lost`` compares every session's counter and variable with what
the store acknowledged.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from snakepit import AsyncClient, Client
from snakepit.client.aio import AsyncSession
from snakepit.errors import SnakepitError

MIX: dict[str, float] = {
    "add": 0.40,
    "increment": 0.20,
    "set": 0.10,
    "sleep": 0.10,
    "stream": 0.10,
    "tensor": 0.10,
}


@dataclass
class Call:
    op: str
    started: float
    ended: float | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return (self.ended or time.monotonic()) - self.started


@dataclass
class Window:
    """What the load saw of the calls that started between two instants."""

    name: str
    seconds: float = 0.0
    calls: list[Call] = field(default_factory=list)

    @property
    def succeeded(self) -> int:
        return sum(c.error is None for c in self.calls)

    @property
    def failures(self) -> list[str]:
        return [c.error for c in self.calls if c.error is not None]

    @property
    def rate(self) -> float:
        return self.succeeded / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float, op: str | None = None) -> float:
        times = sorted(c.seconds for c in self.calls if op is None or c.op == op)
        return 1000 * times[min(len(times) - 1, int(q * len(times)))] if times else 0.0

    def summary(self) -> str:
        kinds = sorted({f.split(":")[0] for f in self.failures})
        detail = f" ({', '.join(kinds)})" if kinds else ""
        longest = max((c.seconds for c in self.calls), default=0.0)
        return (
            f"{self.name}: {len(self.calls)} calls in {self.seconds:.1f} s "
            f"({self.rate:.0f}/s ok), {len(self.failures)} failed{detail}; add p50/p99 "
            f"{self.percentile_ms(0.5, 'add'):.0f}/{self.percentile_ms(0.99, 'add'):.0f} ms, "
            f"longest call {longest:.1f} s"
        )

    def check(self, min_calls: int = 20) -> None:
        """No call failed, and enough of them succeeded for that to mean something."""
        assert not self.failures, f"{self.summary()}: {self.failures[:5]}"
        assert self.succeeded >= min_calls, f"{self.summary()}: fewer than {min_calls} calls"


@dataclass
class _Session:
    id: str
    acked: int = 0  # acknowledged increments
    attempted: int = 0
    last_set: Any = None  # the last acknowledged value of the variable "v"
    unsure: list[Any] = field(default_factory=list)  # values written without an answer since


class MixedLoad:
    def __init__(
        self,
        target: str,
        sessions: int = 32,
        *,
        mix: dict[str, float] | None = None,
        direct: bool = False,
        timeout: float = 60.0,
        tensor_mb: float = 2.0,
        seed: int = 0,
        client_options: dict[str, Any] | None = None,
    ) -> None:
        self.target = target
        self.direct = direct
        self.timeout = timeout
        # More keywords for the clients (e.g. ``ca=`` for a TLS pool).
        self.client_options = client_options or {}
        self.mix = mix or MIX
        self._tensor = np.ones(int(tensor_mb * 2**20 / 8))
        self._random = random.Random(seed)
        self._sessions = [_Session(f"load-{i}-{time.monotonic_ns()}") for i in range(sessions)]
        self._calls: list[Call] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, daemon=True)
        self._started = threading.Event()
        self._error: BaseException | None = None

    # Lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> MixedLoad:
        self._thread.start()
        self._started.wait(timeout=self.timeout)
        if self._error is not None:
            raise RuntimeError(f"the load could not start: {self._error!r}") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and not self._stop.is_set():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=self.timeout + 10)

    def _thread_main(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # reported by __enter__ or by the checks
            self._error = exc
            self._started.set()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with AsyncClient(
            self.target, timeout=self.timeout, direct=self.direct, **self.client_options
        ) as client:
            sessions = [await client.session(s.id, keep=True) for s in self._sessions]
            self._started.set()
            await asyncio.gather(
                *(
                    self._run(handle, state)
                    for handle, state in zip(sessions, self._sessions, strict=True)
                )
            )

    # The calls ---------------------------------------------------------------------------------
    async def _run(self, session: AsyncSession, state: _Session) -> None:
        assert self._stop is not None
        ops: dict[str, Callable[[AsyncSession, _Session, int], Awaitable[None]]] = {
            "add": self._add,
            "increment": self._increment,
            "set": self._set,
            "sleep": self._sleep,
            "stream": self._stream,
            "tensor": self._scale,
        }
        names, weights = list(self.mix), list(self.mix.values())
        i = 0
        while not self._stop.is_set():
            i += 1
            op = self._random.choices(names, weights)[0]
            call = Call(op, time.monotonic())
            with self._lock:
                self._calls.append(call)
            try:
                await ops[op](session, state, i)
            except SnakepitError as exc:
                call.error = f"{exc.code.name}: {op}: {exc}"
            except Exception as exc:  # a wrong answer is a failure too
                call.error = f"{type(exc).__name__}: {op}: {exc}"
            call.ended = time.monotonic()
            if call.error:
                await asyncio.sleep(0.05)

    async def _add(self, session: AsyncSession, state: _Session, i: int) -> None:
        result = await session.execute("add", a=i, b=1)
        assert result == i + 1, f"add({i}, 1) returned {result!r}"

    async def _increment(self, session: AsyncSession, state: _Session, i: int) -> None:
        state.attempted += 1
        await session.execute("counter_increment")
        state.acked += 1

    async def _set(self, session: AsyncSession, state: _Session, i: int) -> None:
        state.unsure.append(i)
        await session.set("v", i)
        state.last_set, state.unsure = i, []

    async def _sleep(self, session: AsyncSession, state: _Session, i: int) -> None:
        seconds = round(0.5 + 1.5 * self._random.random(), 2)
        assert await session.execute("sleep", seconds=seconds) == seconds

    async def _stream(self, session: AsyncSession, state: _Session, i: int) -> None:
        items = []
        async for item in session.stream("count", n=10):
            items.append(item)
            await asyncio.sleep(0.05)  # a slow reader
        assert items == list(range(10)), f"count(10) streamed {items!r}"

    async def _scale(self, session: AsyncSession, state: _Session, i: int) -> None:
        result = await session.execute("tensor_scale", x=self._tensor, factor=2.0)
        assert result.shape == self._tensor.shape and float(result[-1]) == 2.0

    # Measuring ---------------------------------------------------------------------------------
    @contextlib.contextmanager
    def window(self, name: str) -> Iterator[Window]:
        """Measure the calls that start while the block runs (the fault and the recovery)."""
        result = Window(name)
        start = time.monotonic()
        yield result
        end = time.monotonic()
        with self._lock:
            started = [c for c in self._calls if start <= c.started <= end]
        deadline = time.monotonic() + self.timeout + 5
        while any(c.ended is None for c in started) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self._error is not None:
            raise RuntimeError(f"the load died: {self._error!r}") from self._error
        result.seconds = end - start
        result.calls = started

    def wait_for_successes(self, count: int, since: float, timeout: float = 30.0) -> None:
        """Wait until ``count`` calls that started at or after ``since`` have succeeded, so a
        window's minimum of successful calls holds however slow a loaded machine is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                done = sum(c.started >= since and c.ended is not None and c.error is None
                           for c in self._calls)  # fmt: skip
            if done >= count:
                return
            time.sleep(0.05)

    def check_no_acknowledged_write_lost(self) -> None:
        """Stop the load, then compare each session's counter and variable with the store."""
        self.stop()
        assert self._error is None, f"the load died: {self._error!r}"
        with Client(self.target, timeout=self.timeout, **self.client_options) as client:
            for state in self._sessions:
                session = client.session(state.id, keep=True)
                counter = session.get("counter", 0)
                assert state.acked <= counter <= state.attempted, (state, counter)
                if state.last_set is not None or state.unsure:
                    value = session.get("v", None)
                    assert value == state.last_set or value in state.unsure, (state, value)
