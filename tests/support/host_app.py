"""An application process that hosts one tool, for tests that kill it mid-call.

``python -m tests.support.host_app ROUTER SESSION [pool-wide]`` opens SESSION, hosts
``stall(seconds)`` (sleeps, then returns them; for the whole pool with ``pool-wide``) and prints
READY; it runs until killed.
"""

from __future__ import annotations

import sys
import threading
import time

from snakepit import Client


def stall(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def main(router: str, session_id: str, scope: str = "") -> None:
    client = Client(router)
    client.session(session_id, keep=True)
    client.register_tool(
        "stall",
        stall,
        description="Sleep, then return the seconds",
        pool_wide=scope == "pool-wide",
    )
    print("READY", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main(*sys.argv[1:4])
