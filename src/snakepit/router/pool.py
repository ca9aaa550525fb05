"""The scheduler: which worker takes a call, and the FIFO queue for calls no worker can take.

The seed's Pool kept available/busy sets and a queue; here every ready worker has a capacity
(``worker_concurrency`` calls in flight) and the choice is consistent hashing of the session id
with bounded load (``hint``), or the session's own worker only (``strict``).
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import DeadlineExceeded, FailedPrecondition, ResourceExhausted, Unavailable
from ..grpc_options import DEFAULT_MAX_STREAMS_PER_CONNECTION
from ..protocol import pb
from ..security.tls import ChannelTls
from .ring import DEFAULT_VNODES, HASH_NAME, HashRing, load_bound
from .workers import DRAINING, READY, WorkerHandle

HINT, STRICT = "hint", "strict"
_SESSION_MEMORY = 100_000


@dataclass
class PoolConfig:
    worker_concurrency: int = 4
    queue_size: int = 1000
    queue_timeout: float = 30.0
    affinity: str = HINT
    # Calls one principal may have running through this router at once (0: no limit; shares.py).
    max_calls_per_principal: int = 0
    vnodes: int = DEFAULT_VNODES
    max_message_mb: int = 256
    # Calls one client connection may have open at once on this router's port (0: no bound).
    max_streams_per_connection: int = DEFAULT_MAX_STREAMS_PER_CONNECTION


@dataclass(eq=False)
class _Waiter:
    session_id: str
    exclude: frozenset[str]
    future: asyncio.Future[WorkerHandle] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class WorkerPool:
    def __init__(self, config: PoolConfig) -> None:
        if config.affinity not in (HINT, STRICT):
            raise ValueError(f"affinity must be {HINT!r} or {STRICT!r}, got {config.affinity!r}")
        self.config = config
        self.workers: dict[str, WorkerHandle] = {}
        # How the router dials its workers: mutual TLS with the pool CA, or plaintext (None).
        self.tls: ChannelTls | None = None
        self.ring = HashRing((), config.vnodes)
        self.ring_version = 0
        self.in_flight = 0
        self._queue: collections.deque[_Waiter] = collections.deque()
        self._turn = itertools.count()
        # Which worker served each session last (strict affinity needs it to know one is gone).
        self._last_worker: collections.OrderedDict[str, str] = collections.OrderedDict()
        self.calls_total = 0
        self.calls_failed = 0
        self.latencies_ms: collections.deque[float] = collections.deque(maxlen=4096)
        # Called after every change of membership or health (the HAProxy data path follows it).
        self.on_change: Callable[[], None] | None = None
        # Called with True when calls start waiting with no ready worker to run them (a pool
        # scaled to zero), and with False when that ends: the autoscaler's wake-up call.
        self.on_starved: Callable[[bool], None] | None = None
        self.starved = False

    # Membership ------------------------------------------------------------------------------
    def set_workers(self, addresses: Mapping[str, str]) -> None:
        """Follow discovery: open handles for new workers, retire the ones that left."""
        for worker_id, address in addresses.items():
            handle = self.workers.get(worker_id)
            if handle is not None and handle.address == address:
                continue
            if handle is not None:
                self._retire(handle)
            handle = WorkerHandle(
                worker_id, address, self.config.max_message_mb, self._on_state, self.tls
            )
            self.workers[worker_id] = handle
            handle.start()
        for worker_id in [w for w in self.workers if w not in addresses]:
            self._retire(self.workers.pop(worker_id))
        self._rebuild_ring()

    def _retire(self, handle: WorkerHandle) -> None:
        handle.removed = True
        asyncio.get_running_loop().create_task(handle.close())

    def _on_state(self, handle: WorkerHandle) -> None:
        self._rebuild_ring()

    def _rebuild_ring(self) -> None:
        ready = sorted(w.worker_id for w in self.workers.values() if w.ready)
        if tuple(ready) != self.ring.workers:
            self.ring = HashRing(ready, self.config.vnodes)
            self.ring_version += 1
        self._dispatch()
        if self.on_change is not None:
            self.on_change()
        self._note_starved()

    def _note_starved(self) -> None:
        starved = bool(self._queue) and not self.ring.workers
        if starved != self.starved:
            self.starved = starved
            if self.on_starved is not None:
                self.on_starved(starved)

    def mark_draining(self, handle: WorkerHandle) -> None:
        """A worker refused a call because it is leaving: out of the ring now."""
        if handle.state == READY:
            handle.set_state(DRAINING)

    def mark_unreachable(self, handle: WorkerHandle) -> None:
        """A call could not even connect: leave the ring now, the health watch brings it back."""
        if handle.state == READY:
            handle.set_state("unreachable")

    async def close(self) -> None:
        for waiter in self._queue:
            if not waiter.future.done():
                waiter.future.set_exception(Unavailable("the router is shutting down"))
        self._queue.clear()
        await asyncio.gather(*(w.close(grace=0) for w in self.workers.values()))
        self.workers.clear()

    # Choosing a worker -------------------------------------------------------------------------
    def remember(self, session_id: str, worker_id: str) -> None:
        memory = self._last_worker
        if memory.get(session_id) != worker_id:
            memory[session_id] = worker_id
            memory.move_to_end(session_id)
            if len(memory) > _SESSION_MEMORY:
                memory.popitem(last=False)

    def _pick(self, session_id: str, exclude: Iterable[str]) -> WorkerHandle | None:
        limit = self.config.worker_concurrency
        if session_id and self.config.affinity == STRICT:
            handle = self._strict_worker(session_id)
            return handle if handle is not None and handle.in_flight < limit else None
        if session_id:
            cap = min(limit, load_bound(self.in_flight, len(self.ring)))
            for worker_id in self.ring.candidates(session_id):
                handle = self.workers[worker_id]
                if handle.in_flight < cap and worker_id not in exclude:
                    return handle
            return None
        # Least loaded, ties broken by a rotating start so equal workers share the calls.
        workers = self.ring.workers
        count = len(workers)
        offset = next(self._turn)
        best: WorkerHandle | None = None
        for i in range(count):
            worker_id = workers[(offset + i) % count]
            if worker_id in exclude:
                continue
            handle = self.workers[worker_id]
            if best is None or handle.in_flight < best.in_flight:
                best = handle
        return best if best is not None and best.in_flight < limit else None

    def _strict_worker(self, session_id: str) -> WorkerHandle | None:
        worker_id = self._last_worker.get(session_id) or self.ring.preferred(session_id)
        if worker_id is None:
            return None
        handle = self.workers.get(worker_id)
        if handle is None or not handle.ready:
            raise FailedPrecondition(
                f"session {session_id!r} is bound to worker {worker_id!r}, which is gone "
                f"(affinity is strict; start a new session)"
            )
        return handle

    def _take(self, handle: WorkerHandle) -> WorkerHandle:
        handle.in_flight += 1
        self.in_flight += 1
        return handle

    def take(self, session_id: str = "", exclude: Iterable[str] = ()) -> WorkerHandle | None:
        """A worker with a free slot right now, or None: then ``wait``, which also says why not."""
        try:
            handle = self._pick(session_id, exclude)
        except FailedPrecondition:
            return None
        return None if handle is None else self._take(handle)

    async def acquire(
        self, session_id: str = "", exclude: Iterable[str] = (), timeout: float | None = None
    ) -> WorkerHandle:
        """A worker with a free slot for this call, waiting in the FIFO queue if need be."""
        return self.take(session_id, exclude) or await self.wait(session_id, exclude, timeout)

    async def wait(
        self, session_id: str = "", exclude: Iterable[str] = (), timeout: float | None = None
    ) -> WorkerHandle:
        """Queue for a worker (FIFO), up to the queue timeout or the caller's deadline."""
        handle = self._pick(session_id, exclude)  # raises when a strict session's worker is gone
        if handle is not None:
            return self._take(handle)
        if len(self._queue) >= self.config.queue_size:
            raise ResourceExhausted(
                f"every worker is busy and the queue is full ({self.config.queue_size} calls waiting)"
            )
        waiter = _Waiter(session_id, frozenset(exclude))
        self._queue.append(waiter)
        self._note_starved()
        wait = (
            self.config.queue_timeout
            if timeout is None
            else min(timeout, self.config.queue_timeout)
        )
        try:
            async with asyncio.timeout(wait):
                return await waiter.future
        except TimeoutError:
            if _assigned(waiter.future):
                return waiter.future.result()  # placed in the same instant the wait ran out
            if not self.ring.workers:
                raise Unavailable(f"no worker became ready within {wait:.3g}s") from None
            raise DeadlineExceeded(
                f"waited {wait:.3g}s in the queue and no worker became free "
                f"({len(self.ring)} ready, {self.config.worker_concurrency} calls each)"
            ) from None
        except BaseException:
            if _assigned(waiter.future):  # the caller went away just as a slot came
                self._give_back(waiter.future.result())
            raise
        finally:
            if not waiter.future.done():
                waiter.future.cancel()
                self._queue.remove(waiter)
            self._note_starved()

    def _give_back(self, handle: WorkerHandle) -> None:
        handle.in_flight -= 1
        self.in_flight -= 1
        if self._queue:
            self._dispatch()

    def release(self, handle: WorkerHandle, *, ok: bool) -> None:
        """Free the slot of one attempt on ``handle``."""
        self._give_back(handle)
        if ok:
            handle.served += 1
        else:
            handle.failed += 1

    def record(self, *, ok: bool, started: float) -> None:
        """Count one finished call (however many attempts it took) and its latency."""
        self.calls_total += 1
        if not ok:
            self.calls_failed += 1
        self.latencies_ms.append((time.perf_counter() - started) * 1000)

    def _dispatch(self) -> None:
        """Hand freed slots to waiting calls, oldest first."""
        for waiter in list(self._queue):
            if waiter.future.done():
                self._queue.remove(waiter)
                continue
            try:
                handle = self._pick(waiter.session_id, waiter.exclude)
            except FailedPrecondition as exc:
                self._queue.remove(waiter)
                waiter.future.set_exception(exc)
                continue
            if handle is None:
                if self.config.affinity == HINT and not waiter.exclude:
                    return  # the oldest call cannot be placed, so no later one can either
                continue
            self._queue.remove(waiter)
            waiter.future.set_result(self._take(handle))

    # Reporting ------------------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def load(self) -> int:
        """Calls that want a worker now: in flight plus queued (what autoscaling follows)."""
        return self.in_flight + len(self._queue)

    def any_ready(self) -> WorkerHandle | None:
        ready = [w for w in self.workers.values() if w.ready]
        return min(ready, key=lambda h: h.in_flight) if ready else None

    def routing_table(self) -> pb.RoutingTable:
        return pb.RoutingTable(
            workers=[
                pb.RoutingEntry(worker_id=w, address=self.workers[w].address)
                for w in self.ring.workers
            ],
            vnodes=self.config.vnodes,
            hash=HASH_NAME,
            version=self.ring_version,
            affinity=self.config.affinity,
            worker_concurrency=self.config.worker_concurrency,
        )

    def worker_statuses(self) -> list[pb.WorkerStatus]:
        return [
            pb.WorkerStatus(
                worker_id=w.worker_id,
                address=w.address,
                ready=w.ready,
                in_flight=w.in_flight,
                capacity=self.config.worker_concurrency,
                served=w.served,
                failed=w.failed,
                state=w.state,
            )
            for w in sorted(self.workers.values(), key=lambda h: h.worker_id)
        ]


def _assigned(future: asyncio.Future[WorkerHandle]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None
