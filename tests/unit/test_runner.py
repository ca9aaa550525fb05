"""ToolRunner: quick sync tools move onto the event loop, slow ones and context users never stay."""

from __future__ import annotations

import asyncio
import threading
import time

from snakepit import Adapter, SessionContext, tool
from snakepit.worker.runner import INLINE_AFTER, ToolRunner
from snakepit.worker.tools import ToolDef, discover

MAIN = threading.current_thread().name


class Paced(Adapter):
    def __init__(self) -> None:
        self.delay = 0.0

    @tool
    def where(self) -> str:
        time.sleep(self.delay)
        return threading.current_thread().name

    @tool
    def with_context(self, ctx: SessionContext) -> str:
        return threading.current_thread().name


async def _until_inline(runner: ToolRunner, where: ToolDef, limit: int = 2000) -> list[str]:
    """Calls until one runs on the loop (a busy machine may stretch a few runs past "quick")."""
    names: list[str] = []
    while MAIN not in names and len(names) < limit:
        names.append(await runner.call(where, {}))
    return names


def test_a_quick_sync_tool_moves_onto_the_loop_after_a_run_of_quick_calls() -> None:
    runner = ToolRunner(threads=2)
    where = discover(Paced())["where"]

    async def run() -> list[str]:
        names = await _until_inline(runner, where)
        return names + [await runner.call(where, {}) for _ in range(5)]

    names = asyncio.run(run())
    assert len(names) > INLINE_AFTER + 5
    assert all(n.startswith("snakepit-tool") for n in names[:INLINE_AFTER])
    assert names[-6:] == [MAIN] * 6


def test_a_tool_that_turns_slow_on_the_loop_goes_back_to_a_thread_for_good() -> None:
    runner = ToolRunner(threads=2)
    adapter = Paced()
    where = discover(adapter)["where"]

    async def run() -> list[str]:
        assert (await _until_inline(runner, where))[-1] == MAIN
        adapter.delay = 0.06  # one run that holds the loop too long...
        await runner.call(where, {})
        adapter.delay = 0.0  # ...and even quick runs stay in threads afterwards
        return [await runner.call(where, {}) for _ in range(INLINE_AFTER * 3)]

    assert all(n.startswith("snakepit-tool") for n in asyncio.run(run()))


def test_a_tool_taking_a_session_context_always_runs_in_a_thread() -> None:
    runner = ToolRunner(threads=2)
    with_context = discover(Paced())["with_context"]

    async def run() -> list[str]:
        return [await runner.call(with_context, {"ctx": None}) for _ in range(INLINE_AFTER * 3)]

    assert all(n.startswith("snakepit-tool") for n in asyncio.run(run()))
