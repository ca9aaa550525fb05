"""Tools hosted by callers: the RegisterTool streams this router holds, and calls into them.

An application (any gRPC client) keeps one RegisterTool stream open; on it, it registers tools,
names the sessions it serves, and answers the ``HostCall`` events this router sends. A worker's
tool reaches those tools with ExecuteHostedTool (``ctx.call_tool`` does that when the pool has no
tool of that name): the router looks the call's session up here, sends the request bytes down
the host's stream as they came (never decoded) and returns the host's answer bytes as they came.

Scope: a host's tools are visible to calls in the sessions it serves, and nowhere else, so two
applications may host the same name for their own sessions. A session that is deleted (by any
client, through any replica) or expires stops being served: every ``SWEEP_SECONDS`` the router
asks the store which of its served sessions still exist and tells each host which of its sessions
ended (``session_ended``), so a later session under the same id does not reach the old host.
When several router replicas share a Redis store, the replica holding the stream records
"session -> my address" in the store (``directory``); another replica that gets the call forwards
it there (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from ..errors import DeadlineExceeded, NotFound, SnakepitError, Unavailable, error_class_for
from ..protocol import pb
from ..protocol.messages import request_tool_name
from ..protocol.status import error_from_rpc, never_started
from ..security.tls import ChannelTls

if TYPE_CHECKING:
    from .host_directory import HostDirectory

log = logging.getLogger("snakepit.router")

FORWARDED_KEY = "snakepit-forwarded"
DEFAULT_HOST_CONCURRENCY = 16
# How often the router checks that the sessions it routes to hosts still exist in the store.
SWEEP_SECONDS = 5.0
_END = object()


@dataclass(eq=False)
class HostedTool:
    spec: pb.ToolSpec
    slots: asyncio.Semaphore


@dataclass(eq=False)
class Host:
    """One application's RegisterTool stream, as the router holding it sees it."""

    host_id: str
    tools: dict[str, HostedTool] = field(default_factory=dict)
    sessions: set[str] = field(default_factory=set)
    outbox: asyncio.Queue[pb.ToolHostEvent | None] = field(default_factory=asyncio.Queue)
    calls: dict[str, asyncio.Queue[Any]] = field(default_factory=dict)
    closed: bool = False
    # The store key of a session id this host names: its principal's (security.identity),
    # and back: the id the host knows a key by.
    key_of: Callable[[str], str] = str
    id_of: Callable[[str], str] = str

    def send(self, event: pb.ToolHostEvent) -> None:
        if not self.closed:
            self.outbox.put_nowait(event)


class HostRegistry:
    def __init__(
        self,
        spawn: Callable[[Awaitable[Any]], None],
        pool_tools: Callable[[], Awaitable[set[str] | None]],
        existing_sessions: Callable[[list[str]], Awaitable[set[str]]],
    ) -> None:
        self.address = ""  # HOST:PORT other replicas reach this router at
        # How peers are dialled: their internal port, mutual TLS with the pool CA (None: plain).
        self.tls: ChannelTls | None = None
        self.directory: HostDirectory | None = None
        self.by_session: dict[str, Host] = {}
        self.hosts: dict[str, Host] = {}
        self._spawn = spawn
        self._pool_tools = pool_tools
        self._existing_sessions = existing_sessions
        self._call_ids = itertools.count(1)
        self._peers: dict[str, _Peer] = {}

    # The RegisterTool stream ------------------------------------------------------------------
    async def serve(
        self,
        requests: AsyncIterator[bytes],
        context: Any,
        key_of: Callable[[str], str] = str,
        id_of: Callable[[str], str] = str,
    ) -> AsyncIterator[bytes]:
        """One host's stream; the sessions it names are keyed with ``key_of`` (its principal's
        keys), so a host can only serve its own principal's sessions."""
        host = Host(host_id=uuid.uuid4().hex[:16], key_of=key_of, id_of=id_of)
        self.hosts[host.host_id] = host
        reader = asyncio.get_running_loop().create_task(self._read(host, requests))
        log.info("tool host connected", extra={"host": host.host_id})
        try:
            while (event := await host.outbox.get()) is not None:
                yield event.SerializeToString()
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
            self._drop(host)

    async def _read(self, host: Host, requests: AsyncIterator[bytes]) -> None:
        try:
            async for raw in requests:
                await self._on_message(host, pb.ToolHostMessage.FromString(raw))
        except Exception as exc:  # a broken or garbled stream ends the host, never the router
            log.info("tool host stream ended", extra={"host": host.host_id, "error": repr(exc)})
        finally:
            host.outbox.put_nowait(None)

    async def _on_message(self, host: Host, message: pb.ToolHostMessage) -> None:
        kind = message.WhichOneof("kind")
        if kind == "reply":
            pending = host.calls.get(message.reply.call_id)
            if pending is not None:  # else: the caller gave up already
                pending.put_nowait(message.reply)
        elif kind == "register":
            host.send(pb.ToolHostEvent(ack=await self._register(host, message.register)))
        elif kind == "unregister":
            host.tools.pop(message.unregister.name, None)  # idempotent: a replay may repeat it
            ack = pb.HostAck(request_id=message.unregister.request_id, host_id=host.host_id)
            host.send(pb.ToolHostEvent(ack=ack))
        elif kind == "sessions":
            sessions = message.sessions
            released = self._serve_sessions(
                host,
                [host.key_of(s) for s in sessions.add],
                [host.key_of(s) for s in sessions.remove],
            )
            if self.directory is not None:  # routed here by every replica before the ack
                await self.directory.update(
                    self.address, [host.key_of(s) for s in sessions.add], released
                )
            ack = pb.HostAck(request_id=sessions.request_id, host_id=host.host_id)
            host.send(pb.ToolHostEvent(ack=ack))

    async def _register(self, host: Host, registration: pb.ToolRegistration) -> pb.HostAck:
        ack = pb.HostAck(request_id=registration.request_id, host_id=host.host_id)
        name = registration.spec.name
        problem = ""
        if not name:
            problem = "a hosted tool needs a name"
        elif name in (await self._pool_tools() or ()):
            problem = f"the pool's workers already have a tool named {name!r}"
        if problem:
            ack.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            ack.message = problem
            return ack
        spec = pb.ToolSpec()
        spec.CopyFrom(registration.spec)
        spec.caller_hosted = True
        limit = registration.max_concurrency or DEFAULT_HOST_CONCURRENCY
        host.tools[name] = HostedTool(spec, asyncio.Semaphore(limit))
        log.info("tool hosted", extra={"host": host.host_id, "tool": name, "limit": limit})
        return ack

    def _serve_sessions(self, host: Host, add: Any, remove: Any) -> list[str]:
        """Route ``add`` to ``host``; stop routing ``remove``; return the sessions let go."""
        released = []
        for session_id in remove:
            host.sessions.discard(session_id)
            if self.by_session.get(session_id) is host:
                del self.by_session[session_id]
                released.append(session_id)
        for session_id in add:
            host.sessions.add(session_id)
            self.by_session[session_id] = host  # the latest host of a session wins
        return released

    def _drop(self, host: Host) -> None:
        """The stream ended: forget the host; its calls in flight fail with UNAVAILABLE."""
        host.closed = True
        self.hosts.pop(host.host_id, None)
        gone = self._serve_sessions(host, (), list(host.sessions))
        if self.directory is not None and gone:
            self._spawn(self.directory.update(self.address, (), gone))
        for pending in host.calls.values():
            pending.put_nowait(_END)
        log.info("tool host gone", extra={"host": host.host_id, "calls": len(host.calls)})

    def local_sessions(self) -> list[str]:
        return list(self.by_session)

    async def sweep_forever(self, every: float = SWEEP_SECONDS) -> None:
        """End the hosts' sessions that were deleted or expired, for as long as the router runs."""
        while True:
            await asyncio.sleep(every)
            await self.sweep()

    async def sweep(self) -> list[str]:
        """Stop routing the sessions the store no longer has; tell their hosts; return them."""
        served = list(self.by_session)
        alive = await self._existing_sessions(served) if served else set()
        ended = []
        for session_id in served:
            host = self.by_session.get(session_id)
            if session_id in alive or host is None:  # None: its host let it go meanwhile
                continue
            self._serve_sessions(host, (), [session_id])
            host.send(pb.ToolHostEvent(session_ended=host.id_of(session_id)))
            ended.append(session_id)
        if ended:
            log.info("hosted sessions ended", extra={"sessions": len(ended)})
            if self.directory is not None:
                await self.directory.update(self.address, (), ended)
        return ended

    def specs_for(self, session_id: str) -> list[pb.ToolSpec]:
        """The tools hosted for ``session_id`` by a host on this router."""
        host = self.by_session.get(session_id) if session_id else None
        return [tool.spec for tool in host.tools.values()] if host is not None else []

    async def hosted_specs(
        self,
        key: str,
        timeout: float | None,
        session_id: str = "",
        metadata: tuple[tuple[str, Any], ...] = (),
    ) -> list[pb.ToolSpec]:
        """The tools hosted for session key ``key``, asking the replica holding its host if
        need be (by the caller's ``session_id``, with ``metadata`` saying on whose behalf)."""
        if not key or key in self.by_session or self.directory is None:
            return self.specs_for(key)
        owner = await self.directory.locate(key)
        if not owner or owner == self.address:
            return []
        request = pb.ListToolsRequest(session_id=session_id or key).SerializeToString()
        try:
            raw = await self._peer(owner).list_tools(
                request, timeout=timeout, metadata=(*metadata, (FORWARDED_KEY, "1"))
            )
        except grpc.aio.AioRpcError:
            return []  # a listing leaves out what it cannot reach; a call would say why
        return list(pb.ListToolsResponse.FromString(raw).tools)

    # Calls ------------------------------------------------------------------------------------
    async def call(
        self,
        raw: bytes,
        session_id: str,
        metadata: tuple[tuple[str, Any], ...],
        timeout: float | None,
        streaming: bool,
    ) -> AsyncIterator[bytes]:
        """The host's answer to one call: a result (unary) or chunks (streaming), as bytes."""
        name = request_tool_name(raw)
        host = self.by_session.get(session_id) if session_id else None
        if host is not None and name in host.tools and not host.closed:
            async for item in self._run(host, host.tools[name], raw, timeout, streaming):
                yield item
            return
        forwarded = any(key == FORWARDED_KEY for key, _ in metadata)
        if not forwarded and session_id and self.directory is not None:
            owner = await self.directory.locate(session_id)
            if owner and owner != self.address:
                async for item in self._forward(owner, raw, metadata, timeout, streaming, name):
                    yield item
                return
        where = f"session {session_id!r}" if session_id else "calls without a session"
        raise NotFound(
            f"no tool {name!r}: the pool has none, and no application hosts one for {where}"
        )

    async def _run(
        self, host: Host, tool: HostedTool, raw: bytes, timeout: float | None, streaming: bool
    ) -> AsyncIterator[bytes]:
        name = tool.spec.name
        call_id = str(next(self._call_ids))
        replies: asyncio.Queue[Any] = asyncio.Queue()
        done = False
        try:
            async with asyncio.timeout(timeout):
                async with tool.slots:
                    if host.closed:
                        raise Unavailable(f"the application hosting tool {name!r} went away")
                    host.calls[call_id] = replies
                    host.send(
                        pb.ToolHostEvent(
                            call=pb.HostCall(
                                call_id=call_id,
                                request=raw,
                                timeout_seconds=timeout or 0.0,
                                streaming=streaming,
                            )
                        )
                    )
                    while True:
                        reply = await replies.get()
                        if reply is _END:
                            raise Unavailable(
                                f"the application hosting tool {name!r} went away during the call"
                            )
                        body = reply.WhichOneof("body")
                        if body == "error":
                            done = True
                            raise host_error(reply.error)
                        if body == "end":
                            done = True
                            return
                        if body == "result":
                            done = True
                            yield reply.result
                            return
                        yield reply.chunk
        except TimeoutError:
            raise DeadlineExceeded(
                f"tool {name!r} hosted by the caller did not answer within the deadline"
            ) from None
        finally:
            host.calls.pop(call_id, None)
            if not done:
                host.send(pb.ToolHostEvent(cancel=call_id))

    async def _forward(
        self,
        owner: str,
        raw: bytes,
        metadata: tuple[tuple[str, Any], ...],
        timeout: float | None,
        streaming: bool,
        name: str,
    ) -> AsyncIterator[bytes]:
        """Send the call to the router replica that holds the host's stream."""
        peer = self._peer(owner)
        headers = (*metadata, (FORWARDED_KEY, "1"))
        try:
            if streaming:
                async for chunk in peer.stream(raw, timeout=timeout, metadata=headers):
                    yield chunk
            else:
                yield await peer.unary(raw, timeout=timeout, metadata=headers)
        except grpc.aio.AioRpcError as exc:
            error = error_from_rpc(exc)
            if never_started(error):
                raise Unavailable(
                    f"tool {name!r}: the router holding its host's stream ({owner}) "
                    f"cannot be reached: {error.message}"
                ) from None
            raise error from None

    def _peer(self, address: str) -> _Peer:
        peer = self._peers.get(address)
        if peer is None:
            peer = self._peers[address] = _Peer(address, self.tls)
        return peer

    async def close(self, grace: float) -> None:
        """End every host's stream once its calls in flight are answered (or ``grace`` passes).

        The hosts open a new stream at once, through the Service, to a replica that stays.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while any(host.calls for host in self.hosts.values()) and loop.time() < deadline:  # noqa: ASYNC110 - a rare path
            await asyncio.sleep(0.05)
        for host in list(self.hosts.values()):
            host.outbox.put_nowait(None)

    async def close_peers(self) -> None:
        for peer in self._peers.values():
            await peer.channel.close()


class _Peer:
    """Another router replica, for the calls and listings forwarded to it."""

    def __init__(self, address: str, tls: ChannelTls | None) -> None:
        from ..grpc_options import channel_options
        from ..protocol import method_path
        from ..security.tls import channel_factory

        self.channel = channel_factory(tls, aio=True)(address, options=channel_options())
        self.unary = self.channel.unary_unary(method_path("ExecuteHostedTool"))
        self.stream = self.channel.unary_stream(method_path("ExecuteHostedStreamingTool"))
        self.list_tools = self.channel.unary_unary(method_path("ListTools"))


def host_error(error: pb.HostError) -> SnakepitError:
    """The exception a host reported, with its status code, type, message and traceback."""
    code = next((c for c in grpc.StatusCode if c.value[0] == error.code), grpc.StatusCode.UNKNOWN)
    detail = error.detail
    return error_class_for(code, from_tool=bool(detail.traceback))(
        detail.message or code.name,
        remote_type=detail.type or None,
        remote_traceback=detail.traceback or None,
        worker_id=detail.worker_id or None,
        code=code,
    )
