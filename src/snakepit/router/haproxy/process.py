"""Run haproxy as a child of the router process: start it, restart it if it dies, stop it gently.

The child is started with a parent-death signal (``setpriv --pdeathsig``), so a SIGKILLed router
leaves no HAProxy holding its port. Stopping is HAProxy's soft stop (SIGUSR1): it closes
its listener, sends GOAWAY to clients and lets the calls in flight finish, bounded by
``hard-stop-after`` in the config.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
from collections.abc import Awaitable, Callable

from .principal_shares import LUA_ACTION
from .runtime import RuntimeApi
from .tlsfiles import HaproxyFiles

log = logging.getLogger("snakepit.router")

HAPROXY_ENV = "SNAKEPIT_HAPROXY"


def haproxy_binary() -> str | None:
    """The haproxy executable: ``$SNAKEPIT_HAPROXY``, else ``haproxy`` on PATH (or sbin)."""
    named = os.environ.get(HAPROXY_ENV)
    if named:
        return named
    return shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")


def _die_with_parent() -> list[str]:
    """A command prefix that arms the parent-death signal in the child.

    Not ``preexec_fn``: running Python between fork and exec in a process with grpc's threads
    can deadlock or abort the child. util-linux's ``setpriv`` (Essential in Debian) does it.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


class HaproxyProcess:
    def __init__(
        self,
        config_text: str,
        api: RuntimeApi,
        *,
        on_restart: Callable[[], None],
        on_exit: Callable[[], None] = lambda: None,
        binary: str | None = None,
        files: HaproxyFiles | None = None,
    ) -> None:
        self.config_text = config_text
        self.api = api
        self.binary = binary or haproxy_binary() or "haproxy"
        self.on_restart = on_restart
        self.on_exit = on_exit  # it died on its own; ``on_restart`` follows once one is back
        self.files = files  # written just before HAProxy starts, removed once it has them
        self.process: asyncio.subprocess.Process | None = None
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._relay: asyncio.Task[None] | None = None

    async def start(self, timeout: float = 10.0) -> None:
        """Start haproxy and return once its runtime API answers."""
        await self._spawn(timeout)
        self._task = asyncio.get_running_loop().create_task(self._supervise())

    async def _spawn(self, timeout: float, *, handover: bool = False) -> None:
        if self.files is not None:
            self.files.write(divert=handover)
        try:
            await self._exec(timeout, handover)
        finally:
            if self.files is not None:
                self.files.clear()

    async def replace(
        self, config_text: str, ready: Callable[[], Awaitable[None]], timeout: float = 10.0
    ) -> None:
        """Hand over to a new HAProxy without dropping a connection or a call (a CA change).

        The new one (``config_text``: a new runtime API address, which ``self.api`` already
        names) takes the old one's listening sockets (``-x``), so no connection attempt finds
        no listener; it starts with tool calls diverted to the Python router; ``ready`` points
        its servers, fills its maps and lifts the diversion; then the old one stops softly
        (its connections get GOAWAY and their calls finish)."""
        old = self.process
        self.config_text = config_text
        await self._spawn(timeout, handover=True)
        try:
            await ready()
        finally:
            if old is not None and old.returncode is None:
                old.send_signal(signal.SIGUSR1)
        log.info("haproxy replaced", extra={"pid": self.process.pid if self.process else None})

    async def _exec(self, timeout: float, handover: bool = False) -> None:
        # The configuration goes in on stdin: nothing on disk for a killed router to leave.
        take = ["-x", self.files.handover_socket] if handover and self.files is not None else []
        self.process = await asyncio.create_subprocess_exec(
            *_die_with_parent(),
            self.binary,
            "-db",
            *take,
            "-f",
            "/dev/stdin",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            # Its own process group: a Ctrl-C in the terminal of `snakepit serve` reaches the
            # router, which stops HAProxy softly after its drain, not HAProxy itself (SIGINT is
            # its hard stop, which cut the calls in flight). The parent-death signal still ends
            # it. Not a session of its own (setsid): with the kernel's autogroups (on by
            # default) that made it a scheduling group of its own beside the workers on a
            # shared machine, woken at once for each packet, and it cost 4-24 % more CPU per
            # call (docs/performance.md, eighth pass).
            process_group=0,
        )
        assert self.process.stdin is not None and self.process.stderr is not None
        self.process.stdin.write(self.config_text.encode())
        self.process.stdin.close()
        self._relay = asyncio.get_running_loop().create_task(_relay(self.process.stderr))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await self.api.ping():
            if self.process.returncode is not None:
                raise RuntimeError(f"haproxy exited with {self.process.returncode} at start-up")
            if loop.time() > deadline:
                self.process.kill()
                raise RuntimeError(f"haproxy did not answer on {self.api.address}")
            await asyncio.sleep(0.02)
        log.info("haproxy running", extra={"pid": self.process.pid})

    async def _supervise(self) -> None:
        backoff = 0.1
        while True:
            process = self.process
            assert process is not None
            code = await process.wait()
            if self._stopping:
                return
            if process is not self.process:
                continue  # replaced by a new one (``replace``): watch that one
            log.error("haproxy exited, restarting", extra={"code": code, "backoff_s": backoff})
            self.on_exit()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)
            try:
                await self._spawn(10.0)
            except RuntimeError as exc:
                log.error("haproxy restart failed", extra={"error": str(exc)})
                continue
            backoff = 0.1
            self.on_restart()

    @property
    def running(self) -> bool:
        """An HAProxy of ours is up (False from its exit until the next one has started)."""
        return self.process is not None and self.process.returncode is None

    async def stop(self, grace: float) -> None:
        """Soft stop: no new connections, calls in flight finish (up to ``grace`` seconds)."""
        self._stopping = True
        process = self.process
        if process is None or process.returncode is not None:
            return
        process.send_signal(signal.SIGUSR1)
        try:
            await asyncio.wait_for(process.wait(), grace)
        except TimeoutError:
            process.kill()
            await process.wait()
        if self._task is not None:
            self._task.cancel()


def log_level(line: str) -> int:
    """The router's log level for a line HAProxy wrote: alerts are errors, but one.

    HAProxy 2.6 reports a Lua action whose stream went away while it slept as "aborting Lua
    processing on expired timeout", an ALERT: a caller that gives up a call waiting for its
    principal's share (``principal_shares``) writes one, as often as it likes. Its waits do
    not time out so (a call waited 20 s in the action and went on)."""
    if "[ALERT]" not in line:
        return logging.INFO
    if f"Lua function '{LUA_ACTION}': aborting" in line:
        return logging.DEBUG
    return logging.ERROR


async def _relay(stream: asyncio.StreamReader) -> None:
    """HAProxy's own messages (server state changes, alerts) into the router's log."""
    async for raw in stream:
        line = raw.decode(errors="replace").rstrip()
        if line:
            log.log(log_level(line), "haproxy: " + line)
