"""Adapters that only tests use: each makes one behaviour of the worker runtime observable."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from snakepit import Adapter, SessionContext, tool
from snakepit.examples.showcase import ShowcaseAdapter


def _mark(name: str) -> None:
    """Leave a file in $SNAKEPIT_TEST_MARKS so the test can see what happened inside the tool."""
    marks = os.environ.get("SNAKEPIT_TEST_MARKS")
    if marks:
        (Path(marks) / name).write_text(str(time.time()))


class ProbeAdapter(Adapter):
    @tool
    def block(self, seconds: float) -> float:
        """A sync tool that blocks its thread (time.sleep), not the event loop."""
        time.sleep(seconds)
        return seconds

    @tool
    async def wait_cancel(self, key: str, seconds: float = 30.0) -> str:
        """Sleeps; leaves a mark when its call is cancelled (deadline or client cancel)."""
        try:
            await asyncio.sleep(seconds)
        except asyncio.CancelledError:
            _mark(f"cancelled-{key}")
            raise
        return "finished"

    @tool(streaming=True)
    async def ticks(self, key: str, n: int = 1000, interval: float = 0.01) -> AsyncIterator[int]:
        try:
            for i in range(n):
                await asyncio.sleep(interval)
                yield i
        finally:
            _mark(f"closed-{key}")

    @tool(streaming=True)
    def sync_ticks(self, n: int) -> Iterator[int]:
        yield from range(n)

    @tool
    def read_var(self, ctx: SessionContext, name: str) -> object:
        return ctx.get(name)

    @tool
    def write_var(self, ctx: SessionContext, name: str, value: object) -> int:
        return ctx.set(name, value).version

    @tool
    def pid(self) -> int:
        return os.getpid()


class SlowStartAdapter(Adapter):
    """Initialises slowly so the NOT_SERVING → SERVING transition can be observed."""

    def initialize(self) -> None:
        time.sleep(float(os.environ.get("SNAKEPIT_TEST_INIT_SECONDS", "1.5")))

    @tool
    def ok(self) -> bool:
        return True


class IdentityProbeAdapter(ShowcaseAdapter):
    """The showcase tools plus ``whoami``, which shows all a tool can see of its call."""

    @tool
    def whoami(self, ctx: SessionContext) -> dict[str, object]:
        """The call's principal, and everything the context and the process environment hold,
        as text: a test searches it for the caller's credential."""
        seen = {name: repr(value) for name, value in vars(ctx).items()}
        return {
            "principal": ctx.principal,
            "session_id": ctx.session_id,
            "metadata": dict(ctx.metadata),
            "context": repr(seen),
            "environ": repr(dict(os.environ)),
        }

    @tool
    async def hold(self, seconds: float, padding: str = "") -> float:
        """``sleep`` with an argument to pad: a call padded past HAProxy's ``LARGE_BODY`` goes
        through the Python router (test_identity.py's share across both halves)."""
        await asyncio.sleep(seconds)
        return seconds
