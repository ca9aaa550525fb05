"""``snakepit router``: run the router until SIGTERM, then stop taking calls and drain."""

from __future__ import annotations

import asyncio
import signal

from .. import logs
from .server import RouterConfig, RouterServer, default_router_id

__all__ = ["RouterConfig", "serve"]


async def serve(config: RouterConfig, *, drain_grace: float = 10.0) -> int:
    logs.setup("router", config.router_id or default_router_id())
    router = RouterServer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await router.start()
    await stop.wait()
    await router.stop(grace=drain_grace)
    return 0
