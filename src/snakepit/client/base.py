"""What the blocking and the asyncio client share: settings, channels, stubs, direct routing.

Only the transport differs between the two (``grpc`` vs ``grpc.aio`` channels, ``f()`` vs
``await f()``), so everything else lives here once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

import grpc

from .. import tracing
from ..errors import SnakepitError
from ..grpc_options import CLIENT_MAX_CONNECTION_AGE, DEFAULT_MAX_MESSAGE_MB, channel_options
from ..protocol import method_path
from ..protocol.status import ERROR_DETAIL_KEY, error_from_rpc, find_metadata, never_started
from ..security.tls import ChannelTls, channel_factory, explain_connect_failure
from .direct import MAX_ATTEMPTS, DirectRoutes
from .hosting import ToolHost
from .ops import Op
from .rotation import Lease, RotatingChannel

ChannelT = TypeVar("ChannelT")
TOKEN_ENV = "SNAKEPIT_TOKEN"


def credentials(token: str | None) -> tuple[tuple[str, str], ...]:
    """The metadata that proves the caller to a router: ``token``, else ``$SNAKEPIT_TOKEN``
    (``None``), or nothing (``""``, or neither set)."""
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
    token = token.strip()
    return (("authorization", f"Bearer {token}"),) if token else ()


ClientT = TypeVar("ClientT")


class ClientBase(Generic[ChannelT]):
    def __init__(
        self,
        target: str,
        *,
        aio: bool,
        tls: ChannelTls | None,
        direct: bool,
        timeout: float | None,
        metadata: Mapping[str, str] | None,
        max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
        binary_threshold: int | None,
        token: str | None = None,
        max_connection_age: float | None = CLIENT_MAX_CONNECTION_AGE,
    ) -> None:
        self.target = target
        self.direct = direct
        self.timeout = timeout
        self.binary_threshold = binary_threshold
        self.max_message_mb = max_message_mb
        self._metadata = tuple((metadata or {}).items())
        # Sent to the router only; workers (direct mode) get the routing table's ticket instead.
        self._credentials = credentials(token)
        # Sessions opened through this client: the ones its hosted tools serve.
        self._own_sessions: set[str] = set()
        self._options = channel_options(max_message_mb)
        self.tls = tls
        self._new_channel: Callable[..., ChannelT] = channel_factory(tls, aio=aio)
        # Direct mode: workers are dialled by pod address and prove the pool's name.
        self._new_worker_channel: Callable[..., ChannelT] = channel_factory(
            tls.for_pool_members() if tls is not None and tls.files.ca else tls, aio=aio
        )
        # New calls move to a fresh router connection every ``max_connection_age`` seconds,
        # before the router ages the old one out under a call (client/rotation.py).
        self._router: RotatingChannel[ChannelT] = RotatingChannel(
            lambda: self._new_channel(target, options=self._options), max_connection_age
        )
        self._worker_channels: dict[str, ChannelT] = {}
        self._stubs: dict[tuple[int, str, bool], Any] = {}
        self._routes: DirectRoutes | None = None

    def _own(self, add: list[str], remove: list[str]) -> None:
        """Note the sessions opened and closed here: the ones a tool host started later serves."""
        self._own_sessions.update(add)
        self._own_sessions.difference_update(remove)

    def _new_tool_host(self) -> ToolHost:
        host = ToolHost(
            self.target,
            metadata=self._metadata + self._credentials,
            max_message_mb=self.max_message_mb,
            tls=self.tls,
        )
        host.sessions.update(self._own_sessions)
        return host

    def _error(self, exc: grpc.RpcError, target: str | None = None) -> SnakepitError:
        """The call's error; a connection that failed over TLS (or plaintext against TLS) gets
        one sentence saying which end wants what, in place of grpc's handshake text."""
        error = error_from_rpc(exc)
        if error.code != grpc.StatusCode.UNAVAILABLE or _answered(exc):
            return error
        started = not never_started(error)
        explained = explain_connect_failure(
            error.message, target or self.target, tls=self.tls is not None
        )
        if explained is not None:
            error.message = explained
            error.args = (explained,)
            error.not_started = error.not_started or not started
        return error

    def _lease(self) -> tuple[Lease[ChannelT], list[ChannelT]]:
        """The router channel for one call, and retired channels now idle: close them."""
        lease, idle = self._router.acquire()
        return lease, self._forget(idle)

    def _release(self, lease: Lease[ChannelT]) -> list[ChannelT]:
        """End a call on the router channel; what comes back is retired and idle: close it."""
        return self._forget(self._router.release(lease))

    def _forget(self, channels: list[ChannelT]) -> list[ChannelT]:
        """Drop the stubs of channels about to close (a new channel may reuse an ``id``)."""
        for channel in channels:
            for key in list(self._stubs):  # a copy: other threads may add stubs meanwhile
                if key[0] == id(channel):
                    self._stubs.pop(key, None)
        return channels

    def _stub(self, channel: ChannelT, method: str, streaming: bool) -> Any:
        key = (id(channel), method, streaming)
        stub = self._stubs.get(key)
        if stub is None:
            factory = channel.unary_stream if streaming else channel.unary_unary  # type: ignore[attr-defined]
            stub = self._stubs[key] = factory(method_path(method))
        return stub

    def _call_args(
        self, op: Op[Any], timeout: float | None, routes: DirectRoutes | None = None
    ) -> dict[str, Any]:
        """Deadline and metadata of a call to the router, or with ``routes`` to a worker."""
        proof = self._credentials if routes is None else routes.credentials
        metadata = op.metadata(self._metadata + proof)
        if tracing.tracer() is not None:
            metadata += tracing.inject()  # W3C trace context of the current span
        return {"timeout": timeout if timeout is not None else self.timeout, "metadata": metadata}

    def _needs_routes(self, tried: list[str]) -> bool | None:
        """None: stop trying workers directly; True: fetch the routing table first."""
        if len(tried) >= MAX_ATTEMPTS:
            return None
        return self._routes is None or self._routes.stale

    def _may_stream_elsewhere(
        self, picked: tuple[str, Any, DirectRoutes] | None, received: bool, error: SnakepitError
    ) -> bool:
        """A direct-mode stream that a worker turned away before its first item (draining,
        full, unreachable) is tried on the next worker, as a unary call is; once an item has
        arrived the call has started and is never sent again. Through the router, the router
        already does this."""
        if picked is None or received or not never_started(error):
            return False
        self._routes = None  # the table that sent us there is out of date
        return True

    def _choose(self, op: Op[Any], tried: list[str]) -> tuple[str, ChannelT, DirectRoutes] | None:
        """The next worker (and its channel) for a direct tool call; None: use the router."""
        routes = self._routes
        if routes is None:
            return None
        worker = routes.acquire(op.session_id, tried)
        if worker is None:
            return None
        tried.append(worker)
        address = routes.addresses[worker]
        channel = self._worker_channels.get(address)
        if channel is None:
            channel = self._worker_channels[address] = self._new_worker_channel(
                address, options=self._options
            )
        return worker, channel, routes


class SessionBase(Generic[ClientT]):
    """A session's id and its client; leaving the ``with`` block deletes it unless ``keep``."""

    def __init__(self, client: ClientT, session_id: str, *, keep: bool = False) -> None:
        self.client = client
        self.id = session_id
        self.keep = keep

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.id!r})"


def _answered(exc: grpc.RpcError) -> bool:
    """Whether a server (router, worker, HAProxy) sent this status with snakepit's detail: then
    it is that server's word, not grpc's about this client's own connection."""
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    return find_metadata(trailing, ERROR_DETAIL_KEY) is not None
