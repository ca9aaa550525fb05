"""Tool specs come from signatures and hints; arguments are checked and converted before a call."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import numpy as np
import pytest

from snakepit import Adapter, Embedding, SessionContext, tool
from snakepit.errors import InvalidArgument
from snakepit.worker.tools import discover


class Sample(Adapter):
    @tool(description="Add")
    def add(self, a: float, b: float = 1.0) -> float:
        return a + b

    @tool
    def typed(self, n: int, s: str, flag: bool, data: bytes, items: list[int], opts: dict[str, Any],
              x: np.ndarray, v: Embedding, maybe: int | None = None, anything: Any = None) -> None:  # fmt: skip
        """First paragraph is the description.

        Details that are not.
        """

    @tool(name="renamed")
    def original(self, ctx: SessionContext) -> None: ...

    @tool
    async def agen(self, n: int) -> AsyncIterator[int]:
        yield n

    @tool
    def gen(self, n: int) -> Iterator[int]:
        yield n

    @tool
    def extra(self, a: int, **rest: Any) -> None: ...

    def not_a_tool(self) -> None: ...


TOOLS = discover(Sample())


def test_specs_from_signatures() -> None:
    assert set(TOOLS) == {"add", "typed", "renamed", "agen", "gen", "extra"}
    add = TOOLS["add"].spec
    assert add.description == "Add"
    assert [(p.name, p.type, p.required) for p in add.parameters] == [
        ("a", "float", True),
        ("b", "float", False),
    ]
    assert add.parameters[1].default.json == b"1.0"
    typed = TOOLS["typed"]
    assert typed.description == "First paragraph is the description."
    assert {n: p.type for n, p in typed.parameters.items()} == {
        "n": "integer", "s": "string", "flag": "boolean", "data": "bytes", "items": "list", "opts": "map",
        "x": "tensor", "v": "embedding", "maybe": "integer", "anything": "any",
    }  # fmt: skip
    assert TOOLS["renamed"].context_param == "ctx" and TOOLS["renamed"].spec.uses_context
    assert TOOLS["agen"].streaming and TOOLS["agen"].is_async
    assert TOOLS["gen"].streaming and not TOOLS["gen"].is_async


def test_bind_converts_and_checks() -> None:
    assert TOOLS["add"].bind({"a": 1}) == {"a": 1.0}
    bound = TOOLS["typed"].bind({"n": 1, "s": "x", "flag": True, "data": b"", "items": (1, 2), "opts": {},
                                 "x": [[1, 2]], "v": [0.5, 1.5], "maybe": None})  # fmt: skip
    assert (
        bound["items"] == [1, 2]
        and isinstance(bound["x"], np.ndarray)
        and bound["v"].dtype == np.float64
    )
    assert bound["maybe"] is None
    assert TOOLS["extra"].bind({"a": 1, "zzz": 2}) == {"a": 1, "zzz": 2}


@pytest.mark.parametrize(
    ("tool_name", "arguments", "message"),
    [
        ("add", {}, "missing required argument 'a' for tool 'add'"),
        ("add", {"a": 1, "c": 2}, "unknown argument 'c' for tool 'add' \\(parameters: a, b\\)"),
        ("add", {"a": "1"}, "argument 'a' of tool 'add' must be of type float, got string"),
        ("add", {"a": None}, "argument 'a' of tool 'add' must be of type float, got null"),
        ("typed", {"n": 1.5}, "argument 'n' of tool 'typed' must be of type integer, got float"),
    ],
)
def test_bind_refuses_bad_arguments_naming_the_parameter(
    tool_name: str, arguments: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidArgument, match=message):
        TOOLS[tool_name].bind(arguments)


def test_declared_streaming_must_be_a_generator() -> None:
    class Broken(Adapter):
        @tool(streaming=True)
        def nope(self) -> int:
            return 1

    with pytest.raises(TypeError, match="declared streaming but is not a generator"):
        discover(Broken())


@pytest.mark.parametrize("kind", ["async", "generator", "context"])
def test_only_plain_sync_tools_may_run_inline(kind: str) -> None:
    class Broken(Adapter):
        if kind == "async":

            @tool(inline=True)
            async def quick(self) -> int:
                return 1
        elif kind == "generator":

            @tool(inline=True)
            def quick(self) -> Iterator[int]:
                yield 1
        else:

            @tool(inline=True)
            def quick(self, ctx: SessionContext) -> int:
                return 1

    with pytest.raises(TypeError, match="inline=True is for plain sync tools"):
        discover(Broken())


def test_an_inline_tool_that_proves_slow_moves_to_the_thread_pool(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """It holds the event loop twice, not on every call; a single overrun (the process
    descheduled mid-call on a busy machine) is forgiven once it is 1,000 calls old."""
    import asyncio
    import threading
    import time

    from snakepit.worker.runner import INLINE_BUDGET_SECONDS, INLINE_WINDOW, ToolRunner

    class Tools(Adapter):
        @tool(inline=True)
        def quick(self) -> str:
            return threading.current_thread().name

        @tool(inline=True)
        def slow(self) -> str:
            time.sleep(INLINE_BUDGET_SECONDS * 4)
            return threading.current_thread().name

    tools = discover(Tools())
    runner = ToolRunner(threads=1)

    async def run(name: str) -> str:
        return str(await runner.call(tools[name], {}))

    try:
        loop_thread = threading.current_thread().name
        assert asyncio.run(run("quick")) == loop_thread
        assert asyncio.run(run("quick")) == loop_thread
        assert tools["quick"].inline
        assert asyncio.run(run("slow")) == loop_thread  # the first time it holds the loop
        assert tools["slow"].inline
        assert asyncio.run(run("slow")) == loop_thread  # and the second, the last
        assert not tools["slow"].inline
        assert "inline tool too slow for the event loop" in caplog.text
        assert asyncio.run(run("slow")).startswith("snakepit-tool")

        # One overrun, then INLINE_WINDOW quick calls: the next overrun is a first one again.
        slow = tools["slow"]
        slow.inline, slow.calls, slow.overran_at = True, 0, 0
        slow.fn = lambda: time.sleep(INLINE_BUDGET_SECONDS * 4)
        runner.call_inline(slow, {})
        slow.fn = lambda: None
        for _ in range(INLINE_WINDOW):
            runner.call_inline(slow, {})
        slow.fn = lambda: time.sleep(INLINE_BUDGET_SECONDS * 4)
        runner.call_inline(slow, {})
        assert slow.inline
        runner.call_inline(slow, {})
        assert not slow.inline
    finally:
        runner.shutdown()
