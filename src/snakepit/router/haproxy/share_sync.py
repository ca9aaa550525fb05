"""One count of a principal's calls for both halves of the HAProxy data path.

On the HAProxy data path a principal's tool calls take two ways: most go from HAProxy straight
to a worker (counted by HAProxy, ``principal_shares``), some through the Python router (calls
of a caller not yet vouched for, calls with a ticket of their own, large bodies, calls while
no worker is ready). Counted apart, a principal could hold its share on each, twice what
``--max-calls-per-principal`` allows, and a caller that pads its arguments past HAProxy's
``LARGE_BODY`` would choose the second half at will.

So both halves read one count, kept in HAProxy's ``shares`` stick table under the principal's
key (``principal_key``):

- ``use``: the calls HAProxy is carrying to workers (its trackers);
- ``gpc0``: the calls the Python router is carrying, which this class writes there
  (``set table``) each time its own count changes, and again every ``REFRESH`` seconds so the
  entry outlives HAProxy's ``expire`` and reaches a new HAProxy after a hand-over.

HAProxy lets a call through while ``use + gpc0`` is under the share; this class lets one
through while its own count plus HAProxy's ``use`` is (read with ``show table ... key``, one
runtime API round trip per call on the Python half, which is the slower path anyway). A call
admitted on both halves within the same round trip can take the share one over for as long as
both run: the bound is exact on each half and at most one over per round trip across them.
A call over its share waits, looking again after a pause that doubles from 1 ms to 32 ms (the
other half's calls end without telling this one), at most the queue timeout or its deadline;
at most ``--queue-size`` of a principal's calls wait here at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re

from ..shares import PrincipalShares
from .principal_shares import RUNNING_TABLE
from .runtime import RuntimeApi

log = logging.getLogger(__name__)

FIRST_PAUSE = 0.001
LONGEST_PAUSE = 0.032
# Seconds between rewrites of every nonzero count (HAProxy forgets an entry no call tracks
# 60 s after it was last written).
REFRESH = 15.0
_USE = re.compile(r"\buse=(\d+)")


def principal_key(principal: str) -> str:
    """The principal's key in HAProxy's share tables: what ``principal_shares`` computes from
    the ticket (``sha2(256),hex``: upper-case hex)."""
    return hashlib.sha256(principal.encode()).hexdigest().upper()


class HaproxyShares(PrincipalShares):
    """``PrincipalShares`` for the Python half of the HAProxy data path (see the module)."""

    def __init__(
        self, limit: int, *, queue_size: int, queue_timeout: float, api: RuntimeApi
    ) -> None:
        super().__init__(limit, queue_size=queue_size, queue_timeout=queue_timeout)
        self.api = api
        self.running: dict[str, int] = {}
        self.waiting: dict[str, int] = {}
        self._write_lock = asyncio.Lock()
        self._writes: set[asyncio.Task[None]] = set()

    async def acquire(self, principal: str, time_remaining: float | None) -> bool:
        loop = asyncio.get_running_loop()
        wait = self.longest_wait(time_remaining)
        deadline = loop.time() + wait
        pause = FIRST_PAUSE
        waited = False
        try:
            while True:
                elsewhere = await self._carried_by_haproxy(principal)
                running = self.running.get(principal, 0)  # read after the await: exact here
                if running + elsewhere < self.limit:
                    self.running[principal] = running + 1
                    await self._write(principal)
                    return waited
                if not waited:
                    queued = self.waiting.get(principal, 0)
                    if queued >= self.queue_size:
                        raise self.line_full(principal, running + elsewhere, queued)
                    self.waiting[principal] = queued + 1
                    waited = True
                if loop.time() + pause > deadline:
                    raise self.waited_out(principal, wait)
                await asyncio.sleep(pause)
                pause = min(pause * 2, LONGEST_PAUSE)
        finally:
            if waited:
                left = self.waiting[principal] - 1
                if left:
                    self.waiting[principal] = left
                else:
                    del self.waiting[principal]

    def release(self, principal: str) -> None:
        left = self.running[principal] - 1
        if left:
            self.running[principal] = left
        else:
            del self.running[principal]
        self._write_soon(principal)

    def rewrite(self) -> None:
        """``write_all`` soon (a new HAProxy starts with empty tables)."""
        for principal in list(self.running):
            self._write_soon(principal)

    async def write_all(self) -> None:
        """Write every nonzero count again."""
        for principal in list(self.running):
            await self._write(principal)

    async def run(self) -> None:
        """Rewrite every nonzero count now and then (see the module)."""
        while True:
            await asyncio.sleep(REFRESH)
            await self.write_all()

    def _write_soon(self, principal: str) -> None:
        task = asyncio.get_running_loop().create_task(self._write(principal))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _carried_by_haproxy(self, principal: str) -> int:
        """The principal's calls HAProxy is carrying now; 0 when HAProxy cannot say (it is
        restarting: the Python half then keeps the share alone)."""
        try:
            answer = await self.api.run(
                f"show table {RUNNING_TABLE} key {principal_key(principal)}"
            )
        except (OSError, TimeoutError) as exc:
            log.warning("haproxy share table unreadable", extra={"error": str(exc)})
            return 0
        found = _USE.search(answer)
        return int(found.group(1)) if found else 0

    async def _write(self, principal: str) -> None:
        """Put the Python half's count in HAProxy's table. Serialised, and the count read when
        the command goes, so a slower earlier write never overwrites a later count."""
        async with self._write_lock:
            count = self.running.get(principal, 0)
            try:
                await self.api.run(
                    f"set table {RUNNING_TABLE} key {principal_key(principal)} data.gpc0 {count}"
                )
            except (OSError, TimeoutError) as exc:
                log.warning("haproxy share table unwritable", extra={"error": str(exc)})
