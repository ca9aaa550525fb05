"""The blocking client: ``with Client("localhost:50051") as client: client.execute("add", a=1, b=2)``."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
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
from .hosting import HostedTool, HostThread
from .ops import MISSING, Op, ToolInfo
from .rotation import Lease

T = TypeVar("T")


class Client(ClientBase[grpc.Channel]):
    """A connection to a pool's router (or, with ``direct=True``, to its workers as well).

    Keyword arguments of ``execute``/``stream`` are the tool's arguments, except ``timeout`` (the
    call's deadline, in seconds); pass colliding names through ``args={...}``.
    """

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
            aio=False,
            tls=client_tls(ca, tls, cert, key),
            direct=direct,
            timeout=timeout,
            metadata=metadata,
            max_message_mb=max_message_mb,
            binary_threshold=binary_threshold,
            token=token,
            max_connection_age=max_connection_age,
        )
        self._host: HostThread | None = None

    # Lifecycle ------------------------------------------------------------------------------
    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._host is not None:
            self._host.close()
        for channel in [*self._worker_channels.values(), *self._router.close_all()]:
            channel.close()

    # Pool -----------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self._send(ops.ping())

    def status(self) -> dict[str, Any]:
        return self._send(ops.pool_status())

    def routing_table(self) -> dict[str, Any]:
        """The router's worker ring, as direct mode uses it."""
        return ops.table_dict(self._send(ops.routing_table()))

    def list_tools(self) -> list[ToolInfo]:
        return self._send(ops.list_tools())

    # Tools ----------------------------------------------------------------------------------
    def execute(
        self,
        tool: str,
        /,
        *,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        return self.call_tool(tool, ops.merge_arguments(args, kwargs), timeout=timeout)

    def stream(
        self,
        tool: str,
        /,
        *,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Iterator[Any]:
        return self._stream(
            ops.stream(tool, ops.merge_arguments(args, kwargs), threshold=self.binary_threshold),
            timeout,
        )

    def call_tool(
        self,
        tool: str,
        arguments: Mapping[str, Any],
        *,
        session_id: str = "",
        timeout: float | None = None,
    ) -> Any:
        """``execute`` with an explicit argument mapping and session."""
        return self._send(ops.execute(tool, arguments, session_id, self.binary_threshold), timeout)

    def register_tool(
        self,
        name: str,
        fn: Callable[..., Any],
        *,
        description: str | None = None,
        concurrency: int | None = None,
        pool_wide: bool = False,
    ) -> HostedTool:
        """Host ``fn`` as tool ``name`` for the tools running in this client's sessions.

        Parameters come from ``fn``'s signature as for a worker's tool; ``concurrency`` bounds
        the calls run at once (more wait at the router, within their deadline). ``pool_wide``:
        for every session of the pool (a grant: ``--allow-pool-tools``, else PermissionDenied);
        a session's own tool of that name shadows it there. ``hosted_call()`` tells ``fn`` on
        whose behalf it runs.
        """
        if self._host is None:
            self._host = HostThread(self._new_tool_host())
        self._host.run(self._host.host.register(name, fn, description, concurrency, pool_wide))
        return HostedTool(name, self._host)

    def _serve_sessions(self, add: list[str], remove: list[str]) -> None:
        self._own(add, remove)
        if self._host is not None:
            self._host.run(self._host.host.serve_sessions(add, remove))

    # Sessions -------------------------------------------------------------------------------
    def session(
        self,
        session_id: str | None = None,
        *,
        ttl: float | None = None,
        metadata: Mapping[str, str] | None = None,
        keep: bool = False,
    ) -> Session:
        """Open (or join) a session; leaving its ``with`` block deletes it unless ``keep``."""
        info = self._send(ops.initialize_session(session_id, ttl, metadata))
        self._serve_sessions([info.session_id], [])
        return Session(self, info.session_id, keep=keep)

    # Transport ------------------------------------------------------------------------------
    def _call(
        self,
        channel: grpc.Channel,
        op: Op[Any],
        timeout: float | None,
        routes: DirectRoutes | None = None,
    ) -> bytes:
        raw: bytes = self._stub(channel, op.method, False)(
            op.request, **self._call_args(op, timeout, routes)
        )
        return raw

    def _send(self, op: Op[T], timeout: float | None = None) -> T:
        if op.is_tool and (tracer := tracing.tracer()) is not None:
            with tracing.client_span(tracer, op.method, op.request):
                return self._send_once(op, timeout)
        return self._send_once(op, timeout)

    def _send_once(self, op: Op[T], timeout: float | None = None) -> T:
        if op.is_tool and self.direct:
            tried: list[str] = []
            while (picked := self._pick_worker(op, tried)) is not None:
                worker, channel, routes = picked
                try:
                    raw = self._call(channel, op, timeout, routes)
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
            raw = self._call(lease.channel, op, timeout)
        except grpc.RpcError as exc:
            return op.recover(self._error(exc))
        finally:
            self._close_lease(lease)
        return op.parse(raw)

    def _open_lease(self) -> Lease[grpc.Channel]:
        lease, idle = self._lease()
        for channel in idle:
            channel.close()
        return lease

    def _close_lease(self, lease: Lease[grpc.Channel]) -> None:
        for channel in self._release(lease):
            channel.close()

    def _stream(self, op: Op[T], timeout: float | None = None) -> Iterator[T]:
        tried: list[str] = []
        while True:
            picked = self._pick_worker(op, tried) if op.is_tool and self.direct else None
            lease: Lease[grpc.Channel] | None = None
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
                for raw in call:
                    received = True
                    yield op.parse(raw)
                return
            except grpc.RpcError as exc:
                address = picked[2].addresses[picked[0]] if picked else None
                error = self._error(exc, address)
                if not self._may_stream_elsewhere(picked, received, error):
                    raise error from None
            finally:
                call.cancel()
                if picked:
                    picked[2].release(picked[0])
                if lease is not None:
                    self._close_lease(lease)

    def _pick_worker(
        self, op: Op[Any], tried: list[str]
    ) -> tuple[str, grpc.Channel, DirectRoutes] | None:
        needs = self._needs_routes(tried)
        if needs is None:
            return None
        if needs:
            self._routes = DirectRoutes(self._send(ops.routing_table()))
        return self._choose(op, tried)


class Session(SessionBase[Client]):
    """A session: typed variables kept in the pool's store, and calls routed with affinity."""

    def __enter__(self) -> Session:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self.keep:
            self.close()

    def close(self) -> bool:
        """Delete the session and its variables from the store."""
        self.client._serve_sessions([], [self.id])
        return self.client._send(ops.cleanup_session(self.id))

    def info(self) -> SessionInfo:
        return self.client._send(ops.get_session(self.id))

    def heartbeat(self) -> SessionInfo:
        return self.client._send(ops.heartbeat(self.id))

    def list_tools(self) -> list[ToolInfo]:
        """The pool's tools and those hosted for this session by its caller."""
        return self.client._send(ops.list_tools(self.id))

    def execute(
        self,
        tool: str,
        /,
        *,
        args: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        return self.client.call_tool(
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
    ) -> Iterator[Any]:
        op = ops.stream(
            tool, ops.merge_arguments(args, kwargs), self.id, self.client.binary_threshold
        )
        return self.client._stream(op, timeout)

    def set(
        self,
        name: str,
        value: Any,
        *,
        type: str | None = None,
        constraints: Mapping[str, Any] | None = None,
        expected_version: int | None = None,
    ) -> Variable:
        return self.client._send(
            ops.set_variable(self.id, name, value, type, constraints, expected_version)
        )

    def get(self, name: str, default: Any = MISSING) -> Any:
        return self.client._send(ops.get_variable(self.id, name, default))

    def variable(self, name: str) -> Variable:
        return self.client._send(ops.variable(self.id, name))

    def get_many(self, names: Iterable[str]) -> dict[str, Any]:
        return self.client._send(ops.get_variables(self.id, names))

    def set_many(self, values: Mapping[str, Any]) -> dict[str, Variable]:
        return self.client._send(ops.set_variables(self.id, values))

    def list(self) -> dict[str, Any]:
        return self.client._send(ops.list_variables(self.id))

    def delete(self, name: str) -> bool:
        return self.client._send(ops.delete_variable(self.id, name))

    def increment(self, name: str, by: float = 1) -> Any:
        return self.client._send(ops.increment(self.id, name, by))

    def watch(
        self, names: Iterable[str] | None = None, *, timeout: float | None = None
    ) -> Iterator[VariableChange]:
        return self.client._stream(ops.watch(self.id, names), timeout)
