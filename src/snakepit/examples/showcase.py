"""The built-in showcase adapter: a small tool of each kind, a contract for the demo and tests.

It is what a pool runs when it names no adapter, so none of its tools can hurt the pool: no
tool kills its worker and ``sleep`` is bounded. The fault-injection tools (``crash`` and an
unbounded ``sleep``) live in ``snakepit.examples.faults:FaultsAdapter``, which tests select.
"""

from __future__ import annotations

import asyncio
import math
import os
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from snakepit import Adapter, SessionContext, tool
from snakepit.errors import InvalidArgument

# The longest ``sleep`` the default adapter accepts: long enough for demos and queueing tests.
MAX_SLEEP_SECONDS = 60.0


class ShowcaseAdapter(Adapter):
    @tool(description="Return the value unchanged, whatever its type", inline=True)
    def echo(self, value: Any) -> Any:
        return value

    @tool(description="Add two numbers", inline=True)
    def add(self, a: float, b: float) -> float:
        return a + b

    @tool(description="Which worker process served this call", inline=True)
    def whoami(self) -> dict[str, Any]:
        return {"worker_id": self.worker_id, "pid": os.getpid()}

    @tool(
        description=f"Sleep for a number of seconds (at most {MAX_SLEEP_SECONDS:g}), then return them"
    )
    async def sleep(self, seconds: float) -> float:
        if not (math.isfinite(seconds) and 0 <= seconds <= MAX_SLEEP_SECONDS):
            raise InvalidArgument(
                f"sleep takes 0 to {MAX_SLEEP_SECONDS:g} seconds, got {seconds!r} "
                "(snakepit.examples.faults:FaultsAdapter has an unbounded sleep)"
            )
        await asyncio.sleep(seconds)
        return seconds

    @tool(description="Stream the integers 0..n-1")
    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    @tool(description="Raise ValueError(message)")
    def fail(self, message: str = "failure requested") -> None:
        raise ValueError(message)

    @tool(description="Atomically add `by` to a session variable and return the new value")
    async def counter_increment(
        self, ctx: SessionContext, name: str = "counter", by: int = 1
    ) -> Any:
        return await ctx.aincrement(name, by)

    @tool(description="Sum of all elements of an array")
    def tensor_sum(self, x: np.ndarray) -> float:
        return float(np.sum(x))

    @tool(description="Multiply an array by a factor")
    def tensor_scale(self, x: np.ndarray, factor: float) -> np.ndarray:
        return x * factor

    @tool(description="Add two numbers by calling the add tool through the router")
    async def nested_add(self, ctx: SessionContext, a: float, b: float) -> Any:
        return await ctx.acall_tool("add", a=a, b=b)

    @tool(description="Price a basket {item: quantity} with lookup_price, a tool the caller hosts")
    async def quote(self, ctx: SessionContext, items: dict[str, int]) -> dict[str, Any]:
        names = list(items)
        prices = await asyncio.gather(*(ctx.acall_tool("lookup_price", item=n) for n in names))
        lines = {n: items[n] * price for n, price in zip(names, prices, strict=True)}
        return {"lines": lines, "total": sum(lines.values())}

    @tool(description="Call any tool (a pool tool, or one the caller hosts) and return its result")
    async def relay(self, ctx: SessionContext, tool: str, arguments: dict[str, Any]) -> Any:
        return await ctx.acall_tool(tool, **arguments)

    @tool(description="Stream the items of any streaming tool, as they come")
    async def relay_stream(
        self, ctx: SessionContext, tool: str, arguments: dict[str, Any]
    ) -> AsyncIterator[Any]:
        async for item in ctx.astream_tool(tool, **arguments):
            yield item
