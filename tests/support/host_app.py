"""An application process that hosts one tool, for tests that kill it mid-call.

``python -m tests.support.host_app ROUTER SESSION [pool-wide]`` opens SESSION, hosts
``stall(seconds)`` (sleeps, then returns them; for the whole pool with ``pool-wide``) and prints
READY; it runs until killed. ``hosting(...)`` starts one for a test; ``killed_mid_call`` kills it
while a call of ``stall`` runs and returns what that call raised.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

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


@contextlib.contextmanager
def hosting(router: str, session_id: str, *scope: str) -> Iterator[subprocess.Popen[bytes]]:
    """This module as a process of its own, once it hosts ``stall``; killed on exit."""
    from tests.fixtures.processes import child_env

    host = subprocess.Popen(
        [sys.executable, "-m", "tests.support.host_app", router, session_id, *scope],
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    try:
        assert host.stdout is not None and host.stdout.readline().strip() == b"READY"
        yield host
    finally:
        host.kill()
        host.wait()


def killed_mid_call(host: subprocess.Popen[bytes], session: Any) -> BaseException:
    """Kill ``host`` while ``session`` relays a long ``stall`` to it; the call's error, which
    must come well before the call's deadline."""
    outcome: list[BaseException] = []

    def call() -> None:
        try:
            session.execute("relay", tool="stall", arguments={"seconds": 60}, timeout=60)
        except BaseException as exc:
            outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    time.sleep(0.5)  # the call is running in the host
    host.kill()
    caller.join(timeout=10)
    assert not caller.is_alive(), "the call waited for its deadline"
    return outcome[0]


if __name__ == "__main__":
    main(*sys.argv[1:4])
