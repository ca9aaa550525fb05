"""Tools hosted by callers: the RegisterTool streams this router holds, and calls into them.

An application (any gRPC client) keeps one RegisterTool stream open; on it, it registers tools,
names the sessions it serves, and answers the ``HostCall`` events this router sends. A worker's
tool reaches those tools with ExecuteHostedTool (``ctx.call_tool`` does that when the pool has no
tool of that name): the router looks the call's session up here, sends the request bytes down
the host's stream as they came (never decoded) and returns the host's answer bytes as they came.

Scope: a host's tools are visible to calls in the sessions it serves, and nowhere else, so two
applications may host the same name for their own sessions. A principal the pool allows
(``--allow-pool-tools``) may register a tool *pool-wide*: every call reaches it, with or without
a session, unless the calling session's own host has a tool of that name (it shadows the
pool-wide one for that session only). One pool-wide name belongs to one principal; several hosts
of that principal (replicas of one application) share its calls. A session that is deleted (by any
client, through any replica) or expires stops being served: every ``SWEEP_SECONDS`` the router
asks the store which of its served sessions still exist and tells each host which of its sessions
ended (``session_ended``), so a later session under the same id does not reach the old host.
When several router replicas share a Redis store, the replica holding the stream records
"session -> my address" in the store (``directory``); another replica that gets the call forwards
it there; pool-wide tools are recorded per router in the same store, and a replica without a
host of one forwards to a replica that has one (see docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc

from ..errors import (
    AlreadyExists,
    DeadlineExceeded,
    NotFound,
    SnakepitError,
    Unavailable,
    error_class_for,
)
from ..protocol import pb
from ..protocol.messages import request_tool_name
from ..protocol.status import error_from_rpc, never_started
from ..security.gate import require_pool_tools
from ..security.identity import ANONYMOUS, Principal
from ..security.tls import ChannelTls
from .host_directory import PoolToolEntry

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

    @property
    def pool_wide(self) -> bool:
        return self.spec.pool_wide


class _NotHere(Exception):
    """A replica asked to run a hosted call has no host of that tool (try the next one)."""


class NoHostedTool(NotFound):
    """No host of the tool here (its type name tells a forwarding replica to try the next)."""


class Unreachable(Unavailable):
    """The replica holding a host could not be reached; the call never started there."""


def spec_signature(spec: pb.ToolSpec) -> str:
    """What hosts of one pool-wide name must agree on: its parameters and whether it streams
    (descriptions may differ)."""
    shape = pb.ToolSpec(name=spec.name, parameters=spec.parameters, streaming=spec.streaming)
    return hashlib.sha256(shape.SerializeToString(deterministic=True)).hexdigest()[:32]


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
    principal: Principal = ANONYMOUS

    def send(self, event: pb.ToolHostEvent) -> None:
        if not self.closed:
            self.outbox.put_nowait(event)


class HostRegistry:
    def __init__(
        self,
        spawn: Callable[[Awaitable[Any]], object],
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
        # Pool-wide tools hosted on this router's streams: name -> its hosts (one principal).
        self.pool_wide: dict[str, list[Host]] = {}
        self._claiming: Counter[str] = Counter()  # pool-wide names being claimed in the store
        self._turns = itertools.count()

    # The RegisterTool stream ------------------------------------------------------------------
    async def serve(
        self,
        requests: AsyncIterator[bytes],
        context: Any,
        key_of: Callable[[str], str] = str,
        id_of: Callable[[str], str] = str,
        principal: Principal = ANONYMOUS,
    ) -> AsyncIterator[bytes]:
        """One host's stream; the sessions it names are keyed with ``key_of`` (its principal's
        keys), so a host can only serve its own principal's sessions."""
        host = Host(host_id=uuid.uuid4().hex[:16], key_of=key_of, id_of=id_of, principal=principal)
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
            self._withdraw(host, message.unregister.name)  # idempotent: a replay may repeat it
            ack = pb.HostAck(request_id=message.unregister.request_id, host_id=host.host_id)
            host.send(pb.ToolHostEvent(ack=ack))
        elif kind == "sessions":
            host.send(pb.ToolHostEvent(ack=await self._host_sessions(host, message.sessions)))

    async def _host_sessions(self, host: Host, sessions: pb.HostSessions) -> pb.HostAck:
        """Route the sessions a host names to it, those of its own principal that exist only:
        the rest are NOT_FOUND (told as ``session_ended``), whether another principal has a
        session of that id or nobody does, so existence is never disclosed."""
        ack = pb.HostAck(request_id=sessions.request_id, host_id=host.host_id)
        wanted = [host.key_of(s) for s in sessions.add]
        alive = await self._existing_sessions(wanted) if wanted else set()
        missing = [key for key in wanted if key not in alive]
        add = [key for key in wanted if key in alive]
        released = self._serve_sessions(host, add, [host.key_of(s) for s in sessions.remove])
        if self.directory is not None:  # routed here by every replica before the ack
            await self.directory.update(self.address, add, released)
        if missing:
            for key in missing:
                host.send(pb.ToolHostEvent(session_ended=host.id_of(key)))
            ids = ", ".join(repr(host.id_of(key)) for key in missing[:5])
            ack.code = grpc.StatusCode.NOT_FOUND.value[0]
            ack.message = (
                f"no session {ids} of this caller: a host serves only sessions its own "
                "principal created (and that still exist)"
            )
        return ack

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
        spec.pool_wide = registration.pool_wide
        if spec.pool_wide:
            try:
                await self._claim_pool_wide(host, spec)
            except SnakepitError as exc:
                ack.code = exc.code.value[0]
                ack.message = str(exc)
                return ack
        self._withdraw(host, name)
        if host.closed:  # the stream ended while the store answered: nothing to keep
            self._spawn(self._release_pool_tool(name))
            return ack
        limit = registration.max_concurrency or DEFAULT_HOST_CONCURRENCY
        host.tools[name] = HostedTool(spec, asyncio.Semaphore(limit))
        if spec.pool_wide:
            self.pool_wide.setdefault(name, []).append(host)
        log.info(
            "tool hosted",
            extra={"host": host.host_id, "tool": name, "limit": limit, "pool_wide": spec.pool_wide},
        )
        return ack

    async def _claim_pool_wide(self, host: Host, spec: pb.ToolSpec) -> None:
        """May ``host`` take pool-wide name ``spec.name``? PermissionDenied for a principal the
        pool does not allow; AlreadyExists when another principal hosts the name, or hosts of
        it take other parameters (here or, through the store, on another replica)."""
        name = spec.name
        require_pool_tools(host.principal, name)
        verdict = self._local_verdict(host, spec)
        if verdict == "ok" and self.directory is not None:
            entry = self._pool_entry(host, spec)
            self._claiming[name] += 1
            try:
                verdict = await self.directory.claim_pool_tool(entry)
            finally:
                self._claiming[name] -= 1
                if not self._claiming[name]:
                    del self._claiming[name]
            if verdict == "ok":  # another host of this router may have taken it meanwhile
                verdict = self._local_verdict(host, spec)
        if verdict == "principal":
            raise AlreadyExists(
                f"tool {name!r} is hosted for the whole pool by another principal; a pool-wide "
                "name belongs to one principal (its replicas share the calls)"
            )
        if verdict == "signature":
            raise AlreadyExists(
                f"tool {name!r} is hosted for the whole pool with other parameters; every host "
                "of a pool-wide name must take the same parameters"
            )

    def _local_verdict(self, host: Host, spec: pb.ToolSpec) -> str:
        """``ok``, or why this router's hosts of pool-wide ``spec.name`` refuse ``host``."""
        signature = spec_signature(spec)
        for other in self.pool_wide.get(spec.name, ()):
            if other is host:
                continue
            if other.principal.name != host.principal.name:
                return "principal"
            if spec_signature(other.tools[spec.name].spec) != signature:
                return "signature"
        return "ok"

    def _pool_entry(self, host: Host, spec: pb.ToolSpec) -> PoolToolEntry:
        return PoolToolEntry(
            spec.name,
            self.address,
            host.principal.name,
            spec_signature(spec),
            spec.SerializeToString(),
        )

    def pool_entries(self) -> dict[str, PoolToolEntry]:
        """This router's pool-wide tools, as the store records them (refreshed by the directory)."""
        return {
            name: self._pool_entry(hosts[0], hosts[0].tools[name].spec)
            for name, hosts in self.pool_wide.items()
            if hosts
        }

    def _withdraw(self, host: Host, name: str) -> None:
        """``host`` no longer hosts ``name``; the store forgets a pool-wide name this router
        has no host of any more."""
        tool = host.tools.pop(name, None)
        if tool is None or not tool.pool_wide:
            return
        hosts = self.pool_wide.get(name, [])
        if host in hosts:
            hosts.remove(host)
        if not hosts:
            self.pool_wide.pop(name, None)
            self._spawn(self._release_pool_tool(name))

    async def _release_pool_tool(self, name: str) -> None:
        """Forget this router's store entry of ``name``, unless a host took the name again
        meanwhile (or is claiming it: its entry is the one in the store now)."""
        if self.directory is None or name in self.pool_wide or name in self._claiming:
            return
        await self.directory.release_pool_tool(name, self.address)

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
        for name in list(host.tools):
            self._withdraw(host, name)
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
        """The tools hosted for ``session_id`` by a host on this router, then the pool-wide ones
        hosted here that the session's own do not shadow."""
        host = self.by_session.get(session_id) if session_id else None
        specs = [tool.spec for tool in host.tools.values()] if host is not None else []
        return _merged(specs, self._local_pool_specs())

    def _local_pool_specs(self) -> list[pb.ToolSpec]:
        return [hosts[0].tools[name].spec for name, hosts in self.pool_wide.items() if hosts]

    async def hosted_specs(
        self,
        key: str,
        timeout: float | None,
        session_id: str = "",
        metadata: tuple[tuple[str, Any], ...] = (),
    ) -> list[pb.ToolSpec]:
        """The tools hosted for session key ``key`` (asking the replica holding its host if need
        be, by the caller's ``session_id``, with ``metadata`` saying on whose behalf), then every
        pool-wide tool of every replica that those do not shadow."""
        if self.directory is None:
            return self.specs_for(key)
        specs = self.specs_for(key)
        if key and key not in self.by_session:
            specs = _merged(
                await self._remote_session_specs(key, timeout, session_id, metadata), specs
            )
        remote = [pb.ToolSpec.FromString(entry.spec) for entry in await self.directory.pool_tools()]
        return _merged(specs, remote)

    async def _remote_session_specs(
        self,
        key: str,
        timeout: float | None,
        session_id: str,
        metadata: tuple[tuple[str, Any], ...],
    ) -> list[pb.ToolSpec]:
        assert self.directory is not None
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
        principal: str = "",
    ) -> AsyncIterator[bytes]:
        """The host's answer to one call: a result (unary) or chunks (streaming), as bytes.

        In order: the session's own host (here, else the replica holding it), then a pool-wide
        host (here, else a replica that has one). ``principal`` is told to the host.
        """
        name = request_tool_name(raw)
        forwarded = any(key == FORWARDED_KEY for key, _ in metadata)
        host = self.by_session.get(session_id) if session_id else None
        if host is not None and name in host.tools and not host.closed:
            async for item in self._run(host, host.tools[name], raw, timeout, streaming, principal):
                yield item
            return
        unreachable: Unavailable | None = None
        asked: set[str] = {self.address}
        for stage in ("session", "pool"):
            pool_host = self._pool_host(name) if stage == "pool" else None
            if pool_host is not None:
                tool = pool_host.tools[name]
                async for item in self._run(pool_host, tool, raw, timeout, streaming, principal):
                    yield item
                return
            if forwarded or self.directory is None:
                continue  # a forwarded call never hops twice; one router has no directory
            owners = await self._owners(stage, session_id, name, asked)
            asked.update(owners)
            for owner in owners:
                try:
                    async for item in self._forward(owner, raw, metadata, timeout, streaming, name):
                        yield item
                    return
                except _NotHere:
                    continue
                except Unreachable as exc:  # a router that died; its entries have not expired
                    unreachable = exc
        if unreachable is not None:
            raise unreachable
        where = f"session {session_id!r}" if session_id else "calls without a session"
        raise NoHostedTool(
            f"no tool {name!r}: the pool has none, and no application hosts one for {where} "
            "or for the whole pool"
        )

    async def _owners(self, stage: str, session_id: str, name: str, asked: set[str]) -> list[str]:
        """The replicas to forward to: the one holding the session's host, or (``pool``) those
        holding a host of pool-wide ``name``, in random order (spreading the calls)."""
        assert self.directory is not None
        if stage == "session":
            if not session_id or session_id in self.by_session:
                return []  # no session, or its host is here: no other replica holds it
            owner = await self.directory.locate(session_id)
            return [owner] if owner and owner not in asked else []
        routers = sorted({e.address for e in await self.directory.pool_tools() if e.name == name})
        routers = [r for r in routers if r not in asked]
        return random.sample(routers, len(routers))

    def _pool_host(self, name: str) -> Host | None:
        """One of this router's hosts of pool-wide tool ``name``, taking turns."""
        hosts = [host for host in self.pool_wide.get(name, ()) if not host.closed]
        return hosts[next(self._turns) % len(hosts)] if hosts else None

    async def _run(
        self,
        host: Host,
        tool: HostedTool,
        raw: bytes,
        timeout: float | None,
        streaming: bool,
        principal: str,
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
                                principal=principal,
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
        """Send the call to the router replica that holds a host of it; ``_NotHere`` when that
        replica has none (any more)."""
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
            if error.code == grpc.StatusCode.NOT_FOUND and error.remote_type == "NoHostedTool":
                raise _NotHere from None
            if never_started(error):
                raise Unreachable(
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


def _merged(first: list[pb.ToolSpec], then: list[pb.ToolSpec]) -> list[pb.ToolSpec]:
    """``first``, then the tools of ``then`` whose names ``first`` does not have (shadowing)."""
    names = {spec.name for spec in first}
    merged = list(first)
    for spec in then:
        if spec.name not in names:
            names.add(spec.name)
            merged.append(spec)
    return merged


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
