"""``snakepit router``: run the router until SIGTERM, then leave the Service and drain.

On SIGTERM the router first reports NOT_SERVING but keeps answering for ``shutdown_delay``
seconds: Kubernetes removes a terminating pod from its Service's endpoints asynchronously, and
connections that still arrive in that window must not be refused. The delay also outlasts the
maximum connection age, so every client has been sent GOAWAY and moved its new calls to another
replica: stopping the server while a client still sends on its connection would cancel the calls
grpc had received but not yet handed to a handler (grpc/grpc#41785). Then it stops taking calls
and lets the ones in flight finish (``drain_grace``).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from .. import logs, tracing
from ..heap import freeze_startup_heap, keep_large_buffers
from .dataplane import make_router
from .server import RouterConfig, default_router_id

__all__ = ["RouterConfig", "serve"]

log = logging.getLogger("snakepit.router")


async def serve(
    config: RouterConfig, *, shutdown_delay: float = 6.0, drain_grace: float = 5.0
) -> int:
    logs.setup("router", config.router_id or default_router_id())
    tracing.setup("snakepit-router")
    router, data_path = make_router(config)
    log.info(data_path)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await router.start()
    freeze_startup_heap()
    keep_large_buffers(config.max_message_mb)
    await stop.wait()
    log.info(
        "router leaving", extra={"delay_s": shutdown_delay, "in_flight": router.pool.in_flight}
    )
    await router.health.enter_graceful_shutdown()
    await asyncio.sleep(shutdown_delay)
    await router.stop(grace=drain_grace)
    tracing.shutdown()
    return 0
