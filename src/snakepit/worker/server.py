"""The worker process: a grpc.aio server that runs one adapter's tools.

It is stateless: session variables live in the session store. It answers Ping, ListTools and the
two tool RPCs, and ``grpc.health.v1`` (NOT_SERVING until the adapter is initialised and again
while draining).

Calls beyond the concurrency limit wait in a short FIFO backlog of the worker's own (``backlog``
calls, at most ``backlog_timeout`` seconds and never past the call's deadline). Each router (and
each HAProxy in front of the pool) counts only the calls *it* sends, so two router replicas can
each send a full worker's worth at once; the backlog turns that overlap into a short wait instead
of a refusal. Only a full backlog or an expired wait refuses (RESOURCE_EXHAUSTED), and while
draining every new call is refused (UNAVAILABLE); both are marked ``not_started`` so a router
may retry them elsewhere.

SIGTERM, or reaching a recycling limit, drains: NOT_SERVING at once, but new calls are still
*admitted* for the first ``drain_grace`` seconds (the time routers need to see NOT_SERVING and
stop sending: HAProxy cannot retry a gRPC refusal, so a call it sent in that moment would fail);
then new calls are refused, in-flight calls (the late ones too, and those waiting in the backlog)
finish, and the server keeps answering (refusing) until ``drain_linger`` seconds after
NOT_SERVING before it stops, so every router sees the worker leave before its connection
closes. Stopping sooner cancels calls already on the wire with CANCELLED (grpc/grpc#41785),
which nobody may retry because nobody knows whether they ran. The supervisor (``snakepit
serve`` or Kubernetes) then starts a fresh worker.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import logging
import os
import random
import signal
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from .. import logs, tracing
from ..errors import (
    DeadlineExceeded,
    Internal,
    NotFound,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from ..grpc_options import DEFAULT_MAX_MESSAGE_MB
from ..heap import freeze_startup_heap, keep_large_buffers
from ..metrics import WorkerMetrics
from ..metrics.common import MetricsServer, serve_http, timed_store
from ..protocol import SERVICE_NAME, pb
from ..protocol import handlers as handlers_for
from ..protocol.messages import ToolRequest, decode_request, encode_chunk, encode_result
from ..protocol.status import CORRELATION_ID_KEY, WORKER_ID_KEY, abort_with, status_of
from ..security.identity import ANONYMOUS, Principal, session_key
from ..security.tickets import DEFAULT_AUDIENCE, TICKET_KEY, TicketVerifier, load_public_key
from ..security.tls import ChannelTls, RenewingChannel, ServerTls, TlsFiles
from ..store.base import SessionStore
from ..store.remote import RemoteStore
from .adapter import Adapter, load_adapter_class
from .context import SessionContext
from .runner import ToolRunner
from .tools import ToolDef, discover

log = logging.getLogger("snakepit.worker")

DEFAULT_ADAPTER = "snakepit.examples.showcase:ShowcaseAdapter"
# The longest a tool call may run when neither the caller nor the operator says otherwise, so
# calls without a deadline cannot hold worker slots forever (docs/security.md).
DEFAULT_MAX_CALL_SECONDS = 300.0
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class WorkerConfig:
    adapter: str = DEFAULT_ADAPTER
    host: str = "0.0.0.0"
    port: int = 50052
    worker_id: str = ""
    concurrency: int = 4
    store_url: str = ""
    router_address: str = ""
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    max_requests: int = 0
    max_age: float = 0.0
    max_rss_mb: float = 0.0
    drain_timeout: float = 25.0
    drain_linger: float = 2.0
    # Seconds after NOT_SERVING during which new calls are still run (at most drain_linger).
    drain_grace: float = 1.0
    session_ttl: float = 3600.0
    max_call_seconds: float = DEFAULT_MAX_CALL_SECONDS
    # Calls that may wait for a slot beyond ``concurrency`` (-1: four times the concurrency).
    backlog: int = -1
    backlog_timeout: float = 30.0

    # Prometheus metrics at http://host:metrics_port/metrics; None records and serves none.
    metrics_port: int | None = None
    # The pool's ticket public key (security.tickets.load_public_key): calls need a ticket.
    ticket_public_key: str = ""
    ticket_audience: str = DEFAULT_AUDIENCE
    # The pool's TLS files (its certificate from the pool CA, the pool CA): the worker then
    # serves TLS only and calls its router with that certificate. Without a ticket key it
    # requires client certificates (mutual TLS) from the pool CA or one of ``tls_client_cas``
    # (direct-mode clients); with one, a valid ticket is what admits a call, and client
    # certificates are required only if ``tls_client_cas`` are given. None: plaintext
    # (docs/security.md).
    pool_tls: TlsFiles | None = None
    tls_client_cas: tuple[str, ...] = ()
    # A plaintext port serving only grpc.health.v1, for probes that cannot speak TLS.
    health_port: int | None = None

    @property
    def backlog_size(self) -> int:
        return 4 * self.concurrency if self.backlog < 0 else self.backlog


def default_worker_id() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


class WorkerServer:
    def __init__(self, config: WorkerConfig, adapter: Adapter | None = None) -> None:
        self.config = config
        self.worker_id = config.worker_id or default_worker_id()
        self.adapter = adapter if adapter is not None else load_adapter_class(config.adapter)()
        self.adapter.worker_id = self.worker_id
        self.tools: dict[str, ToolDef] = discover(self.adapter)
        self.tool_list = pb.ListToolsResponse(
            tools=[t.spec for t in self.tools.values()], worker_id=self.worker_id
        )
        self.runner = ToolRunner(threads=config.concurrency)
        self.health = health.aio.HealthServicer()
        self.server: grpc.aio.Server | None = None
        self.health_server: grpc.aio.Server | None = None
        self.store: SessionStore | None = None
        self._remote: RemoteStore | None = None  # the store, when it is the router (untimed)
        self._store_channel: RenewingChannel | None = None  # its channel to the router
        self.verifier: TicketVerifier | None = None
        if config.ticket_public_key:
            self.verifier = TicketVerifier(
                load_public_key(config.ticket_public_key), audience=config.ticket_audience
            )
        self._router_client: Any = None
        self.in_flight = 0
        self._backlog: collections.deque[asyncio.Future[None]] = collections.deque()
        self.served = 0
        self.failed = 0
        self.started_at = time.monotonic()
        # Up to 10 % more, at random, so workers that share the load don't all recycle at once
        # and leave the pool without a ready worker (gunicorn's max_requests_jitter).
        self._max_requests = config.max_requests + random.randint(0, config.max_requests // 10)
        self.draining = False  # NOT_SERVING: recycling has begun
        self.refusing = False  # new calls are turned away (draining, past the grace window)
        self.overran = False  # a sync tool still runs in a thread nobody can stop
        self._drained = asyncio.Event()
        self._background: set[asyncio.Task[Any]] = set()
        self.port = 0
        self.metrics: WorkerMetrics | None = None
        self.metrics_server: MetricsServer | None = None
        if config.metrics_port is not None:
            self.metrics = WorkerMetrics(set(self.tools))
            self.metrics.bind(
                lambda: self.in_flight, config.concurrency, lambda: len(self._backlog)
            )
        self.tracer = tracing.tracer()

    # Lifecycle -----------------------------------------------------------------------------
    async def start(self) -> int:
        """Serve; return the bound port. Health says SERVING only once the adapter is ready."""
        await self.health.set("", NOT_SERVING)
        await self.health.set(SERVICE_NAME, NOT_SERVING)
        self.server, self.port, _ = await handlers_for.start_server(
            self._handlers(),
            self.health,
            self.config.host,
            self.config.port,
            self.config.max_message_mb,
            credentials=self._server_credentials(),
        )
        if self.config.health_port is not None:
            self.health_server = await handlers_for.start_health_server(
                self.health, self.config.host, self.config.health_port
            )
        await self._connect_store()
        if self.store is not None:
            self.store = timed_store(self.store, self.metrics, self.tracer)
        if self.metrics is not None and self.config.metrics_port is not None:
            self.metrics_server = serve_http(
                self.metrics.registry, self.config.metrics_port, self.config.host
            )
        await _call_hook(self.adapter.initialize)
        await self.health.set("", SERVING)
        await self.health.set(SERVICE_NAME, SERVING)
        self._spawn(self._watch_limits())
        log.info(
            "worker serving",
            extra={
                "port": self.port,
                "tools": sorted(self.tools),
                "concurrency": self.config.concurrency,
            },
        )
        return self.port

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS on the worker port. With tickets (auth on) every tool call must carry a valid
        pool ticket, which is what proves it (the router's and a direct-mode client's alike),
        so no client certificate is asked for: a direct-mode client has a token and the pool
        CA, not a certificate. Without tickets the client certificate is all that proves a
        caller, so it is required (mutual TLS), as it is when ``tls_client_cas`` ask for it.
        grpc's Python API cannot ask for a certificate without requiring one (docs/security.md,
        "Direct mode under the defaults")."""
        files = self.config.pool_tls
        if files is None:
            return None
        required = self.verifier is None or self.config.tls_client_cas  # asked for: kept
        client_cas = (files.ca, *self.config.tls_client_cas) if required else ()
        return ServerTls(files.cert, files.key, client_cas).credentials()

    def _router_tls(self) -> ChannelTls | None:
        """How this worker dials its router: with its pool certificate, when the pool has TLS."""
        files = self.config.pool_tls
        return None if files is None else ChannelTls.pool(files)

    async def _connect_store(self) -> None:
        url = self.config.store_url
        if not url:
            return
        from ..grpc_options import CLIENT_MAX_CONNECTION_AGE, channel_options
        from ..store import open_store

        if url == "router":
            if not self.config.router_address:
                raise ValueError("--store router needs --router HOST:PORT")
            # Renewed when its TLS files change, and aged by the worker itself before the
            # router ages it (grpc_options.CLIENT_MAX_CONNECTION_AGE).
            self._store_channel = RenewingChannel(
                self.config.router_address,
                self._router_tls(),
                channel_options(),
                max_age=CLIENT_MAX_CONNECTION_AGE,
            )
            self.store = open_store(
                "router",
                default_ttl=self.config.session_ttl,
                channel=self._store_channel,
            )
        else:
            self.store = open_store(url, default_ttl=self.config.session_ttl)
        if isinstance(self.store, RemoteStore):  # its calls will carry each call's ticket
            self._remote = self.store

    async def drain(self, reason: str) -> None:
        """Turn NOT_SERVING, admit new calls for the grace window, then refuse them; let
        in-flight calls finish (up to drain_timeout), linger, then stop."""
        if self.draining:
            return
        self.draining = True
        left_at = time.monotonic()
        log.info("worker draining", extra={"reason": reason, "in_flight": self.in_flight})
        if self.metrics is not None:
            self.metrics.recycled(reason)
        await self.health.enter_graceful_shutdown()
        grace = min(self.config.drain_grace, self.config.drain_linger)
        if grace > 0:
            # Routers are taking the worker out; a call they send meanwhile runs as if it had
            # come a moment before the SIGTERM (the drain below waits for it too).
            await asyncio.sleep(grace)
        # Calls that arrived within the grace window and wait in the backlog were admitted:
        # they run as the in-flight ones finish (within drain_timeout). Refusing them here
        # failed a call HAProxy had sent just before it set the worker to drain (a gRPC
        # refusal it cannot send elsewhere), once in a CI run of an image roll (stop 29).
        self.refusing = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.drain_timeout):
                while self.in_flight:  # noqa: ASYNC110 - the hot path keeps no Event
                    await asyncio.sleep(0.02)
        linger = self.config.drain_linger - (time.monotonic() - left_at)
        if linger > 0:
            await asyncio.sleep(linger)  # routers see NOT_SERVING before the connection closes
        if self.server is not None:
            await self.server.stop(grace=1.0)
        if self.health_server is not None:
            await self.health_server.stop(grace=None)
        try:
            await _call_hook(self.adapter.shutdown)
        finally:
            self.runner.shutdown()
            if self.store is not None:
                await self.store.close()
            if self._store_channel is not None:
                await self._store_channel.close()
            if self._router_client is not None:
                await self._router_client.close()
            log.info("worker stopped", extra={"served": self.served, "failed": self.failed})
            if self.metrics_server is not None:
                self.metrics_server.close()
            self._drained.set()

    async def wait_closed(self) -> None:
        await self._drained.wait()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _watch_limits(self) -> None:
        """Recycle on age or memory; checked off the call path, once a second."""
        config = self.config
        while not self.draining:
            await asyncio.sleep(1.0)
            if config.max_age and time.monotonic() - self.started_at > config.max_age:
                self._spawn(self.drain(f"max age {config.max_age:g}s reached"))
            elif config.max_rss_mb and rss_mb() > config.max_rss_mb:
                self._spawn(self.drain(f"memory above {config.max_rss_mb:g} MB"))

    def _after_call(self) -> None:
        limit = self._max_requests
        if limit and self.served + self.failed >= limit and not self.draining:
            self._spawn(self.drain(f"max requests {limit} reached"))

    # RPC handlers --------------------------------------------------------------------------
    def _handlers(self) -> grpc.GenericRpcHandler:
        handlers = {
            "Ping": handlers_for.unary(self._ping, pb.PingRequest),
            "ListTools": handlers_for.unary(self._list_tools, pb.ListToolsRequest),
            "ExecuteTool": grpc.unary_unary_rpc_method_handler(self._execute),
            "ExecuteStreamingTool": grpc.unary_stream_rpc_method_handler(self._execute_stream),
        }
        return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)

    async def _ping(
        self, request: pb.PingRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.PingResponse:
        return handlers_for.pong(request, self.worker_id, "worker")

    async def _list_tools(
        self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> pb.ListToolsResponse:
        try:
            self._caller(context)
        except Unauthenticated as exc:
            await abort_with(context, exc, self.worker_id)
        return self.tool_list

    def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> tuple[Principal, str]:
        """Whom a call is on behalf of, and its ticket: with a verifier, only a valid pool
        ticket gets a call in (Unauthenticated otherwise); without, everyone is anonymous."""
        if self.verifier is None:
            return ANONYMOUS, ""
        ticket = ""
        for key, value in context.invocation_metadata() or ():
            if key == TICKET_KEY:
                ticket = str(value)
        if not ticket:
            raise Unauthenticated(
                "this worker takes calls only with a pool ticket (metadata "
                f"{TICKET_KEY!r}): call through the router, or in direct mode "
                "(Client(direct=True) with a token of a principal the pool allows direct mode: "
                "the routing table carries the ticket)"
            )
        return self.verifier.verify(ticket), ticket

    def _refused_draining(self) -> Unavailable:
        return Unavailable(f"worker {self.worker_id} is draining", not_started=True)

    def _take_free_slot(self) -> bool:
        """Take a slot if one is free and nobody waits for one (FIFO) and not draining."""
        if self.in_flight < self.config.concurrency and not self._backlog and not self.refusing:
            self.in_flight += 1
            return True
        return False

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        """Take a slot: at once when one is free, else after a wait in the backlog (FIFO)."""
        if self._take_free_slot():
            return
        if self.refusing:
            raise self._refused_draining()
        config = self.config
        if len(self._backlog) >= config.backlog_size:
            raise ResourceExhausted(
                f"worker {self.worker_id} is at its concurrency limit ({config.concurrency}) "
                f"and {len(self._backlog)} calls already wait for a slot",
                not_started=True,
            )
        remaining = context.time_remaining()
        wait = (
            config.backlog_timeout if remaining is None else min(remaining, config.backlog_timeout)
        )
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._backlog.append(turn)
        try:
            async with asyncio.timeout(wait):
                await turn  # the slot is handed over by _release, in_flight already counted
        except TimeoutError:
            if _assigned(turn):
                return  # the slot came in the same instant the wait ran out
            raise ResourceExhausted(
                f"worker {self.worker_id} is at its concurrency limit ({config.concurrency}): "
                f"no slot became free within {wait:.3g}s",
                not_started=True,
            ) from None
        except BaseException:
            if _assigned(turn):
                self._release()  # the slot came just as the caller went away: pass it on
            raise
        finally:
            if not turn.done():
                turn.cancel()
                self._backlog.remove(turn)

    def _release(self) -> None:
        """Free a slot, or hand it straight to the oldest waiting call."""
        while self._backlog:
            turn = self._backlog.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self.in_flight -= 1

    def _refused(self, error: Exception) -> None:
        """Count a call turned away before it ran: draining, or no slot (backlog full or timed
        out)."""
        if self.metrics is not None:
            reason = "draining" if isinstance(error, Unavailable) else "at_limit"
            self.metrics.refused.labels(reason).inc()

    def _prepare(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any], call: _Call
    ) -> tuple[ToolDef, dict[str, Any], SessionContext | None]:
        request = decode_request(raw)
        tool = self.tools.get(request.tool_name)
        if tool is None:
            known = ", ".join(sorted(self.tools))
            raise NotFound(f"unknown tool {request.tool_name!r} (tools: {known})")
        kwargs = tool.bind(request.arguments)
        ctx = None
        if tool.context_param is not None:
            ctx = self._session_context(request, context, call)
            kwargs[tool.context_param] = ctx
        return tool, kwargs, ctx

    def _session_context(
        self, request: ToolRequest, context: grpc.aio.ServicerContext[Any, Any], call: _Call
    ) -> SessionContext:
        remaining = context.time_remaining()
        store, key = self._store_for(call, request.session_id)
        headers = ((TICKET_KEY, call.ticket),) if call.ticket else ()
        routed = bool(self.config.router_address)
        return SessionContext(
            session_id=request.session_id,
            store_key=key,
            principal=call.principal.name,
            metadata=request.metadata,
            worker_id=self.worker_id,
            store=store,
            loop=asyncio.get_running_loop(),
            tool_caller=functools.partial(self._call_tool, headers=headers) if routed else None,
            tool_streamer=functools.partial(self._stream_tool, headers=headers) if routed else None,
            deadline=None if remaining is None else time.monotonic() + remaining,
            on_cache=None if self.metrics is None else self.metrics.cache_lookup,
        )

    def _store_for(self, call: _Call, session_id: str) -> tuple[SessionStore | None, str]:
        """The store a call's tools use, and the key of its session there. Through the router,
        store calls carry the call's ticket and the router keys them to its principal; with the
        store at hand (Redis), the worker keys them itself."""
        if not call.ticket:
            return self.store, session_key(call.principal, session_id)
        if self._remote is not None:
            view = self._remote.on_behalf(((TICKET_KEY, call.ticket),))
            return timed_store(view, self.metrics, self.tracer), session_id
        return self.store, session_key(call.principal, session_id)

    def _router(self) -> Any:
        if self._router_client is None:
            from ..client import AsyncClient

            # token="": its calls carry the ticket of the call they serve, never a token
            self._router_client = AsyncClient(
                self.config.router_address, tls=self._router_tls() or False, token=""
            )
        return self._router_client

    async def _call_tool(
        self,
        name: str,
        arguments: dict[str, Any],
        session_id: str,
        timeout: float | None,
        *,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> Any:
        """A pool tool through the router, or else a tool hosted by the session's caller; on
        behalf of the caller of the call it serves (``headers`` carry that call's ticket)."""
        from ..client import ops

        hosted = name not in self.tools
        op = ops.execute(name, arguments, session_id, hosted=hosted)
        return await self._router()._send(dataclasses.replace(op, headers=headers), timeout)

    def _stream_tool(
        self,
        name: str,
        arguments: dict[str, Any],
        session_id: str,
        timeout: float | None,
        *,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> AsyncIterator[Any]:
        from ..client import ops

        hosted = name not in self.tools
        op = dataclasses.replace(
            ops.stream(name, arguments, session_id, hosted=hosted), headers=headers
        )
        stream: AsyncIterator[Any] = self._router()._stream(op, timeout)
        return stream

    async def _begin(self, context: grpc.aio.ServicerContext[Any, Any]) -> _Call:
        """Who calls, admission, the correlation id and the span: a call's bookkeeping before it
        runs (``_end`` undoes it). A refused call is aborted here and never reaches ``_end``.

        Plain methods around a ``try``, not an async context manager: this runs for every call,
        and a generator-based context manager costs more than a small call's own Python work.
        """
        call = _Call()
        if self.verifier is not None:
            try:
                call.principal, call.ticket = self._caller(context)
            except Unauthenticated as exc:
                await abort_with(context, exc, self.worker_id)
        if not self._take_free_slot():  # the common case takes its slot without a coroutine
            try:
                await self._admit(context)
            except Exception as exc:
                self._refused(exc)
                await abort_with(context, exc, self.worker_id)
        call.token = logs.correlation_id.set(_correlation(context))
        call.started = time.perf_counter()
        if self.tracer is not None:
            call.span = self._server_span(context)
        return call

    def _cancelled(self, call: _Call) -> None:
        """A call whose caller went away (or whose stream was closed) mid-run."""
        if call.ctx is not None:
            call.ctx.cancelled = True
        self.failed += 1
        call.code = "CANCELLED"

    async def _failed(
        self, context: grpc.aio.ServicerContext[Any, Any], call: _Call, exc: Exception
    ) -> None:
        """End a call that raised with the status its error maps to (this aborts the call)."""
        self.failed += 1
        error = self._as_error(exc, call)
        call.code = status_of(error).name
        await self._fail(context, error)

    def _end(self, call: _Call) -> None:
        """Free the slot, restore the correlation id, record the outcome; maybe recycle."""
        self._release()
        logs.correlation_id.reset(call.token)
        tool_name = call.tool.name if call.tool is not None else ""
        if self.metrics is not None:
            self.metrics.call_done(tool_name, call.code, call.started)
        if call.span is not None:
            name = f"worker {tool_name or 'call'}"
            tracing.end_server(call.span, call.code, name, {"snakepit.tool": tool_name})
        self._after_call()

    @contextlib.asynccontextmanager
    async def _serving(self, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[_Call]:
        """``_begin`` ... ``_end`` around a streaming call's body."""
        call = await self._begin(context)
        try:
            yield call
            self.served += 1
        except (asyncio.CancelledError, GeneratorExit):
            self._cancelled(call)
            raise
        except Exception as exc:
            await self._failed(context, call, exc)
        finally:
            self._end(call)

    def _server_span(self, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        """The span of one call, made current (its parent came in the call's metadata)."""
        return tracing.start_server(
            self.tracer,
            "worker",
            context.invocation_metadata(),
            {"snakepit.worker_id": self.worker_id},
        )

    def _tool_span(self, tool: ToolDef) -> Any:
        """A span around the tool itself; adapters' own spans nest under it."""
        if self.tracer is None or not tracing.recording():
            return contextlib.nullcontext()
        return self.tracer.start_as_current_span(f"tool {tool.name}")

    async def _execute(self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        started = time.perf_counter()
        call = await self._begin(context)
        try:
            tool, kwargs, call.ctx = self._prepare(raw, context, call)
            call.tool = tool
            if tool.inline and self.tracer is None:  # nothing could interrupt it: no timer
                value: Any = self.runner.call_inline(tool, kwargs)
            else:
                with self._tool_span(tool):
                    value = await self._run(tool, kwargs, context, call)
            try:
                answer = encode_result(
                    value, self.worker_id, (time.perf_counter() - started) * 1000
                )
            except Exception as exc:
                raise Internal(
                    f"tool {tool.name!r} returned a value that cannot be sent: {exc}"
                ) from exc
            self.served += 1
            return answer
        except (asyncio.CancelledError, GeneratorExit):
            self._cancelled(call)
            raise
        except Exception as exc:
            await self._failed(context, call, exc)
            raise AssertionError("unreachable: a failed call is aborted") from exc
        finally:
            self._end(call)

    async def _run(
        self,
        tool: ToolDef,
        kwargs: dict[str, Any],
        context: grpc.aio.ServicerContext[Any, Any],
        call: _Call,
    ) -> Any:
        """A unary call's tool: inline, or under its time limit (a stream's items as a list)."""
        if tool.inline:
            return self.runner.call_inline(tool, kwargs)
        async with asyncio.timeout(self._time_limit(context, tool, call)):
            if tool.streaming:
                return [item async for item in self.runner.stream(tool, kwargs)]
            return await self.runner.call(tool, kwargs)

    async def _execute_stream(
        self, raw: bytes, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        async with self._serving(context) as call:
            tool, kwargs, call.ctx = self._prepare(raw, context, call)
            await context.send_initial_metadata(((WORKER_ID_KEY, self.worker_id),))
            with self._tool_span(tool):
                async with asyncio.timeout(self._time_limit(context, tool, call)):
                    if tool.streaming:
                        seq = 0
                        async for item in self.runner.stream(tool, kwargs):
                            yield encode_chunk(item, seq)
                            seq += 1
                    else:
                        yield encode_chunk(await self.runner.call(tool, kwargs), 0)

    def _time_limit(
        self, context: grpc.aio.ServicerContext[Any, Any], tool: ToolDef, call: _Call
    ) -> float | None:
        """Seconds the call may run: its deadline, capped by ``max_call_seconds``."""
        remaining: float | None = context.time_remaining()
        cap = self.config.max_call_seconds
        call.tool = tool
        if cap and (remaining is None or cap < remaining):
            call.capped = cap
            return cap
        return remaining

    def _as_error(self, exc: BaseException, call: _Call) -> BaseException:
        """The error the caller gets; an overrun sync tool also has its worker replaced."""
        if not isinstance(exc, TimeoutError):
            return exc
        if call.tool is not None and call.capped is not None:
            if not call.tool.is_async and not self.draining:
                # A thread cannot be stopped: the overrunning tool keeps its thread, so this
                # worker is replaced once its other calls finish (and exits without joining it).
                self.overran = True
                self._spawn(self.drain(f"sync tool {call.tool.name!r} overran its time limit"))
            return DeadlineExceeded(
                f"the tool ran longer than this worker's limit of {call.capped:g} s "
                "(--max-call-seconds)"
            )
        return DeadlineExceeded("the call's deadline passed while the tool was running")

    async def _fail(self, context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
        log.warning("call failed", extra={"error": type(exc).__name__, "detail": str(exc)[:1000]})
        await abort_with(context, exc, self.worker_id)


async def _call_hook(hook: Any) -> None:
    """Run an adapter hook: a coroutine on the loop, a plain function in a thread.

    A thread keeps the loop free to answer health checks (NOT_SERVING) while a model loads.
    """
    if asyncio.iscoroutinefunction(hook):
        await hook()
    else:
        await asyncio.get_running_loop().run_in_executor(None, hook)


def _assigned(turn: asyncio.Future[None]) -> bool:
    return turn.done() and not turn.cancelled() and turn.exception() is None


@dataclass(slots=True)
class _Call:
    ctx: SessionContext | None = None
    tool: ToolDef | None = None
    capped: float | None = None  # the server's limit, when it is shorter than the deadline
    principal: Principal = ANONYMOUS
    ticket: str = ""  # the call's pool ticket, which its calls back to the router carry
    code: str = "OK"  # the status it ended with, for the metrics and the span
    started: float = 0.0  # perf_counter when it was admitted
    token: Any = None  # restores the correlation id of the context it came from
    span: Any = None


def _correlation(context: grpc.aio.ServicerContext[Any, Any]) -> str:
    for key, value in context.invocation_metadata() or ():
        if key == CORRELATION_ID_KEY:
            return str(value)
    return ""


def rss_mb() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


async def serve(config: WorkerConfig) -> int:
    """Run a worker until SIGTERM/SIGINT or a recycling limit; return the exit code."""
    logs.setup("worker", config.worker_id or default_worker_id())
    tracing.setup("snakepit-worker")
    worker = WorkerServer(config)
    loop = asyncio.get_running_loop()

    def on_signal(sig: signal.Signals) -> None:
        worker._spawn(worker.drain(sig.name))

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await worker.start()
    except Exception:
        log.exception("worker failed to start")
        return 1
    freeze_startup_heap()
    keep_large_buffers(config.max_message_mb)
    await worker.wait_closed()
    tracing.shutdown()
    if worker.overran:
        # Interpreter exit would join the tool's thread, which may never return.
        logging.shutdown()
        os._exit(0)
    return 0
