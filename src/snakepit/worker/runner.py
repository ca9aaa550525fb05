"""Running one tool call: sync tools in a bounded thread pool, async and inline tools on the loop.

Streaming tools are pulled one item at a time, only when the previous item has been handed to
gRPC, so a slow client slows the generator down instead of filling memory; closing the returned
iterator (a cancelled call) closes the tool's generator.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import time
from collections.abc import AsyncIterator, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .tools import ToolDef

log = logging.getLogger("snakepit.worker")

_DONE = object()
# The longest an inline tool's call may hold the event loop before the tool goes to the thread
# pool for good (``@tool(inline=True)``).
INLINE_BUDGET_SECONDS = 0.005
# A second call over that budget within this many calls of the tool moves it to the thread pool
# (``call_inline`` says why not the first).
INLINE_WINDOW = 1000


class ToolRunner:
    def __init__(self, threads: int) -> None:
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="snakepit-tool")

    async def call(self, tool: ToolDef, kwargs: dict[str, Any]) -> Any:
        if tool.is_async:
            return await tool.fn(**kwargs)
        if tool.inline:
            return self.call_inline(tool, kwargs)
        loop = asyncio.get_running_loop()
        # In a copy of the call's context: the tool sees its trace span and correlation id.
        run = functools.partial(contextvars.copy_context().run, tool.fn, **kwargs)
        return await loop.run_in_executor(self.executor, run)

    @staticmethod
    def call_inline(tool: ToolDef, kwargs: dict[str, Any]) -> Any:
        """Run a quick sync tool right here, on the loop; one that overruns its budget (even by
        raising) twice within ``INLINE_WINDOW`` of its calls runs in the thread pool from then on.

        Twice, because the time is wall-clock: on a busy machine the process is now and then
        descheduled for longer than the budget, and that sometimes lands inside the tool (``add``
        overran once, 5.2 ms, in a one-minute ghz run at load average 10 on 2 cores; about once
        in 100,000 calls in a tight loop), which alone would have demoted it and added a thread
        hand-off to every later call. Two such accidents within 1,000 calls of one tool are rare
        enough to ignore; a slow tool overruns on every call, and a caller cannot make one stall
        the loop more than once per 1,000 calls. (The thread's CPU time would ignore
        descheduling, but a tool that blocks on I/O uses none.)
        """
        started = time.perf_counter()
        try:
            return tool.fn(**kwargs)
        finally:
            tool.calls += 1
            took = time.perf_counter() - started
            if took > INLINE_BUDGET_SECONDS:
                _overran(tool, took)

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
        context = contextvars.copy_context()
        try:
            while True:
                step = functools.partial(context.run, next, gen, _DONE)
                item = await loop.run_in_executor(self.executor, step)
                if item is _DONE:
                    return
                yield item
        finally:
            # The generator may be mid-step in a thread; close it there once that step ends.
            loop.run_in_executor(self.executor, gen.close)

    def shutdown(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)


def _overran(tool: ToolDef, took: float) -> None:
    """Count an inline call over budget; the second within ``INLINE_WINDOW`` calls demotes."""
    if tool.overran_at and tool.calls - tool.overran_at <= INLINE_WINDOW:
        tool.inline = False
        log.warning(
            "inline tool too slow for the event loop: it runs in the thread pool from now",
            extra={"tool": tool.name, "seconds": round(took, 4)},
        )
        return
    tool.overran_at = tool.calls
    log.info(
        "inline tool over its budget once: a second time soon moves it to the thread pool",
        extra={"tool": tool.name, "seconds": round(took, 4)},
    )
