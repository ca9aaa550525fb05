"""Running one tool call: sync tools in a bounded thread pool, async tools on the loop.

Handing a call to a thread and back costs more CPU than a trivial tool itself (a third of the
worker's CPU on small calls, measured with py-spy). So a sync tool that keeps finishing quickly
in its thread (``INLINE_AFTER`` runs in a row under ``QUICK_SECONDS``) runs on the event loop
instead; the first inline run that uses more than ``SLOW_SECONDS`` of CPU, or holds the loop for
more than ``BLOCKED_SECONDS``, sends it back to the thread pool for good, so the loop is held up
at most once by a tool that turns out slow. (CPU time, not wall time, for the first bound: on a
busy machine the scheduler may preempt a 5 us tool for milliseconds.) Tools that take a
``SessionContext`` always run in a thread: their store calls go through the loop.

Streaming tools are pulled one item at a time, only when the previous item has been handed to
gRPC, so a slow client slows the generator down instead of filling memory; closing the returned
iterator (a cancelled call) closes the tool's generator.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .tools import ToolDef

_DONE = object()
INLINE_AFTER = 20
QUICK_SECONDS = 0.0002
SLOW_SECONDS = 0.002
BLOCKED_SECONDS = 0.05


class _Pace:
    """How one sync tool has been running: whether it may run on the loop."""

    __slots__ = ("inline", "quick_runs", "threaded_for_good")

    def __init__(self, may_inline: bool) -> None:
        self.inline = False
        self.quick_runs = 0
        self.threaded_for_good = not may_inline

    def ran_in_thread(self, seconds: float) -> None:
        if self.threaded_for_good:
            return
        self.quick_runs = self.quick_runs + 1 if seconds < QUICK_SECONDS else 0
        self.inline = self.quick_runs >= INLINE_AFTER

    def ran_inline(self, cpu_seconds: float, seconds: float) -> None:
        if cpu_seconds > SLOW_SECONDS or seconds > BLOCKED_SECONDS:
            self.inline = False
            self.threaded_for_good = True


def _timed(fn: Any, kwargs: dict[str, Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    return fn(**kwargs), time.perf_counter() - started


class ToolRunner:
    def __init__(self, threads: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="snakepit-tool")
        self._pace: dict[str, _Pace] = {}

    async def call(self, tool: ToolDef, kwargs: dict[str, Any]) -> Any:
        if tool.is_async:
            return await tool.fn(**kwargs)
        pace = self._pace.get(tool.name)
        if pace is None:
            pace = self._pace[tool.name] = _Pace(may_inline=tool.context_param is None)
        if pace.inline:
            cpu, started = time.thread_time(), time.perf_counter()
            try:
                return tool.fn(**kwargs)
            finally:
                pace.ran_inline(time.thread_time() - cpu, time.perf_counter() - started)
        loop = asyncio.get_running_loop()
        result, seconds = await loop.run_in_executor(self.executor, _timed, tool.fn, kwargs)
        pace.ran_in_thread(seconds)
        return result

    async def stream(self, tool: ToolDef, kwargs: dict[str, Any]) -> AsyncIterator[Any]:
        if tool.is_async:
            agen = tool.fn(**kwargs)
            try:
                async for item in agen:
                    yield item
            finally:
                await agen.aclose()
            return
        gen: Generator[Any, None, None] = tool.fn(**kwargs)
        loop = asyncio.get_running_loop()
        try:
            while True:
                item = await loop.run_in_executor(self.executor, next, gen, _DONE)
                if item is _DONE:
                    return
                yield item
        finally:
            # The generator may be mid-step in a thread; close it there once that step ends.
            loop.run_in_executor(self.executor, gen.close)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
