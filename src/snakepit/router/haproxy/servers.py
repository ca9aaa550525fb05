"""Keep HAProxy's worker servers equal to the router's view of the pool, through the runtime API.

The Python router already follows discovery (EndpointSlices or a static list) and watches every
worker's ``grpc.health.v1`` stream. This maps that view onto HAProxy's server slots (declared
in haproxy.cfg, see ``config``): a worker that appears gets the slot of its ring id, pointed at
its address (in maintenance), SERVING makes it ``ready``, NOT_SERVING (a worker draining)
``drain`` (no new calls, the running ones finish), a broken health stream ``maint`` at once
(passive ejection: HAProxy stops choosing it before any call times out). A worker that leaves
discovery (or whose ring id moves, when a clash between two names resolves anew) puts its slot in
maintenance, and the slot is free again once no call and no connection in use is left on it.
No reload, ever.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from dataclasses import dataclass

from ..pool import WorkerPool
from ..ring import server_ids
from ..workers import DRAINING, READY, WorkerHandle
from .config import WORKERS_BACKEND, HaproxySpec, point_slot_command, slot_name
from .runtime import HaproxyError, RuntimeApi, check

log = logging.getLogger("snakepit.router")

RETRY_SECONDS = 0.5


@dataclass
class _Slot:
    server_id: int
    address: str  # the worker's, as discovery gave it
    state: str  # the admin state last set: ready, drain, maint

    @property
    def path(self) -> str:
        return f"{WORKERS_BACKEND}/{slot_name(self.server_id)}"


def desired_state(handle: WorkerHandle) -> str:
    if handle.removed:
        return "maint"
    if handle.state == READY:
        return "ready"
    if handle.state == DRAINING:
        return "drain"
    return "maint"


class ServerSync:
    def __init__(self, api: RuntimeApi, spec: HaproxySpec, pool: WorkerPool) -> None:
        self.api = api
        self.spec = spec
        self.pool = pool
        self.servers: dict[str, _Slot] = {}  # by worker id: the slot each worker holds now
        # Server name (bytes, as HAProxy's call log and stats name it) -> the worker it was
        # last pointed at. Kept after the worker leaves: the calls still running on its slot
        # are that worker's until the slot is pointed elsewhere (only once they are over).
        self._workers_by_slot: dict[bytes, str] = {}
        self.releasing: set[int] = set()  # slots in maintenance until their calls are over
        self._dirty = asyncio.Event()
        self._applying = asyncio.Lock()  # run() and a new HAProxy's set-up both apply

    def notify(self) -> None:
        """The pool changed: apply it soon (coalesced)."""
        self._dirty.set()

    def reset(self) -> None:
        """HAProxy restarted with every slot free: point them again."""
        self.servers.clear()
        self.releasing.clear()
        self._workers_by_slot.clear()
        self._dirty.set()

    def worker_of(self, server: bytes) -> str | None:
        """The worker whose calls HAProxy's server ``server`` carries (or last carried)."""
        return self._workers_by_slot.get(server)

    def slot_of(self, worker_id: str) -> str | None:
        """The HAProxy server name a worker's calls go through, if it has one."""
        slot = self.servers.get(worker_id)
        return None if slot is None else slot_name(slot.server_id)

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                done = await self.apply()
            except (OSError, TimeoutError, HaproxyError) as exc:
                log.warning("haproxy server sync failed", extra={"error": str(exc)})
                done = False
            if not done:  # a slot waits for its calls to end, or HAProxy was away
                await asyncio.sleep(RETRY_SECONDS)
                self._dirty.set()

    async def apply(self) -> bool:
        """One pass; False while something is left to do later."""
        async with self._applying:
            return await self._apply()

    async def _apply(self) -> bool:
        wanted = {w.worker_id: w for w in self.pool.workers.values() if not w.removed}
        # The ids every replica and direct-mode client computes for these workers.
        ids = server_ids(wanted)
        for worker_id, slot in list(self.servers.items()):
            handle = wanted.get(worker_id)
            if handle is None or (handle.address, ids[worker_id]) != (
                slot.address,
                slot.server_id,
            ):
                await self._set_state(slot, "maint")
                del self.servers[worker_id]
                self.releasing.add(slot.server_id)
        if self.releasing:
            await self._reclaim()
        done = not self.releasing
        for worker_id, handle in wanted.items():
            held = self.servers.get(worker_id)
            if held is not None:
                slot = held
            elif ids[worker_id] in self.releasing:
                done = False  # its slot still carries the previous worker's calls
                continue
            else:
                try:
                    slot = await self._point(worker_id, ids[worker_id], handle.address)
                except (OSError, HaproxyError) as exc:  # this worker only: the others go on
                    log.warning(
                        "haproxy server not pointed at a worker",
                        extra={"worker": worker_id, "address": handle.address, "error": str(exc)},
                    )
                    done = False
                    continue
            state = desired_state(handle)
            if state != slot.state:
                await self._set_state(slot, state)
        return done

    async def _point(self, worker_id: str, server_id: int, address: str) -> _Slot:
        host, port = await _resolve(address)
        answer = await self.api.run(point_slot_command(server_id, host, port))
        if "changed" not in answer and "no need to change" not in answer:
            raise HaproxyError(answer.strip())
        slot = self.servers[worker_id] = _Slot(server_id, address, "maint")
        self._workers_by_slot[slot_name(server_id).encode()] = worker_id
        log.info(
            "haproxy server pointed at a worker",
            extra={"worker": worker_id, "address": address, "server": slot.path},
        )
        return slot

    async def _set_state(self, slot: _Slot, state: str) -> None:
        if slot.state != state:
            check(await self.api.run(f"set server {slot.path} state {state}"))
            slot.state = state

    async def _reclaim(self) -> None:
        """Free the releasing slots that carry no call and no busy connection any more."""
        stats = await self.api.backend_stats(WORKERS_BACKEND)
        used = await self.api.connections_in_use(WORKERS_BACKEND)
        for server_id in sorted(self.releasing):
            name = slot_name(server_id)
            counters = stats.servers.get(name)
            busy = counters is not None and (counters.in_flight or counters.queued)
            if not busy and not used.get(name, 0):
                self.releasing.discard(server_id)
                log.info("haproxy server free", extra={"server": f"{WORKERS_BACKEND}/{name}"})


async def _resolve(address: str) -> tuple[str, int]:
    """``host:port`` (or ``[v6]:port``) as an IP address and a port: HAProxy's runtime API takes
    addresses only, and discovery may name a host."""
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        infos = await asyncio.get_running_loop().getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM
        )
        host = str(infos[0][4][0])
    return host, int(port)
