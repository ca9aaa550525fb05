"""The asyncio client: ``async with AsyncClient(target) as client: await client.execute(...)``.

Same operations as ``Client`` (they are built by ``ops``); only the transport is grpc.aio.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, TypeVar

import grpc

from .. import tracing
from ..grpc_options import CLIENT_MAX_CONNECTION_AGE, DEFAULT_MAX_MESSAGE_MB
from ..protocol.status import error_from_rpc, never_started
from ..security.tls import ChannelTls, client_tls
from ..store.base import SessionInfo, Variable, VariableChange
from . import ops
from .base import ClientBase, SessionBase
from .direct import DirectRoutes
from .hosting import AsyncHostedTool, ToolHost
from .ops import MISSING, Op, ToolInfo
from .rotation import Lease

T = TypeVar("T")


class AsyncClient(ClientBase[grpc.aio.Channel]):
    def __init__(
        self,
        target: str = "localhost:50051",
        *,
        direct: bool = False,
        timeout: float | None = None,
        metadata: Mapping[str, str] | None = None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        binary_threshold: int | None = None,
        ca: str | None = None,
        tls: bool | ChannelTls = False,
        cert: str | None = None,
        key: str | None = None,
        token: str | None = None,
        max_connection_age: float | None = CLIENT_MAX_CONNECTION_AGE,
    ) -> None:
        super().__init__(
            target,
            aio=True,
            tls=client_tls(ca, tls, cert, key),
            direct=direct,
            timeout=timeout,
            metadata=metadata,
            max_message_mb=max_message_mb,
            binary_threshold=binary_threshold,
            token=token,
            max_connection_age=max_connection_age,
        )
        self._host: ToolHost | None = None
        self._closing: set[asyncio.Task[None]] = set()  # retired router channels closing

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._host is not None:
            await self._host.close()
        for channel in [*self._worker_channels.values(), *self._router.close_all()]:
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    # Pool -----------------------------------------------------------------------------------
    async def ping(self) -> dict[str, Any]:
        return await self._send(ops.ping())

    async def status(self) -> dict[str, Any]:
        return await self._send(ops.pool_status())

    async def routing_table(self) -> dict[str, Any]:
        return ops.table_dict(await self._send(ops.routing_table()))

    async def list_tools(self) -> list[ToolInfo]:
        return await self._send(ops.list_tools())

    # Tools ----------------------------------------------------------------------------------
    async def execute(
        self,
        tool: str,
        /,
        *,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        return await self.call_tool(tool, ops.merge_arguments(args, kwargs), timeout=timeout)

    def stream(
        self,
        tool: str,
        /,
        *,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        return self._stream(
            ops.stream(tool, ops.merge_arguments(args, kwargs), threshold=self.binary_threshold),
            timeout,
        )

    async def call_tool(
        self,
        tool: str,
        arguments: Mapping[str, Any],
        *,
        session_id: str = "",
        timeout: float | None = None,
    ) -> Any:
        return await self._send(
            ops.execute(tool, arguments, session_id, self.binary_threshold), timeout
        )

    async def register_tool(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        description: str | None = None,
        concurrency: int | None = None,
        pool_wide: bool = False,
    ) -> AsyncHostedTool:
        """``Client.register_tool``; the host runs on this event loop."""
        if self._host is None:
            self._host = self._new_tool_host()
        await self._host.register(name, fn, description, concurrency, pool_wide)
        return AsyncHostedTool(name, self._host)

    async def _serve_sessions(self, add: list[str], remove: list[str]) -> None:
        self._own(add, remove)
        if self._host is not None:
            await self._host.serve_sessions(add, remove)

    # Sessions -------------------------------------------------------------------------------
    async def session(
        self,
        session_id: str | None = None,
        *,
        ttl: float | None = None,
        metadata: Mapping[str, str] | None = None,
        keep: bool = False,
    ) -> AsyncSession:
        info = await self._send(ops.initialize_session(session_id, ttl, metadata))
        await self._serve_sessions([info.session_id], [])
        return AsyncSession(self, info.session_id, keep=keep)

    # Transport ------------------------------------------------------------------------------
    async def _call(
        self,
        channel: grpc.aio.Channel,
        op: Op[Any],
        timeout: float | None,
        routes: DirectRoutes | None = None,
    ) -> bytes:
        raw: bytes = await self._stub(channel, op.method, False)(
            op.request, **self._call_args(op, timeout, routes)
        )
        return raw

    async def _send(self, op: Op[T], timeout: float | None = None) -> T:
        if op.is_tool and (tracer := tracing.tracer()) is not None:
            with tracing.client_span(tracer, op.method, op.request):
                return await self._send_once(op, timeout)
        return await self._send_once(op, timeout)

    async def _send_once(self, op: Op[T], timeout: float | None = None) -> T:
        if op.is_tool and self.direct:
            tried: list[str] = []
            while (picked := await self._pick_worker(op, tried)) is not None:
                worker, channel, routes = picked
                try:
                    raw = await self._call(channel, op, timeout, routes)
                except grpc.RpcError as exc:
                    error = error_from_rpc(exc)
                    if not never_started(error):
                        return op.recover(error)
                    self._routes = None
                    continue
                finally:
                    routes.release(worker)
                return op.parse(raw)
        lease = self._open_lease()
        try:
            raw = await self._call(lease.channel, op, timeout)
        except grpc.RpcError as exc:
            return op.recover(await asyncio.to_thread(self._error, exc))
        finally:
            self._close_lease(lease)
        return op.parse(raw)

    def _open_lease(self) -> Lease[grpc.aio.Channel]:
        lease, idle = self._lease()
        self._close_later(idle)
        return lease

    def _close_lease(self, lease: Lease[grpc.aio.Channel]) -> None:
        self._close_later(self._release(lease))

    def _close_later(self, channels: list[grpc.aio.Channel]) -> None:
        """Close retired, idle channels without making the call that noticed wait for it."""
        for channel in channels:
            task = asyncio.get_running_loop().create_task(channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def _stream(self, op: Op[T], timeout: float | None = None) -> AsyncIterator[T]:
        tried: list[str] = []
        while True:
            picked = await self._pick_worker(op, tried) if op.is_tool and self.direct else None
            lease: Lease[grpc.aio.Channel] | None = None
            if picked:
                channel, routes = picked[1], picked[2]
            else:
                lease = self._open_lease()
                channel, routes = lease.channel, None
            call = self._stub(channel, op.method, True)(
                op.request, **self._call_args(op, timeout, routes)
            )
            received = False
            try:
                async for raw in call:
                    received = True
                    yield op.parse(raw)
                return
            except grpc.RpcError as exc:
                address = picked[2].addresses[picked[0]] if picked else None
                error = await asyncio.to_thread(self._error, exc, address)
                if not self._may_stream_elsewhere(picked, received, error):
                    raise error from None
            finally:
                call.cancel()
                if picked:
                    picked[2].release(picked[0])
                if lease is not None:
                    self._close_lease(lease)

    async def _pick_worker(
        self, op: Op[Any], tried: list[str]
    ) -> tuple[str, grpc.aio.Channel, DirectRoutes] | None:
        needs = self._needs_routes(tried)
        if needs is None:
            return None
        if needs:
            self._routes = DirectRoutes(await self._send(ops.routing_table()))
        return self._choose(op, tried)


class AsyncSession(SessionBase[AsyncClient]):
    """``Session`` for ``AsyncClient``: the same methods, as coroutines."""

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if not self.keep:
            await self.close()

    async def close(self) -> bool:
        await self.client._serve_sessions([], [self.id])
        return await self.client._send(ops.cleanup_session(self.id))

    async def info(self) -> SessionInfo:
        return await self.client._send(ops.get_session(self.id))

    async def heartbeat(self) -> SessionInfo:
        return await self.client._send(ops.heartbeat(self.id))

    async def list_tools(self) -> list[ToolInfo]:
        """The pool's tools and those hosted for this session by its caller."""
        return await self.client._send(ops.list_tools(self.id))

    async def execute(
        self,
        tool: str,
        /,
        *,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        return await self.client.call_tool(
            tool, ops.merge_arguments(args, kwargs), session_id=self.id, timeout=timeout
        )

    def stream(
        self,
        tool: str,
        /,
        *,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        op = ops.stream(
            tool, ops.merge_arguments(args, kwargs), self.id, self.client.binary_threshold
        )
        return self.client._stream(op, timeout)

    async def set(
        self,
        name: str,
        value: Any,
        *,
        type: str | None = None,
        constraints: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> Variable:
        return await self.client._send(
            ops.set_variable(self.id, name, value, type, constraints, expected_version)
        )

    async def get(self, name: str, default: Any = MISSING) -> Any:
        return await self.client._send(ops.get_variable(self.id, name, default))

    async def variable(self, name: str) -> Variable:
        return await self.client._send(ops.variable(self.id, name))

    async def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        return await self.client._send(ops.get_variables(self.id, names))

    async def set_many(self, values: Mapping[str, Any]) -> dict[str, Variable]:
        return await self.client._send(ops.set_variables(self.id, values))

    async def list(self) -> dict[str, Any]:
        return await self.client._send(ops.list_variables(self.id))

    async def delete(self, name: str) -> bool:
        return await self.client._send(ops.delete_variable(self.id, name))

    async def increment(self, name: str, by: float = 1) -> Any:
        return await self.client._send(ops.increment(self.id, name, by))

    def watch(
        self, names: Iterable[str] | None = None, *, timeout: float | None = None
    ) -> AsyncIterator[VariableChange]:
        return self.client._stream(ops.watch(self.id, names), timeout)
