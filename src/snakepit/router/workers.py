"""One worker as the router sees it: a channel, its health, and its call accounting.

The router watches each worker's ``grpc.health.v1`` stream: SERVING puts it in the ring,
NOT_SERVING (draining) takes it out while its in-flight calls finish, and a broken stream or
connection marks it unreachable at once. Keepalive pings on the channel catch a worker that
stops answering without closing its connection; grpc then fails the calls in flight on it with
UNAVAILABLE instead of letting them wait for their deadlines.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..grpc_options import channel_options
from ..protocol import method_path
from ..security.tls import ChannelTls, channel_factory

log = logging.getLogger("snakepit.router")

STARTING, READY, DRAINING, UNREACHABLE = "starting", "ready", "draining", "unreachable"
KEEPALIVE_MS = 2000
# A worker that is down is retried at most this often: a starting worker is seen within ~0.25 s
# of its first health answer, and a failed connect costs one SYN.
MAX_RECONNECT_MS = 250
# A channel replaced by one with renewed TLS credentials closes when its calls end, or after this.
RENEW_GRACE = 3600.0


class WorkerHandle:
    def __init__(
        self,
        worker_id: str,
        address: str,
        max_message_mb: int,
        on_state: Callable[[WorkerHandle], None],
        tls: ChannelTls | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.address = address
        self.state = STARTING
        self.in_flight = 0
        self.served = 0
        self.failed = 0
        self.removed = False
        self._on_state = on_state
        self._options = channel_options(
            max_message_mb, keepalive_ms=KEEPALIVE_MS, max_reconnect_ms=MAX_RECONNECT_MS
        )
        self._new_channel = channel_factory(tls, aio=True, renew=False)
        self._connect()
        self._watch_task: asyncio.Task[None] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    def _connect(self) -> None:
        self.channel = self._new_channel(self.address, options=self._options)
        self.execute: Any = self.channel.unary_unary(method_path("ExecuteTool"))
        self.execute_stream: Any = self.channel.unary_stream(method_path("ExecuteStreamingTool"))
        self.list_tools: Any = self.channel.unary_unary(method_path("ListTools"))
        self._health = health_pb2_grpc.HealthStub(self.channel)

    def start(self) -> None:
        self._watch_task = asyncio.get_running_loop().create_task(self._watch())

    def renew(self) -> None:
        """Dial the worker again with renewed TLS credentials: new calls take the new channel
        at once, calls in flight finish on the old one, which then closes. The health watch
        moves over without a state change, so the worker never leaves the ring for it."""
        if self.removed:
            return
        old = self.channel
        self._connect()
        if self._watch_task is not None:
            self._watch_task.cancel()
            self.start()
        task = asyncio.get_running_loop().create_task(old.close(grace=RENEW_GRACE))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    @property
    def ready(self) -> bool:
        return self.state == READY and not self.removed

    def set_state(self, state: str) -> None:
        if state != self.state:
            log.info(
                "worker state",
                extra={"worker": self.worker_id, "address": self.address, "state": state},
            )
            self.state = state
            self._on_state(self)

    async def _watch(self) -> None:
        backoff = 0.05
        request = health_pb2.HealthCheckRequest(service="")
        while not self.removed:
            call = self._health.Watch(request)
            try:
                async for response in call:
                    backoff = 0.05
                    serving = response.status == health_pb2.HealthCheckResponse.SERVING
                    self.set_state(READY if serving else DRAINING)
            except grpc.aio.AioRpcError:
                pass
            except asyncio.CancelledError:
                call.cancel()
                raise
            if self.removed:
                return
            self.set_state(UNREACHABLE)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_RECONNECT_MS / 1000)

    async def close(self, grace: float = 30.0) -> None:
        """Stop watching; close the channel once the calls in flight on it have finished."""
        self.removed = True
        if self._watch_task is not None:
            self._watch_task.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.in_flight and loop.time() < deadline:  # noqa: ASYNC110 - the hot path keeps no Event
            await asyncio.sleep(0.05)
        await self.channel.close()
