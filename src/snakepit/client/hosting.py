"""The application's side of caller-hosted tools: one RegisterTool stream to the router.

``client.register_tool(name, fn)`` puts ``fn`` on this stream; the router sends calls down it and
gets the answers back up, so the application needs no inbound port (it works from outside the
cluster, through the router Service, behind NAT). The host is asyncio: ``AsyncClient`` runs it on
its own loop, the blocking ``Client`` on a loop thread of its own (``HostThread``); either way
sync functions run in a thread pool and async ones on the loop, exactly as a worker runs tools
(``ToolRunner``), with the same codec, argument validation and error transport.

The stream is re-opened (with every tool and session registered again) when it breaks, for
example when the router replica holding it stops; calls in flight on the old stream fail
UNAVAILABLE at the router, which is what the calling tool would see of a worker crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import itertools
import logging
import threading
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from ..errors import DeadlineExceeded, Internal, Unavailable, error_class_for
from ..grpc_options import channel_options
from ..protocol import method_path, pb
from ..protocol.messages import decode_request, encode_chunk, encode_result
from ..protocol.status import detail_of, status_of
from ..security.tls import ChannelTls, channel_factory
from ..worker.runner import ToolRunner
from ..worker.tools import ToolDef, ToolOptions, build_tool

log = logging.getLogger("snakepit.client")

T = TypeVar("T")
DEFAULT_CONCURRENCY = 16
MAX_THREADS = 64
REGISTER_TIMEOUT = 30.0
_RECONNECT_MAX = 2.0


@dataclass(eq=False)
class _Hosted:
    tool: ToolDef
    concurrency: int
    request_id: int
    pool_wide: bool = False


@dataclass(frozen=True, slots=True)
class HostedCall:
    """On whose behalf a hosted tool runs: the principal of the calling session (``""`` with
    auth off) and that session's id as the principal knows it (``""``: a call without one).
    The caller's credential never reaches the host."""

    principal: str
    session_id: str


_CURRENT: contextvars.ContextVar[HostedCall | None] = contextvars.ContextVar(
    "snakepit_hosted_call", default=None
)


def hosted_call() -> HostedCall | None:
    """Inside a function this application hosts: who the call is for (None elsewhere).

    A pool-wide tool serves every principal's sessions, so it may use this to decide what the
    call may see; a tool registered for the application's own sessions always sees its own."""
    return _CURRENT.get()


class ToolHost:
    """Tools this application hosts and the sessions it serves, kept registered on one stream."""

    def __init__(
        self,
        target: str,
        *,
        metadata: Iterable[tuple[str, str]] = (),
        max_message_mb: int,
        tls: ChannelTls | None = None,
    ) -> None:
        self.target = target
        self._new_channel = channel_factory(tls, aio=True)
        self._metadata = tuple(metadata)
        self._options = channel_options(max_message_mb, keepalive_ms=10_000)
        self._tools: dict[str, _Hosted] = {}
        self.sessions: set[str] = set()
        self._ids = itertools.count(1)
        self._acks: dict[int, asyncio.Future[pb.HostAck]] = {}
        self._outbox: asyncio.Queue[pb.ToolHostMessage] | None = None
        self._calls: dict[str, asyncio.Task[None]] = {}
        # The router holds each tool to its concurrency; threads start only when needed.
        self._runner = ToolRunner(threads=MAX_THREADS)
        self._unacked: dict[int, pb.ToolHostMessage] = {}
        self._task: asyncio.Task[None] | None = None
        self._channel: grpc.aio.Channel | None = None
        self.host_id = ""

    # Public (coroutines on the host's loop) -------------------------------------------------
    async def register(
        self,
        name: str,
        fn: Callable[..., Any],
        description: str | None,
        concurrency: int | None,
        pool_wide: bool = False,
    ) -> None:
        tool = build_tool(fn, ToolOptions(name=name, description=description))
        if tool.context_param is not None:
            raise TypeError(f"hosted tool {name!r}: a SessionContext is only given to pool tools")
        if name in self._tools:
            raise ValueError(f"this client already hosts a tool named {name!r}")
        hosted = self._tools[name] = _Hosted(
            tool, concurrency or DEFAULT_CONCURRENCY, next(self._ids), pool_wide
        )
        self._ensure_running()
        try:
            await self._request(hosted.request_id, self._registration(hosted))
        except BaseException:
            if self._tools.get(name) is hosted:
                del self._tools[name]
            raise

    async def unregister(self, name: str) -> None:
        if self._tools.pop(name, None) is None:
            return
        request_id = next(self._ids)
        message = pb.ToolHostMessage(
            unregister=pb.ToolUnregistration(request_id=request_id, name=name)
        )
        with contextlib.suppress(Unavailable):  # a stream that is gone has forgotten it anyway
            await self._request(request_id, message)

    async def serve_sessions(self, add: Iterable[str] = (), remove: Iterable[str] = ()) -> None:
        """Route calls in ``add`` to this host (and no longer those in ``remove``)."""
        add, remove = list(add), list(remove)
        self.sessions.update(add)
        self.sessions.difference_update(remove)
        if self._task is None:
            return  # nothing hosted yet: the sessions go with the first registration
        request_id = next(self._ids)
        sessions = pb.HostSessions(request_id=request_id, add=add, remove=remove)
        await self._request(request_id, pb.ToolHostMessage(sessions=sessions))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._channel is not None:
            await self._channel.close()
        self._runner.shutdown()

    # The stream ---------------------------------------------------------------------------
    def _registration(self, hosted: _Hosted) -> pb.ToolHostMessage:
        return pb.ToolHostMessage(
            register=pb.ToolRegistration(
                request_id=hosted.request_id,
                spec=hosted.tool.spec,
                max_concurrency=hosted.concurrency,
                pool_wide=hosted.pool_wide,
            )
        )

    async def _request(self, request_id: int, message: pb.ToolHostMessage) -> None:
        future = self._acks[request_id] = asyncio.get_running_loop().create_future()
        self._unacked[request_id] = message
        try:
            if self._outbox is not None:
                self._outbox.put_nowait(message)
            try:
                ack = await asyncio.wait_for(future, REGISTER_TIMEOUT)
            except TimeoutError:
                raise Unavailable(
                    f"the router at {self.target} did not confirm within {REGISTER_TIMEOUT:g}s"
                ) from None
        finally:
            self._acks.pop(request_id, None)
            self._unacked.pop(request_id, None)
        if ack.code:
            code = next(c for c in grpc.StatusCode if c.value[0] == ack.code)
            raise error_class_for(code)(ack.message, code=code)

    def _ensure_running(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._connect_forever())

    async def _connect_forever(self) -> None:
        self._channel = self._new_channel(self.target, options=self._options)
        open_stream = self._channel.stream_stream(
            method_path("RegisterTool"),
            request_serializer=pb.ToolHostMessage.SerializeToString,
            response_deserializer=pb.ToolHostEvent.FromString,
        )
        backoff = 0.05
        while True:
            self._outbox = outbox = self._replay()
            call = open_stream(metadata=self._metadata)
            writer = asyncio.get_running_loop().create_task(self._write(call, outbox))
            try:
                async for event in call:
                    backoff = 0.05
                    self._on_event(event)
            except grpc.aio.AioRpcError as exc:
                log.info("tool host stream broke", extra={"error": exc.code().name})
            finally:
                self._outbox = None
                writer.cancel()
                call.cancel()
                for task in self._calls.values():
                    task.cancel()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, _RECONNECT_MAX)

    def _replay(self) -> asyncio.Queue[pb.ToolHostMessage]:
        """A fresh stream's first messages: every session, every tool, then what awaits an ack.

        Sessions go first: the router handles a stream's messages in order, so a tool's
        registration is acknowledged only after its sessions are routed here (and named to the
        other replicas through the store). The other way round, ``register_tool`` returned while
        the sessions were still being checked, and a call entering at another replica right
        then was NOT_FOUND (kind e2e, two routers)."""
        outbox: asyncio.Queue[pb.ToolHostMessage] = asyncio.Queue()
        if self.sessions:
            sessions = pb.HostSessions(request_id=next(self._ids), add=sorted(self.sessions))
            outbox.put_nowait(pb.ToolHostMessage(sessions=sessions))
        for hosted in self._tools.values():
            outbox.put_nowait(self._registration(hosted))
        for message in self._unacked.values():
            if message.WhichOneof("kind") != "register":
                outbox.put_nowait(message)
        return outbox

    async def _write(self, call: Any, outbox: asyncio.Queue[pb.ToolHostMessage]) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            while True:
                await call.write(await outbox.get())

    def _on_event(self, event: pb.ToolHostEvent) -> None:
        kind = event.WhichOneof("kind")
        if kind == "call":
            call_id = event.call.call_id
            task = asyncio.get_running_loop().create_task(self._serve(event.call))
            self._calls[call_id] = task
            task.add_done_callback(functools.partial(self._forget_call, call_id))
        elif kind == "cancel":
            running = self._calls.get(event.cancel)
            if running is not None:
                running.cancel()
        elif kind == "session_ended":  # deleted or expired: a new stream must not claim it again
            self.sessions.discard(event.session_ended)
        elif kind == "ack":
            self.host_id = event.ack.host_id or self.host_id
            future = self._acks.get(event.ack.request_id)
            if future is not None and not future.done():
                future.set_result(event.ack)

    def _forget_call(self, call_id: str, _task: object) -> None:
        self._calls.pop(call_id, None)

    async def _serve(self, call: pb.HostCall) -> None:
        """Run one call and send its answer: a result, chunks then ``end``, or an error."""
        reply = self._send_reply
        try:
            request = decode_request(call.request)
            hosted = self._tools.get(request.tool_name)
            if hosted is None:
                raise Unavailable(f"tool {request.tool_name!r} is no longer hosted here")
            tool = hosted.tool
            kwargs = tool.bind(request.arguments)
            _CURRENT.set(HostedCall(call.principal, request.session_id))
            async with asyncio.timeout(call.timeout_seconds or None):
                if call.streaming:
                    seq = 0
                    async for item in self._items(tool, kwargs):
                        reply(pb.HostReply(call_id=call.call_id, chunk=encode_chunk(item, seq)))
                        seq += 1
                    reply(pb.HostReply(call_id=call.call_id, end=True))
                    return
                if tool.streaming:
                    value: Any = [item async for item in self._runner.stream(tool, kwargs)]
                else:
                    value = await self._runner.call(tool, kwargs)
            try:
                result = encode_result(value, self.host_id)
            except Exception as exc:
                raise Internal(
                    f"tool {tool.name!r} returned a value that cannot be sent: {exc}"
                ) from exc
            reply(pb.HostReply(call_id=call.call_id, result=result))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if isinstance(exc, TimeoutError):
                exc = DeadlineExceeded("the call's deadline passed while the hosted tool ran")
            error = pb.HostError(code=status_of(exc).value[0], detail=detail_of(exc, self.host_id))
            reply(pb.HostReply(call_id=call.call_id, error=error))

    async def _items(self, tool: ToolDef, kwargs: dict[str, Any]) -> Any:
        if tool.streaming:
            async for item in self._runner.stream(tool, kwargs):
                yield item
        else:
            yield await self._runner.call(tool, kwargs)

    def _send_reply(self, reply: pb.HostReply) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(pb.ToolHostMessage(reply=reply))


class HostThread:
    """A loop thread for the blocking client's ToolHost; ``run`` waits for a coroutine there."""

    def __init__(self, host: ToolHost) -> None:
        self.host = host
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="snakepit-tool-host", daemon=True
        )
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def close(self) -> None:
        self.run(self.host.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=5)
        self.loop.close()


class HostedTool:
    """A tool this ``Client`` hosts; ``unregister()`` withdraws it."""

    def __init__(self, name: str, thread: HostThread) -> None:
        self.name = name
        self._thread = thread

    def unregister(self) -> None:
        self._thread.run(self._thread.host.unregister(self.name))

    def __repr__(self) -> str:
        return f"HostedTool({self.name!r})"


class AsyncHostedTool:
    """A tool this ``AsyncClient`` hosts; ``await unregister()`` withdraws it."""

    def __init__(self, name: str, host: ToolHost) -> None:
        self.name = name
        self._host = host

    async def unregister(self) -> None:
        await self._host.unregister(self.name)

    def __repr__(self) -> str:
        return f"AsyncHostedTool({self.name!r})"
