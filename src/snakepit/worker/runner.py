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
        raising) runs in the thread pool from then on."""
        started = time.perf_counter()
        try:
            return tool.fn(**kwargs)
        finally:
            took = time.perf_counter() - started
            if took > INLINE_BUDGET_SECONDS:
                tool.inline = False
                log.warning(
                    "inline tool too slow for the event loop: it runs in the thread pool from now",
                    extra={"tool": tool.name, "seconds": round(took, 4)},
                )

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
