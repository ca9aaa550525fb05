"""Keep HAProxy's worker servers equal to the router's view of the pool, through the runtime API.

The Python router already follows discovery (EndpointSlices or a static list) and watches every
worker's ``grpc.health.v1`` stream. This maps that view onto HAProxy servers: a worker that
appears is added (in maintenance), SERVING makes it ``ready``, NOT_SERVING (a worker draining)
``drain`` (no new calls, the running ones finish), a broken health stream ``maint`` at once
(passive ejection: HAProxy stops choosing it before any call times out). A worker that leaves
discovery is put in maintenance and deleted once its connections are gone. No reload, ever.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from ..pool import WorkerPool
from ..ring import server_id
from ..workers import DRAINING, READY, WorkerHandle
from .config import WORKERS_BACKEND, HaproxySpec, add_server_command, server_name
from .runtime import HaproxyError, RuntimeApi, check

log = logging.getLogger("snakepit.router")

RETRY_SECONDS = 0.5


@dataclass
class _Server:
    name: str
    address: str
    server_id: int
    state: str  # the admin state last set: ready, drain, maint


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
        self.servers: dict[str, _Server] = {}  # by worker id, as HAProxy has them now
        self._dirty = asyncio.Event()

    def notify(self) -> None:
        """The pool changed: apply it soon (coalesced)."""
        self._dirty.set()

    def reset(self) -> None:
        """HAProxy restarted empty: add every server again."""
        self.servers.clear()
        self._dirty.set()

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            try:
                done = await self.apply()
            except (OSError, TimeoutError, HaproxyError) as exc:
                log.warning("haproxy server sync failed", extra={"error": str(exc)})
                done = False
            if not done:  # a deletion waits for connections to close, or HAProxy was away
                await asyncio.sleep(RETRY_SECONDS)
                self._dirty.set()

    async def apply(self) -> bool:
        """One pass; False while something is left to do later."""
        done = True
        wanted = {w.worker_id: w for w in self.pool.workers.values() if not w.removed}
        for worker_id in [w for w in self.servers if w not in wanted]:
            done &= await self._delete(worker_id)
        for worker_id, handle in wanted.items():
            server = self.servers.get(worker_id)
            if server is not None and server.address != handle.address:
                if not await self._delete(worker_id):
                    done = False
                    continue
                server = None
            if server is None:
                server = await self._add(worker_id, handle.address)
            state = desired_state(handle)
            if state != server.state:
                check(await self.api.run(f"set server {self._path(server)} state {state}"))
                server.state = state
        return done

    async def _add(self, worker_id: str, address: str) -> _Server:
        sid = server_id(worker_id, (s.server_id for s in self.servers.values()))
        name = server_name(worker_id)
        answer = await self.api.run(add_server_command(self.spec, worker_id, address, sid))
        if "already exists" not in answer:  # left over from before a sync failure
            check(answer, ok=("New server registered.",))
        server = self.servers[worker_id] = _Server(name, address, sid, "maint")
        check(await self.api.run(f"enable health {self._path(server)}"))
        log.info("haproxy server added", extra={"worker": worker_id, "address": address})
        return server

    async def _delete(self, worker_id: str) -> bool:
        server = self.servers[worker_id]
        if server.state != "maint":
            check(await self.api.run(f"set server {self._path(server)} state maint"))
            server.state = "maint"
        answer = await self.api.run(f"del server {self._path(server)}")
        if "Server deleted" in answer or "No such server" in answer:
            del self.servers[worker_id]
            log.info("haproxy server deleted", extra={"worker": worker_id})
            return True
        return False  # calls or connections still on it: try again shortly

    @staticmethod
    def _path(server: _Server) -> str:
        return f"{WORKERS_BACKEND}/{server.name}"
