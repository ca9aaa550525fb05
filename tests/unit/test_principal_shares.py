"""The router's calls-per-principal line (router/shares.py), on a real event loop."""

from __future__ import annotations

import asyncio

import pytest

from snakepit.errors import DeadlineExceeded, ResourceExhausted
from snakepit.router.shares import PrincipalRates, PrincipalShares


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


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def rates(rate: float = 10.0, max_wait: float = 1.0) -> tuple[PrincipalRates, Clock]:
    clock = Clock()
    return PrincipalRates(rate, max_wait=max_wait, flag="--flag", clock=clock), clock


def test_a_seconds_worth_of_calls_pass_at_once_then_each_waits_its_turn() -> None:
    bucket, clock = rates(10.0)
    assert [bucket.reserve("flood", None) for _ in range(10)] == [0.0] * 10
    assert [round(bucket.reserve("flood", None), 3) for _ in range(3)] == [0.1, 0.2, 0.3]
    # Another principal has its own allowance.
    assert bucket.reserve("victim", None) == 0.0
    clock.now += 10  # idle: the allowance refills, to a second's worth at most
    assert [bucket.reserve("flood", None) for _ in range(10)] == [0.0] * 10
    assert bucket.reserve("flood", None) > 0


def test_a_turn_later_than_the_call_may_wait_is_refused_and_takes_no_turn() -> None:
    bucket, _ = rates(10.0, max_wait=0.25)
    for _ in range(10):
        bucket.reserve("flood", None)
    assert round(bucket.reserve("flood", 5.0), 3) == 0.1
    assert round(bucket.reserve("flood", 5.0), 3) == 0.2
    with pytest.raises(
        ResourceExhausted, match=r"'flood' is over its 10 store calls a second.*--flag"
    ):
        bucket.reserve("flood", 5.0)  # 0.3 s away, the most is 0.25 s
    with pytest.raises(ResourceExhausted, match=r"longer than the call may wait \(0\.05s\)"):
        bucket.reserve("flood", 0.05)  # its deadline comes first
    with pytest.raises(ResourceExhausted):
        bucket.reserve("flood", 5.0)  # the refusals took no turn: still 0.3 s away


async def test_waiting_for_a_turn_sleeps_on_a_timer() -> None:
    bucket = PrincipalRates(1000.0, max_wait=1.0, flag="--flag")
    started = asyncio.get_running_loop().time()
    await asyncio.gather(*(bucket.wait("flood", None) for _ in range(1010)))
    # The last ten waited for turns 1 ms apart: a timer cannot fire early.
    assert asyncio.get_running_loop().time() - started >= 0.009


def test_the_least_recently_seen_principal_is_forgotten_past_the_cap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("snakepit.router.shares.RATE_PRINCIPALS", 3)
    bucket, _ = rates(1.0)
    for name in ("a", "b", "c", "d"):
        bucket.reserve(name, None)
    assert bucket.reserve("d", None) == 1.0  # remembered: its allowance is spent
    assert bucket.reserve("a", None) == 0.0  # forgotten: a fresh allowance
