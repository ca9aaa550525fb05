"""The router with HAProxy as its data path: HAProxy in front, the Python router behind it.

HAProxy owns the public port and forwards tool calls straight to the workers (no Python on a
tool call's path); everything else reaches the Python router on a loopback port. The Python side
keeps doing what needs Python: discovery, health watches (mapped onto HAProxy servers through
the runtime API), the session store, status and the routing table.

With TLS, HAProxy terminates the callers' TLS and reaches the workers and the Python router's
internal port with the router's pool certificate (``tlsfiles`` keeps its copies current); the
internal port then binds the public host, as on the Python data path, and is what peer routers
are told. With authentication the Python router verifies every credential HAProxy does not know
yet and tells HAProxy about it (``authmap``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
import secrets
from typing import Any

from grpc_health.v1 import health_pb2

from ... import tracing
from ...protocol import SERVICE_NAME, pb
from ...supervisor import free_port
from ..pool import STRICT
from ..ring import SERVER_SLOTS
from ..server import RouterConfig, RouterServer, advertised_address
from .authmap import AuthMap
from .calllog import CallLog, abstract_address, listen
from .config import WORKERS_BACKEND, HaproxySpec, build_config
from .load import HaproxyLoad
from .process import HaproxyProcess
from .runtime import HaproxyError, RuntimeApi
from .servers import ServerSync
from .share_sync import HaproxyShares
from .tlsfiles import HaproxyFiles

log = logging.getLogger("snakepit.router")


class HaproxyRouter(RouterServer):
    """A ``RouterServer`` that serves its public port through HAProxy."""

    def __init__(self, config: RouterConfig, **kwargs: Any) -> None:
        self.public = config
        # The Python router listens on loopback only; HAProxy keeps its connection open.
        inner = dataclasses.replace(config, host="127.0.0.1", port=0, max_connection_age=0)
        super().__init__(inner, **kwargs)
        self.api = RuntimeApi(_admin_address())
        if self.shares.limit and config.pool.affinity != STRICT:
            # One count per principal with HAProxy's half of the data path (``share_sync``).
            # With strict affinity every tool call goes through the Python router (HAProxy
            # carries none, ``tools_via_router``), whose own count is the whole share.
            self.shares = HaproxyShares(
                self.shares.limit,
                queue_size=self.shares.queue_size,
                queue_timeout=self.shares.queue_timeout,
                api=self.api,
            )
        self.haproxy: HaproxyProcess | None = None
        self.sync: ServerSync | None = None
        # The tasks that keep HAProxy current (servers, TLS files, vouched callers).
        self._keepers: list[asyncio.Task[Any]] = []
        self.files: HaproxyFiles | None = None
        self.authmap: AuthMap | None = None
        self.control_port = 0
        self.current: HaproxySpec | None = None
        self.call_log: CallLog | None = None  # HAProxy's call log, read with metrics on
        self.call_log_address = ""

    def _side_host(self) -> str:
        """The metrics and health ports are the Python process's own (HAProxy does not carry
        them), on the public host like the pool port: only the gRPC port is loopback here."""
        return self.public.host

    def _listeners(self) -> dict[str, Any]:
        """The internal port (pool TLS) is for workers and peer routers: the public host's."""
        listeners = super()._listeners()
        if "internal" in listeners:
            address = f"{self.public.host}:{self.public.internal_port}"
            listeners["internal"] = (address, listeners["internal"][1])
        return listeners

    def spec(self, port: int, control_port: int) -> HaproxySpec:
        pool = self.pool.config
        files = self.files
        host = self.public.host
        return HaproxySpec(
            host=host,
            port=port,
            control_port=control_port,
            # With pool TLS the control port is the internal one, bound on the public host.
            control_host="127.0.0.1"
            if self.config.pool_tls is None or host in ("", "0.0.0.0", "::")
            else host,
            tls=None if files is None else files.tls_spec(),
            auth_map="" if files is None else files.map_path,
            handover_socket="" if files is None else files.handover_socket,
            divert_map="" if files is None else files.divert_path,
            admin_socket=self.api.address,
            worker_concurrency=pool.worker_concurrency,
            queue_size=pool.queue_size,
            queue_timeout=pool.queue_timeout,
            vnodes=pool.vnodes,
            maxconn=_maxconn(),
            log_requests=os.environ.get("SNAKEPIT_HAPROXY_LOG", "") not in ("", "0"),
            call_log=self.call_log_address,
            trace=self.call_log is not None and self.call_log.tracer is not None,
            watchers_per_session=self.config.limits.max_watchers_per_session,
            calls_per_principal=0 if pool.affinity == STRICT else pool.max_calls_per_principal,
            max_message_bytes=self.config.max_message_mb << 20,
            tools_via_router=pool.affinity == STRICT,
        )

    def _worker_of(self, server: bytes) -> str | None:
        return None if self.sync is None else self.sync.worker_of(server)

    async def _observe_haproxy(self) -> None:
        """With metrics on: the tool calls HAProxy carries count in the router's metrics, from
        its call log (``calllog``) and, at each scrape, its queue and running calls (``load``).
        With tracing on: the router's span of each traced call, from the same log
        (``spans``). Listening starts before HAProxy does, so its first lines find a reader."""
        tracer = self.tracer if tracing.span_ids_presettable() else None
        if self.metrics is None and tracer is None:
            return
        name = f"snakepit-calllog-{os.getpid()}-{secrets.token_hex(4)}"
        self.call_log = await listen(name, self.metrics, self._worker_of, tracer)
        self.call_log_address = abstract_address(name)
        if self.metrics is not None:
            self.metrics.add_load(HaproxyLoad(self.api, self._worker_of))

    async def start(self) -> int:
        host = self.public.host
        port = self.public.port or free_port("127.0.0.1" if host == "0.0.0.0" else host)
        if self.config.pool_tls is None:
            # Other replicas reach this one (hosted-tool forwarding) through HAProxy's public
            # port, whose non-tool RPCs go to the Python router. With pool TLS they use the
            # internal port (mutual TLS with the pool CA), as on the Python data path.
            self.config = dataclasses.replace(
                self.config, advertise_address=advertised_address(self.public, port)
            )
        files = self.files = HaproxyFiles(
            self.config.pool_tls, self.config.tls, auth=self.config.auth.enabled
        )
        try:
            self.control_port = await super().start()
            await self._observe_haproxy()
            control = self.internal_port if self.config.pool_tls is not None else self.control_port
            spec = self.current = self.spec(port, control)
            sync = self.sync = ServerSync(self.api, spec, self.pool)
            if spec.auth_map:
                self.authmap = AuthMap(self.gate, self.api, spec.auth_map)
                self.gate.on_bearer = self.authmap.vouch
            self.haproxy = HaproxyProcess(
                build_config(spec),
                self.api,
                on_restart=self._haproxy_restarted,
                on_exit=self._haproxy_exited,
                files=files,
            )
            await self.haproxy.start()
        except BaseException:
            files.remove()
            raise
        self.pool.on_change = sync.notify
        self._keepers = [self._spawn(sync.run())]
        if spec.tls is not None:
            self._keepers.append(self._spawn(files.keep_current(self.api, self._replace_haproxy)))
        if self.authmap is not None:
            self._keepers.append(self._spawn(self.authmap.run()))
        if isinstance(self.shares, HaproxyShares):
            self._keepers.append(self._spawn(self.shares.run()))
        sync.notify()
        self.port = spec.port
        log.info("haproxy data path serving", extra={"port": self.port})
        await super()._announce()
        return self.port

    async def _announce(self) -> None:
        """Not when the Python router has started: the pool port is HAProxy's, which listens
        a moment later (``start`` announces then). A router pod Ready before that took
        connections it refused (a router pod deleted under load on kind: 262 calls failed
        with "Connection refused", stop 31)."""

    async def _replace_haproxy(self) -> None:
        """A new HAProxy with the files as they are now (a CA changed: see ``tlsfiles``)."""
        assert self.haproxy is not None and self.sync is not None and self.files is not None
        assert self.current is not None
        self.api.retarget(_admin_address())
        spec = self.current = dataclasses.replace(self.current, admin_socket=self.api.address)
        self._restarted()
        sync, files, authmap = self.sync, self.files, self.authmap

        async def ready() -> None:
            # Every worker pointed (a slot still held by a departed worker's calls may take
            # longer: the sync loop finishes that one).
            for _ in range(100):
                if await sync.apply():
                    break
                await asyncio.sleep(0.05)
            if authmap is not None:
                await authmap.push()
            if isinstance(self.shares, HaproxyShares):
                await self.shares.write_all()
            await self._servers_up()
            await files.undivert(self.api)

        await self.haproxy.replace(build_config(spec), ready)

    async def _servers_up(self, timeout: float = 3.0) -> None:
        """Wait (bounded) until every pointed server of the new HAProxy passed its first check.

        A slot leaves maintenance DOWN until its check succeeds (TLS with the pool CA here), and
        with no server up HAProxy hands every tool call to the Python router (``nbsrv eq 0``):
        undiverting before that kept the calls on the slower path a moment longer (it failed a
        call of a CA rotation under load while HAProxy answered "no worker is ready" itself)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline:
            stats = await self.api.backend_stats(WORKERS_BACKEND)
            pointed = [s for s in stats.servers.values() if not s.status.startswith("MAINT")]
            if pointed and all(s.status.startswith("UP") for s in pointed):
                return
            await asyncio.sleep(0.05)
        log.warning("haproxy handover: not every worker passed its check within %.0fs", timeout)

    def _restarted(self) -> None:
        """HAProxy came back with every slot free and an empty auth map."""
        if self.sync is not None:
            self.sync.reset()
        if self.authmap is not None:
            self.authmap.reset()

    def _haproxy_restarted(self) -> None:
        """HAProxy exited and a new one is running: it has nothing of the old one's state."""
        self._restarted()
        if isinstance(self.shares, HaproxyShares):
            self.shares.rewrite()
        self._spawn(self._publish_data_path())

    def _haproxy_exited(self) -> None:
        """HAProxy died: the pool port refuses connections until a new one listens, so the
        router says NOT_SERVING meanwhile. Its probes ask the Python router, which is still
        up: a router whose HAProxy crash-looped stayed Ready before (stop 31's note)."""
        self._spawn(self._publish_data_path())

    async def _publish_data_path(self) -> None:
        """The pool port's health as HAProxy is when this runs (so a quick exit and restart
        cannot land out of order): SERVING while one runs, NOT_SERVING otherwise."""
        serving = health_pb2.HealthCheckResponse
        up = self.haproxy is not None and self.haproxy.running
        for service in (SERVICE_NAME, ""):
            await self.health.set(service, serving.SERVING if up else serving.NOT_SERVING)

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        # What keeps HAProxy current stops first: a soft-stopped HAProxy closes its runtime
        # API while its calls finish, and the servers it has are the ones those calls need.
        self.pool.on_change = None
        for task in self._keepers:
            task.cancel()
        if self.haproxy is not None:
            await self.haproxy.stop(grace)
        await super().stop(grace=0.5)
        if self.call_log is not None:
            self.call_log.close()
        if self.files is not None:
            self.files.remove()

    async def load(self) -> float:
        """The Python pool's calls (streams, large bodies, calls held while no worker is ready)
        plus HAProxy's, running and queued; the Python pool's alone while HAProxy does not
        answer (restarting)."""
        own = await super().load()
        try:
            stats = await self.api.backend_stats(WORKERS_BACKEND)
        except (OSError, TimeoutError, HaproxyError):
            return own
        return own + stats.queued + sum(s.in_flight for s in stats.servers.values())

    async def _pool_status(self, request: pb.GetPoolStatusRequest, context: Any) -> pb.PoolStatus:
        """The Python view (workers, sessions) with HAProxy's counters in it. Calls in flight
        and queued are both's (both carry calls to the same workers: what autoscaling reads);
        calls served and failed are HAProxy's, the tool calls it carried."""
        status: pb.PoolStatus = await super()._pool_status(request, context)
        try:
            stats = await self.api.backend_stats(WORKERS_BACKEND)
        except (OSError, TimeoutError, HaproxyError):
            return status
        for worker in status.workers:
            slot = None if self.sync is None else self.sync.slot_of(worker.worker_id)
            counters = None if slot is None else stats.servers.get(slot)
            # Ready means HAProxy sends it calls (the Python view may be a moment ahead).
            worker.ready = counters is not None and (
                counters.status.startswith("UP") or counters.status == "no check"
            )
            if counters is not None:
                worker.in_flight += counters.in_flight
                worker.served = counters.served
                worker.failed = counters.failed
        status.workers_ready = sum(w.ready for w in status.workers)
        status.in_flight = sum(w.in_flight for w in status.workers)
        status.busy = sum(w.in_flight >= w.capacity for w in status.workers)
        status.queued += stats.queued
        status.calls_total = sum(s.served for s in stats.servers.values())
        status.calls_failed = sum(s.failed for s in stats.servers.values())
        return status


def _admin_address() -> str:
    """A fresh runtime API address (a Linux abstract socket: no file to leave)."""
    return f"abns@snakepit-haproxy-{os.getpid()}-{secrets.token_hex(4)}"


def _maxconn(ceiling: int = 10_000) -> int:
    """As many connections as the file descriptor limit allows (HAProxy refuses to start above):
    two descriptors per proxied connection, one reserved per server slot for its checks."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        return ceiling
    return max(256, min(ceiling, (hard - 100 - SERVER_SLOTS) // 2))
