"""The client's own connection ageing (client/rotation.py): which channel each call gets, and
when a retired channel is handed back to be closed. Plain objects stand in for channels: this
is bookkeeping; tests/integration/test_disruption.py runs it over real connections."""

from __future__ import annotations

import itertools

from snakepit.client.rotation import RotatingChannel


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def rotating(max_age: float | None) -> tuple[RotatingChannel[int], Clock]:
    clock = Clock()
    numbers = itertools.count(1)
    return RotatingChannel(lambda: next(numbers), max_age, clock), clock


def test_calls_share_one_channel_until_it_is_old_enough() -> None:
    channels, clock = rotating(2.0)
    first, idle = channels.acquire()
    channels.release(first)
    clock.now = 1.9
    second, _ = channels.acquire()
    assert (first.channel, second.channel, idle) == (1, 1, [])


def test_an_idle_old_channel_is_closed_when_the_next_call_moves_on() -> None:
    channels, clock = rotating(2.0)
    channels.release(channels.acquire()[0])
    clock.now = 2.0
    lease, idle = channels.acquire()
    assert (lease.channel, idle) == (2, [1])
    assert channels.release(lease) == []


def test_a_busy_old_channel_closes_after_its_last_call_not_before() -> None:
    channels, clock = rotating(2.0)
    long_call, _ = channels.acquire()
    other_call, _ = channels.acquire()
    clock.now = 5.0
    new_call, idle = channels.acquire()
    assert (new_call.channel, idle) == (2, [])  # still running two calls: kept open
    assert channels.release(long_call) == []
    assert channels.release(other_call) == [1]
    assert channels.release(new_call) == []


def test_without_an_age_the_channel_is_kept_for_good() -> None:
    for max_age in (None, 0.0):
        channels, clock = rotating(max_age)
        clock.now = 1e9
        lease, idle = channels.acquire()
        assert (lease.channel, idle) == (1, [])


def test_closing_the_client_returns_every_open_channel() -> None:
    channels, clock = rotating(1.0)
    busy, _ = channels.acquire()
    clock.now = 1.0
    channels.acquire()
    assert channels.close_all() == [1, 2]
    assert busy.retired
