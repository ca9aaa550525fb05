"""The router: the pool's front door.

Tool calls are forwarded as opaque bytes (the session id comes from request metadata, so a 100 MB
tensor argument is never parsed here) to the worker the pool picks; session and variable RPCs are
served from the session store; Ping, GetPoolStatus and GetRoutingTable describe the pool.

Every RPC of BridgeService first asks the ``Gate`` who calls (``security.gate``; open when auth
is off). Tool calls then travel to the worker with a pool-signed ticket naming that principal in
place of the caller's credential, and reach the caller's own session keys only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2

from .. import tracing
from ..autoscale import CAPACITY_SERVICE
from ..errors import SnakepitError, Unavailable
from ..grpc_options import DEFAULT_MAX_MESSAGE_MB
from ..metrics import RouterMetrics
from ..metrics.common import MetricsServer, serve_http, timed_store
from ..protocol import SERVICE_NAME, pb
from ..protocol import handlers as handlers_for
from ..protocol.status import (
    ERROR_DETAIL_KEY,
    SESSION_ID_KEY,
    abort_with,
    error_from_rpc,
    find_metadata,
    never_started,
    worker_failure,
)
from ..security.gate import CREDENTIAL_KEYS, AuthConfig, Gate, build_gate
from ..security.identity import Principal, session_id_of, session_key
from ..security.tls import ChannelTls, ServerTls, TlsFiles
from ..store.base import DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_TTL, SessionStore
from ..store.limits import StoreLimits
from ..store.offload import DEFAULT_HELPERS, HelperConfig, ValueHelpers
from .discovery import Discovery, StaticDiscovery
from .hosting import FORWARDED_KEY, HostRegistry
from .observe import NULL_OBSERVER, CallObserver, NullObserver
from .pool import PoolConfig, WorkerPool
from .retry import Attempts, Next
from .shares import (
    DEFAULT_STORE_CALL_RATE_PER_PRINCIPAL,
    DEFAULT_STORE_CALLS_PER_PRINCIPAL,
    PrincipalRates,
    PrincipalShares,
)
from .workers import WorkerHandle

# How often the router looks whether its pool certificate was renewed (then redials workers).
TLS_RENEW_CHECK = 1.0

log = logging.getLogger("snakepit.router")
# Whom the router's own calls to workers (listing their tools) are on behalf of.
ROUTER_PRINCIPAL = Principal("snakepit-router", source="router")

_HOP_HEADERS = (
    "user-agent",
    "content-type",
    "te",
    "grpc-accept-encoding",
    "grpc-encoding",
    "grpc-timeout",
)
_TOUCH_INTERVAL = 5.0
_TOUCH_MEMORY = 100_000


@dataclass
class RouterConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    router_id: str = ""
    store_url: str = "memory"
    session_ttl: float = DEFAULT_SESSION_TTL
    max_sessions: int = DEFAULT_MAX_SESSIONS
    workers: list[str] = field(default_factory=list)
    workers_service: str = ""
    namespace: str = ""
    worker_port: int | None = None
    pool: PoolConfig = field(default_factory=PoolConfig)
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    # Clients are sent GOAWAY (and reconnect) after this long; 0 keeps connections forever.
    max_connection_age: float = 5.0
    # HOST:PORT other router replicas reach this one at (hosted-tool calls are forwarded to the
    # replica holding the host's stream); default $POD_IP (else 127.0.0.1) and the bound port.
    advertise_address: str = ""
    # Prometheus metrics at http://host:metrics_port/metrics; None records and serves none.
    metrics_port: int | None = None
    # Tool calls through HAProxy or the Python router: auto, haproxy, python (router/dataplane.py).
    data_path: str = "auto"
    limits: StoreLimits = field(default_factory=StoreLimits)
    # Helper processes that check large written values off the event loop (0: on the loop).
    value_helpers: int = DEFAULT_HELPERS
    # Store RPCs one authenticated principal may have in flight here (0: no bound; shares.py).
    max_store_calls_per_principal: int = DEFAULT_STORE_CALLS_PER_PRINCIPAL
    # Store RPCs a second one authenticated principal may start here (0: no bound; shares.py).
    store_call_rate_per_principal: float = DEFAULT_STORE_CALL_RATE_PER_PRINCIPAL
    auth: AuthConfig = field(default_factory=AuthConfig)
    # TLS on the router's port: ``cert``/``key`` it presents and, if ``ca`` is set, the CA whose
    # client certificates it then requires. None: plaintext.
    tls: TlsFiles | None = None
    # The pool's TLS files (its certificate from the pool CA, the pool CA): workers are then
    # dialled with mutual TLS and must prove pool membership, and the router listens on
    # ``internal_port`` (0: any free port) for its workers' and peer routers' calls, mutual TLS
    # with the pool CA only. None: plaintext inside the pool.
    pool_tls: TlsFiles | None = None
    internal_port: int = 0
    # A plaintext port serving only grpc.health.v1, for probes that cannot speak TLS.
    health_port: int | None = None


def default_router_id() -> str:
    return os.environ.get("POD_NAME") or f"router-{socket.gethostname()}-{os.getpid()}"


def advertised_address(config: RouterConfig, port: int) -> str:
    if config.advertise_address:
        return config.advertise_address
    ip = os.environ.get("POD_IP") or "127.0.0.1"
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def forwardable(metadata: Sequence[Any] | None) -> tuple[tuple[str, Any], ...]:
    return tuple(
        (key, value)
        for key, value in metadata or ()
        if not key.startswith(":") and key not in _HOP_HEADERS
    )


def routing_metadata(metadata: Sequence[Any] | None) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The call's session id and the metadata to pass on to the worker, in one pass."""
    session_id = ""
    forwarded = []
    for key, value in metadata or ():
        if key == SESSION_ID_KEY:
            session_id = value
        elif key.startswith(":") or key in _HOP_HEADERS or key in CREDENTIAL_KEYS:
            continue  # credentials never go on: the worker gets a ticket instead
        forwarded.append((key, value))
    return session_id, tuple(forwarded)


class RouterServer:
    def __init__(
        self,
        config: RouterConfig,
        *,
        store: SessionStore | None = None,
        discovery: Discovery | None = None,
        gate: Gate | None = None,
    ) -> None:
        self.config = config
        self.gate = gate if gate is not None else build_gate(config.auth)
        self.router_id = config.router_id or default_router_id()
        self.store = store
        self.discovery = discovery
        self.pool = WorkerPool(config.pool)
        self.shares = PrincipalShares(
            config.pool.max_calls_per_principal,
            queue_size=config.pool.queue_size,
            queue_timeout=config.pool.queue_timeout,
        )
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.port = 0
        self.internal_port = 0  # with pool TLS: where workers and peer routers call
        self.pool.tls = None if config.pool_tls is None else ChannelTls.pool(config.pool_tls)
        self.started = time.monotonic()
        self._touched: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.hosting = HostRegistry(self._spawn, self._pool_tool_names, self._existing_sessions)
        self._pool_tools: tuple[float, set[str]] | None = None
        self.metrics: RouterMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        # worker id -> its metrics address, shown by GetPoolStatus (set by `snakepit serve`)
        self.worker_metrics: dict[str, str] = {}
        if config.metrics_port is not None:
            self.metrics = RouterMetrics()
            self.metrics.bind(self.pool)
        self.tracer = tracing.tracer()
        # Set by an autoscaler in this process (``snakepit serve``): reported in GetPoolStatus.
        self.desired_workers: int | None = None
        self.scale_reason = ""
        # Called when calls start being held with no ready worker (e.g. to wake an autoscaler).
        self.starved_listeners: list[Callable[[], None]] = []
        self.pool.on_starved = self._on_starved
        # Started on the first large write, stopped with the router (store/offload.py).
        self.value_helpers: ValueHelpers | None = None

    def _observe(
        self, method: str, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> NullObserver:
        """The metrics and tracing hooks of one tool call (no-ops when both are off)."""
        if self.metrics is None and self.tracer is None:
            return NULL_OBSERVER
        return CallObserver(self.metrics, self.tracer, method, raw, context.invocation_metadata())

    # Lifecycle --------------------------------------------------------------------------------
    async def start(self) -> int:
        # grpc's health servicer starts with the overall service SERVING (see ``_announce``).
        await self.health.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.store is None:
            from ..store import open_store

            self.store = open_store(
                self.config.store_url,
                default_ttl=self.config.session_ttl,
                max_sessions=self.config.max_sessions,
                limits=self.config.limits,
            )
        if self.discovery is None:
            self.discovery = self._default_discovery()
        if self.metrics is not None and self.config.metrics_port is not None:
            self.store = timed_store(self.store, self.metrics)
            self.metrics_server = serve_http(
                self.metrics.registry, self.config.metrics_port, self._side_host()
            )
            self._spawn(self._count_sessions(self.metrics))
        self._spawn(self.discovery.run(self.pool.set_workers))
        self.server, self.port, self.internal_port = await handlers_for.start_server(
            self._handlers(),
            self.health,
            self.config.host,
            self.config.port,
            self.config.max_message_mb,
            int(self.config.max_connection_age * 1000) or None,
            max_streams_per_connection=self.config.pool.max_streams_per_connection,
            **self._listeners(),
        )
        if self.pool.tls is not None:
            self._spawn(self._renew_worker_channels(self.pool.tls))
        if self.config.health_port is not None:
            self.health_server = await handlers_for.start_health_server(
                self.health, self._side_host(), self.config.health_port
            )
        self._start_hosting()
        await self._announce()
        return self.port

    async def _announce(self) -> None:
        """Tell probes and clients that calls may come: every health service SERVING.

        Until then the overall service (``""``, what the kubelet's gRPC probes ask) is
        NOT_SERVING, so a router pod is not Ready, and in no Service's endpoints, before its
        pool port takes calls."""
        serving = health_pb2.HealthCheckResponse.SERVING
        for service in (SERVICE_NAME, CAPACITY_SERVICE, ""):
            await self.health.set(service, serving)
        store = None if self.store is None else self.store.backend
        log.info("router serving", extra={"port": self.port, "store": store})

    def _side_host(self) -> str:
        """Where the metrics and plaintext health ports listen: the router's host (kubelet
        probes and Prometheus reach them on the pod's address)."""
        return self.config.host

    def _listeners(self) -> dict[str, Any]:
        """``start_server``'s TLS keywords: the public port's and the internal one's."""
        listeners: dict[str, Any] = {}
        tls, pool_tls = self.config.tls, self.config.pool_tls
        if tls is not None:
            listeners["credentials"] = ServerTls(
                tls.cert, tls.key, [tls.ca] if tls.ca else []
            ).credentials()
        if pool_tls is not None:
            internal = ServerTls(pool_tls.cert, pool_tls.key, [pool_tls.ca])
            address = f"{self.config.host}:{self.config.internal_port}"
            listeners["internal"] = (address, internal.credentials())
        return listeners

    async def _renew_worker_channels(self, tls: ChannelTls) -> None:
        """Redial every worker once the pool certificate or CA files change (renewal)."""
        while True:
            await asyncio.sleep(TLS_RENEW_CHECK)
            if tls.changed():
                tls.credentials()  # read once for all the channels below
                log.info("pool certificate renewed; redialling workers")
                for handle in list(self.pool.workers.values()):
                    handle.renew()

    def _start_hosting(self) -> None:
        """Share hosted-tool ownership through the store when it is shared (Redis)."""
        self.hosting.address = advertised_address(self.config, self.internal_port or self.port)
        self.hosting.tls = self.pool.tls
        redis = getattr(self.store, "redis", None)
        if redis is not None:
            from .host_directory import HostDirectory

            directory = HostDirectory(redis, getattr(self.store, "prefix", "sp"))
            self.hosting.directory = directory
            self._spawn(
                directory.keep_fresh(
                    self.hosting.address, self.hosting.local_sessions, self.hosting.pool_entries
                )
            )
        self._spawn(self.hosting.sweep_forever())

    async def _existing_sessions(self, session_ids: list[str]) -> set[str]:
        """The sessions of ``session_ids`` the store still has; on a store fault, all of them
        (nothing is ended on a guess: the next sweep decides)."""
        assert self.store is not None
        try:
            return await self.store.existing(session_ids)
        except Exception:  # an unreachable store ends nothing
            log.warning("hosted-session sweep skipped: the store did not answer", exc_info=True)
            return set(session_ids)

    def _default_discovery(self) -> Discovery:
        if self.config.workers_service:
            from .discovery import EndpointSliceDiscovery

            namespace = self.config.namespace or os.environ.get("POD_NAMESPACE") or "default"
            return EndpointSliceDiscovery(
                self.config.workers_service, namespace, self.config.worker_port, starting=True
            )
        return StaticDiscovery(self.config.workers)

    async def stop(self, grace: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        await self.hosting.close(grace)
        if self.server is not None:
            await self.server.stop(grace)
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
        for task in list(self._tasks):
            task.cancel()
        await self.hosting.close_peers()
        await self.pool.close()
        if self.value_helpers is not None:
            await self.value_helpers.close()
        if self.store is not None:
            await self.store.close()
        if self.metrics_server is not None:
            self.metrics_server.close()

    async def wait_closed(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()

    def _on_starved(self, starved: bool) -> None:
        log.info("calls held with no ready worker" if starved else "a worker takes calls again")
        self._spawn(self._publish_capacity())
        if starved:
            for listener in self.starved_listeners:
                listener()

    async def _publish_capacity(self) -> None:
        # Reads the state when it runs, so quick flips cannot land out of order.
        serving = health_pb2.HealthCheckResponse
        status = serving.NOT_SERVING if self.pool.starved else serving.SERVING
        await self.health.set(CAPACITY_SERVICE, status)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # Handlers ---------------------------------------------------------------------------------
    def _handlers(self) -> grpc.GenericRpcHandler:
        from ..store.service import StoreService, method_handlers

        assert self.store is not None
        if self.config.value_helpers > 0:
            self.value_helpers = ValueHelpers(
                self.store.limits, HelperConfig(processes=self.config.value_helpers)
            )
        store_shares = PrincipalShares(
            self.config.max_store_calls_per_principal,
            queue_size=self.config.pool.queue_size,
            queue_timeout=self.config.pool.queue_timeout,
            flag="--max-store-calls-per-principal",
            what="store calls",
        )
        store_rates = PrincipalRates(
            self.config.store_call_rate_per_principal,
            max_wait=self.config.pool.queue_timeout,
            flag="--store-call-rate-per-principal",
        )
        handlers: dict[str, grpc.RpcMethodHandler] = method_handlers(
            StoreService(self.store, self.gate, self.value_helpers, store_shares, store_rates)
        )
        handlers.update(
            ExecuteTool=grpc.unary_unary_rpc_method_handler(self._execute),
            ExecuteStreamingTool=grpc.unary_stream_rpc_method_handler(self._execute_stream),
            ListTools=grpc.unary_unary_rpc_method_handler(self._list_tools),
            RegisterTool=grpc.stream_stream_rpc_method_handler(self._register_tool),
            ExecuteHostedTool=grpc.unary_unary_rpc_method_handler(self._execute_hosted),
            ExecuteHostedStreamingTool=grpc.unary_stream_rpc_method_handler(
                self._execute_hosted_stream
            ),
            Ping=handlers_for.unary(self._ping, pb.PingRequest),
            GetPoolStatus=handlers_for.unary(self._pool_status, pb.GetPoolStatusRequest),
            GetRoutingTable=handlers_for.unary(self._routing_table, pb.GetRoutingTableRequest),
        )
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    async def _principal(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        """The verified caller of this call; the call ends UNAUTHENTICATED when there is none."""
        try:
            return await self.gate.authenticate(context.invocation_metadata())
        except SnakepitError as exc:
            await abort_with(context, exc)
            raise  # unreachable: abort raises

    async def _call_metadata(
        self, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Principal, str, tuple[tuple[str, Any], ...]]:
        """Who calls, the call's session id and what goes on to the worker (a ticket naming
        the caller, no credential)."""
        who = await self._principal(context)
        session_id, forwarded = routing_metadata(context.invocation_metadata())
        return who, session_id, forwarded + self.gate.ticket_metadata(who)

    async def _execute(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        who, session_id, forwarded = await self._call_metadata(context)
        attempts = Attempts(self.pool.config.queue_timeout)
        started = time.perf_counter()
        ok = False
        sent = 0
        observer = self._observe("ExecuteTool", raw, context)
        shared = False
        try:
            if self.shares.limit:
                shared = await self._take_share(who, context, observer)
            while True:
                handle = self.pool.take(session_id, attempts.avoid) or await self._wait(
                    session_id, [], context, observer
                )
                step = Next.ELSEWHERE
                try:
                    response: bytes = await handle.execute(
                        raw,
                        timeout=context.time_remaining(),
                        metadata=observer.forward(handle.worker_id, forwarded),
                    )
                    ok = True
                    sent = len(response)
                    return response
                except grpc.aio.AioRpcError as exc:
                    step = self._next_step(exc, handle, attempts, context, observer)
                    if step is Next.GIVE_UP:
                        await self._forward_error(context, exc, handle)
                finally:
                    self.pool.release(handle, ok=ok)
                    observer.attempt_done(handle.worker_id, ok)
                    if session_id:
                        self._note_session(who, session_id, handle.worker_id)
                if step is Next.LATER:
                    await asyncio.sleep(attempts.backoff)
        finally:
            if shared:
                self.shares.release(who.name)
            self.pool.record(ok=ok, started=started)
            observer.done(_outcome(ok, context), sent)

    async def _execute_stream(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        who, session_id, forwarded = await self._call_metadata(context)
        attempts = Attempts(self.pool.config.queue_timeout)
        started = time.perf_counter()
        ok = sent = headers_sent = False
        sent_bytes = 0
        observer = self._observe("ExecuteStreamingTool", raw, context)
        shared = False
        try:
            if self.shares.limit:
                shared = await self._take_share(who, context, observer)
            while True:
                handle = self.pool.take(session_id, attempts.avoid) or await self._wait(
                    session_id, [], context, observer
                )
                step = Next.ELSEWHERE
                call = handle.execute_stream(
                    raw,
                    timeout=context.time_remaining(),
                    metadata=observer.forward(handle.worker_id, forwarded),
                )
                try:
                    headers = await call.initial_metadata()
                    if headers and not headers_sent:
                        await context.send_initial_metadata(forwardable(headers))
                        headers_sent = True
                    async for chunk in call:
                        sent = True
                        sent_bytes += len(chunk)
                        yield chunk
                    ok = True
                    return
                except grpc.aio.AioRpcError as exc:
                    step = (
                        Next.GIVE_UP
                        if sent
                        else self._next_step(exc, handle, attempts, context, observer)
                    )
                    if step is Next.GIVE_UP:
                        await self._forward_error(context, exc, handle)
                finally:
                    call.cancel()
                    self.pool.release(handle, ok=ok)
                    observer.attempt_done(handle.worker_id, ok)
                    if session_id:
                        self._note_session(who, session_id, handle.worker_id)
                if step is Next.LATER:
                    await asyncio.sleep(attempts.backoff)
        finally:
            if shared:
                self.shares.release(who.name)
            self.pool.record(ok=ok, started=started)
            observer.done(_outcome(ok, context), sent_bytes)

    async def _take_share(
        self,
        who: Principal,
        context: grpc.aio.ServicerContext[Any, Any],
        observer: NullObserver = NULL_OBSERVER,
    ) -> bool:
        """One of the caller's slots (``--max-calls-per-principal``); refusals end the call."""
        started = time.perf_counter()
        try:
            waited = await self.shares.acquire(who.name, context.time_remaining())
        except SnakepitError as exc:
            observer.rejected(exc)
            await abort_with(context, exc)
            raise  # unreachable: abort raises
        if waited:
            observer.waited(started)
        return True

    async def _wait(
        self,
        session_id: str,
        tried: list[str],
        context: grpc.aio.ServicerContext[Any, Any],
        observer: NullObserver = NULL_OBSERVER,
    ) -> WorkerHandle:
        """The slow path of choosing a worker: queue for one (errors end the call)."""
        started = time.perf_counter()
        try:
            handle = await self.pool.wait(session_id, tried, context.time_remaining())
        except SnakepitError as exc:
            observer.rejected(exc)
            await abort_with(context, exc)
            raise  # unreachable: abort raises
        observer.waited(started)
        return handle

    def _next_step(
        self,
        exc: grpc.aio.AioRpcError,
        handle: WorkerHandle,
        attempts: Attempts,
        context: grpc.aio.ServicerContext[Any, Any],
        observer: NullObserver = NULL_OBSERVER,
    ) -> Next:
        """Decide what follows a failed attempt (see ``retry``); a worker that is leaving or
        cannot be reached leaves the ring now, before its health stream says so."""
        error = error_from_rpc(exc)
        step = attempts.after(error, handle.worker_id, context.time_remaining())
        if step is Next.ELSEWHERE:
            if error.code == grpc.StatusCode.UNAVAILABLE and error.not_started:
                self.pool.mark_draining(handle)
            else:
                self.pool.mark_unreachable(handle)
        if step is not Next.GIVE_UP:
            observer.retried(error.code.name)
        return step

    async def _forward_error(
        self,
        context: grpc.aio.ServicerContext[Any, Any],
        exc: grpc.aio.AioRpcError,
        handle: WorkerHandle | None = None,
    ) -> None:
        """Pass a worker's failure on as it came: status, message and ErrorDetail.

        An UNAVAILABLE the worker did not send (no ErrorDetail: gRPC's own words for a
        connection to the worker that failed or broke mid-call) is said in snakepit's words,
        with the worker's id (``worker_failure``). Passed on bare, grpc's "Stream removed
        (Connection reset by peer)" read to the caller as its own connection to the router
        failing, and the client suggested a client certificate."""
        trailing = exc.trailing_metadata()
        if (
            exc.code() == grpc.StatusCode.UNAVAILABLE
            and find_metadata(trailing, ERROR_DETAIL_KEY) is None
        ):
            worker = handle.worker_id if handle is not None else ""
            started = not never_started(error_from_rpc(exc))
            failure = worker_failure(worker, exc.details() or "", started=started)
            await abort_with(context, failure, worker)
        if trailing:
            context.set_trailing_metadata(forwardable(trailing))
        await context.abort(exc.code(), exc.details() or "")

    def _note_session(self, who: Principal, session_id: str, worker_id: str) -> None:
        """Slide the session's TTL and record its worker, at most every few seconds per session."""
        self.pool.remember(session_id, worker_id)
        session_id = session_key(who, session_id)
        now = time.monotonic()
        last = self._touched.get(session_id)
        if last is not None and last[0] == worker_id and now - last[1] < _TOUCH_INTERVAL:
            return
        self._touched[session_id] = (worker_id, now)
        self._touched.move_to_end(session_id)
        if len(self._touched) > _TOUCH_MEMORY:
            self._touched.popitem(last=False)
        self._spawn(self._touch(session_id, worker_id))

    async def _touch(self, session_id: str, worker_id: str) -> None:
        assert self.store is not None
        # A call may name a session that was never opened in the store.
        with contextlib.suppress(SnakepitError):
            await self.store.touch_session(session_id, worker_id=worker_id)

    async def _execute_hosted(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """A tool hosted by the caller of the call's session (see hosting.py)."""
        async for result in self._hosted(raw, context, streaming=False):
            return result
        raise AssertionError("unreachable: a unary hosted call answers or fails")

    async def _execute_hosted_stream(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async for chunk in self._hosted(raw, context, streaming=True):
            yield chunk

    async def _hosted(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any], *, streaming: bool
    ) -> AsyncIterator[bytes]:
        who, session_id, forwarded = await self._call_metadata(context)
        if session_id:
            forwarded = (*forwarded, (SESSION_ID_KEY, session_id))
        key = session_key(who, session_id) if session_id else ""
        try:
            async for item in self.hosting.call(
                raw,
                key,
                forwarded,
                context.time_remaining(),
                streaming,
                "" if who.anonymous else who.name,
            ):
                yield item
        except SnakepitError as exc:
            await abort_with(context, exc)

    async def _register_tool(
        self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        """A caller hosting tools: for its own sessions only (their keys are its principal's)."""
        who = await self._principal(context)
        async for event in self.hosting.serve(
            requests,
            context,
            key_of=lambda sid: session_key(who, sid),
            id_of=lambda key: session_id_of(who, key) or key,
            principal=who,
        ):
            yield event

    async def _list_tools(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        who = await self._principal(context)
        try:
            session_id = pb.ListToolsRequest.FromString(raw).session_id
        except DecodeError:
            session_id = ""  # the worker answers a malformed request with INVALID_ARGUMENT
        key = session_key(who, session_id) if session_id else ""
        if find_metadata(context.invocation_metadata(), FORWARDED_KEY):  # another replica asks
            return pb.ListToolsResponse(tools=self.hosting.specs_for(key)).SerializeToString()
        handle = self.pool.any_ready()
        if handle is None:
            await abort_with(context, Unavailable("no worker is ready to list its tools"))
            raise AssertionError("unreachable")
        try:
            response: bytes = await handle.list_tools(
                raw, timeout=context.time_remaining(), metadata=self.gate.ticket_metadata(who)
            )
        except grpc.aio.AioRpcError as exc:
            await self._forward_error(context, exc, handle)
            raise
        hosted = await self.hosting.hosted_specs(
            key, context.time_remaining(), session_id, self.gate.ticket_metadata(who)
        )
        if hosted:  # the caller-hosted tools of the session come after the pool's
            merged = pb.ListToolsResponse.FromString(response)
            merged.tools.extend(hosted)
            return merged.SerializeToString()
        return response

    async def _pool_tool_names(self) -> set[str] | None:
        """The names of the workers' tools (a hosted tool may not take one), cached a minute."""
        cached = self._pool_tools
        if cached is not None and time.monotonic() - cached[0] < 60.0:
            return cached[1]
        handle = self.pool.any_ready()
        if handle is None:
            return None
        try:
            raw = await handle.list_tools(
                pb.ListToolsRequest().SerializeToString(),
                timeout=5.0,
                metadata=self.gate.ticket_metadata(ROUTER_PRINCIPAL),
            )
        except grpc.aio.AioRpcError:
            return None
        names = {tool.name for tool in pb.ListToolsResponse.FromString(raw).tools}
        self._pool_tools = (time.monotonic(), names)
        return names

    async def _ping(
        self, request: pb.PingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PingResponse:
        await self._principal(context)
        return handlers_for.pong(request, self.router_id, "router")

    async def load(self) -> float:
        """Calls that want a worker now, in flight plus queued: what autoscaling follows."""
        return float(self.pool.load)

    async def _pool_status(
        self, request: pb.GetPoolStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PoolStatus:
        who = await self._principal(context)
        # Where workers and metrics listen, and how many sessions the whole pool holds, are for
        # admins and direct-mode principals (who get the addresses from the routing table
        # anyway); everyone else sees the pool's load, not a map of it (docs/security.md).
        detailed = who.admin or who.direct
        pool = self.pool
        workers = pool.worker_statuses()
        for worker in workers:
            if detailed:
                worker.metrics_address = self.worker_metrics.get(worker.worker_id, "")
            else:
                worker.address = ""
        latencies = sorted(pool.latencies_ms)
        sessions = 0
        store_name = ""
        if self.store is not None and detailed:
            store_name = self.store.backend
            try:
                sessions = (await self.store.stats()).sessions
            except SnakepitError:
                sessions = -1
        return pb.PoolStatus(
            router_id=self.router_id,
            workers=workers,
            workers_total=len(workers),
            workers_ready=sum(w.ready for w in workers),
            busy=sum(w.in_flight >= w.capacity for w in workers),
            in_flight=pool.in_flight,
            queued=pool.queued,
            queue_capacity=pool.config.queue_size,
            calls_total=pool.calls_total,
            calls_failed=pool.calls_failed,
            latency_p50_ms=_percentile(latencies, 0.50),
            latency_p90_ms=_percentile(latencies, 0.90),
            latency_p99_ms=_percentile(latencies, 0.99),
            sessions=sessions,
            affinity=pool.config.affinity,
            store=store_name,
            uptime_seconds=time.monotonic() - self.started,
            metrics_address=self._metrics_address() if detailed else "",
            workers_desired=len(workers) if self.desired_workers is None else self.desired_workers,
            scale_reason=self.scale_reason,
        )

    def _metrics_address(self) -> str:
        if self.metrics_server is None:
            return ""
        return f"{self.config.host}:{self.metrics_server.port}"

    async def _count_sessions(self, metrics: RouterMetrics) -> None:
        """Keep the sessions gauge fresh (a scrape cannot await the store)."""
        while True:
            assert self.store is not None
            try:
                metrics.sessions = float((await self.store.stats()).sessions)
            except SnakepitError:
                metrics.sessions = -1.0
            await asyncio.sleep(5.0)

    async def _routing_table(
        self, request: pb.GetRoutingTableRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.RoutingTable:
        """The ring, for direct mode: to principals the pool allows it, with a ticket that
        workers accept on their behalf (refreshed with the table)."""
        who = await self._principal(context)
        try:
            self.gate.require_direct(who)
        except SnakepitError as exc:
            await abort_with(context, exc)
        table = self.pool.routing_table()
        if self.gate.issuer is not None and not who.anonymous:
            table.ticket, table.ticket_expires_at = self.gate.issuer.ticket_for(who.name)
        return table


def _outcome(ok: bool, context: grpc.aio.ServicerContext[Any, Any]) -> str:
    """The status code name a finished call ended with (CANCELLED when it was never set)."""
    if ok:
        return "OK"
    code = context.code()
    return str(code.name) if code is not None else "CANCELLED"


def _percentile(ordered: list[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]
