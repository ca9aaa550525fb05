"""Fault injection for tests: the showcase tools plus tools that kill or stall a worker.

Never the default: a pool runs these only when it names ``snakepit.examples.faults:FaultsAdapter``
(``spec.adapter`` or ``--adapter``), because anyone who can call a tool could then take
workers down. Tests select it to exercise crash recovery and deadlines.
"""

from __future__ import annotations

import asyncio
import os
import signal

from snakepit import tool
from snakepit.examples.showcase import ShowcaseAdapter


class FaultsAdapter(ShowcaseAdapter):
    @tool(description="Sleep for any number of seconds, then return them (no upper bound)")
    async def sleep(self, seconds: float) -> float:
        await asyncio.sleep(seconds)
        return seconds

    @tool(description="Kill this worker process (for fault tests)")
    def crash(self) -> None:
        os.kill(os.getpid(), signal.SIGKILL)
        os._exit(137)  # PID 1 of a container ignores signals, even SIGKILL, sent from inside it
