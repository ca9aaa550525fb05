"""The client's connection to a router, replaced by the client itself before the router ages it.

Why the client does it: a router closes each connection ``--max-connection-age`` after it opened
(5 s by default: clients spread over router replicas, and a stopping router sheds them). When the
*server* closes, a frame the client sent at the very end (a flow-control update for the last
answer) can still be unread in the server's socket; the kernel then resets the connection instead
of closing it, and what the server had not yet sent, the tail of the last answer, is lost: a call
that ran fails ``UNAVAILABLE: Stream removed``, and no one may send it again (about one 1 MB call in
15,000 with a 50 ms age; docs/reliability.md). gRPC core closes without lingering, so the fix is at
this end: every ``max_age`` seconds the client opens a new channel for new calls and closes the old
one once its last call has ended. A reset at the client's own close hits no call, since none is in
flight there, and the router's age stays a backstop for other clients.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

ChannelT = TypeVar("ChannelT")


@dataclass(eq=False)
class Lease(Generic[ChannelT]):
    """One generation of the router channel and the calls that use it."""

    channel: ChannelT
    born: float
    in_flight: int = 0
    retired: bool = False


class RotatingChannel(Generic[ChannelT]):
    """Hands out the current channel per call; swaps in a new one once it is ``max_age`` old.

    ``acquire``/``release`` bracket each call (a stream until its last item). Both return the
    channels that are retired and now idle, for the caller to close (closing is blocking for the
    sync client and a coroutine for the asyncio one). Thread-safe: a blocking ``Client`` may be
    shared by threads.
    """

    def __init__(
        self,
        open_channel: Callable[[], ChannelT],
        max_age: float | None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._open = open_channel
        self._max_age = max_age or None
        self._clock = clock
        self._lock = threading.Lock()
        self._current = Lease(open_channel(), clock())
        self._retired: list[Lease[ChannelT]] = []  # still running calls

    def acquire(self) -> tuple[Lease[ChannelT], list[ChannelT]]:
        """The lease for the next call, and channels to close (the one just retired, if idle)."""
        idle: list[ChannelT] = []
        with self._lock:
            lease = self._current
            if self._max_age is not None and self._clock() - lease.born >= self._max_age:
                lease.retired = True
                if lease.in_flight:
                    self._retired.append(lease)
                else:
                    idle.append(lease.channel)
                lease = self._current = Lease(self._open(), self._clock())
            lease.in_flight += 1
        return lease, idle

    def release(self, lease: Lease[ChannelT]) -> list[ChannelT]:
        """End a call; a retired channel whose last call this was comes back to be closed."""
        with self._lock:
            lease.in_flight -= 1
            if lease.retired and not lease.in_flight:
                self._retired.remove(lease)
                return [lease.channel]
        return []

    def close_all(self) -> list[ChannelT]:
        """Every channel still open (the client is closing: their calls are cancelled)."""
        with self._lock:
            channels = [lease.channel for lease in self._retired] + [self._current.channel]
            self._retired.clear()
        return channels
