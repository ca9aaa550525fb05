"""The router's calls-per-principal line (router/shares.py), on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from snakepit.errors import DeadlineExceeded, ResourceExhausted
from snakepit.router.shares import PrincipalShares


def shares(limit: int = 2, *, queue_size: int = 10, queue_timeout: float = 5.0) -> PrincipalShares:
    return PrincipalShares(limit, queue_size=queue_size, queue_timeout=queue_timeout)


async def test_a_principal_at_its_limit_waits_in_order_and_others_pass() -> None:
    line = shares(2)
    assert await line.acquire("hog", None) is False
    assert await line.acquire("hog", None) is False
    order: list[int] = []

    async def third(n: int) -> None:
        await line.acquire("hog", None)
        order.append(n)

    waiting = [asyncio.create_task(third(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    assert order == [] and not any(t.done() for t in waiting)
    # Another principal is not in the hog's line.
    assert await line.acquire("bob", None) is False
    line.release("bob")
    line.release("hog")
    await asyncio.sleep(0)
    assert order == [0]
    line.release("hog")
    line.release("hog")
    await asyncio.gather(*waiting)
    assert order == [0, 1, 2]
    for _ in range(2):
        line.release("hog")
    assert line._shares == {}  # nothing kept for principals with no call


async def test_the_wait_ends_at_the_queue_timeout_or_the_deadline() -> None:
    line = shares(1, queue_timeout=0.05)
    await line.acquire("hog", None)
    with pytest.raises(DeadlineExceeded, match=r"principal 'hog'.*max-calls-per-principal"):
        await line.acquire("hog", None)
    with pytest.raises(DeadlineExceeded, match=r"0\.01"):
        await line.acquire("hog", 0.01)  # the caller's deadline is shorter
    line.release("hog")
    assert line._shares == {}


async def test_a_full_line_is_refused_at_once() -> None:
    line = shares(1, queue_size=1)
    await line.acquire("hog", None)
    waiter = asyncio.create_task(line.acquire("hog", None))
    await asyncio.sleep(0)
    with pytest.raises(ResourceExhausted, match="1 calls running and 1 waiting"):
        await line.acquire("hog", None)
    line.release("hog")
    assert await waiter is True
    line.release("hog")


async def test_a_caller_that_leaves_the_line_does_not_keep_a_slot() -> None:
    line = shares(1)
    await line.acquire("hog", None)
    leaving = asyncio.create_task(line.acquire("hog", None))
    staying = asyncio.create_task(line.acquire("hog", None))
    await asyncio.sleep(0)
    leaving.cancel()
    await asyncio.sleep(0)
    line.release("hog")  # goes to the one still waiting
    assert await staying is True
    line.release("hog")
    assert line._shares == {}
