"""HAProxy's runtime API (the admin ``stats socket``): commands in, text out.

One connection per batch of commands (``;``-separated), as HAProxy closes a non-interactive
session after answering. Used to add, drain and delete worker servers without a reload, and to
read the per-server counters behind ``GetPoolStatus`` and the router's load gauges.
"""

from __future__ import annotations

import asyncio
import csv
import io
import socket
from dataclasses import dataclass


class HaproxyError(Exception):
    """HAProxy refused a command (its answer is the message)."""


@dataclass(frozen=True)
class ServerStats:
    """One line of ``show stat`` for a server: what the pool status reports."""

    name: str
    in_flight: int  # scur: calls on the server now
    queued: int  # qcur: calls waiting for this server
    served: int  # stot: calls sent to it in total
    failed: int  # eresp + econ: calls that failed on the way
    status: str  # UP, DRAIN, MAINT, DOWN, no check


@dataclass(frozen=True)
class BackendStats:
    servers: dict[str, ServerStats]
    queued: int  # in the backend's queue and every server's


class RuntimeApi:
    """``address``: a socket path, or ``abns@NAME`` (Linux abstract socket: no file to leave)."""

    def __init__(self, address: str, timeout: float = 5.0) -> None:
        self.timeout = timeout
        self.retarget(address)

    def retarget(self, address: str) -> None:
        """Talk to the HAProxy at ``address`` from now on (a new one replaced the old)."""
        self.address = address
        if address.startswith("abns@"):
            # HAProxy binds abstract names padded with NULs to the whole sun_path (108 bytes).
            name = "\0" + address.removeprefix("abns@")
            self._path = name + "\0" * (108 - len(name))
        else:
            self._path = address

    async def run(self, *commands: str) -> str:
        """Send commands in one session; HAProxy's whole answer."""
        async with asyncio.timeout(self.timeout):
            reader, writer = await asyncio.open_unix_connection(self._path)
            try:
                writer.write(("; ".join(commands) + "\n").encode())
                await writer.drain()
                return (await reader.read()).decode(errors="replace")
            finally:
                writer.close()

    def run_blocking(self, *commands: str, timeout: float = 1.0) -> str:
        """``run`` for a thread that has no event loop: Prometheus scrapes run in
        prometheus_client's HTTP thread, and reading HAProxy there keeps the router's event
        loop free while the answer is awaited."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(self._path)
            sock.sendall(("; ".join(commands) + "\n").encode())
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")

    async def run_payload(self, command: str, payload: str) -> str:
        """One command with a multi-line payload (``set ssl cert FILE <<``): an empty line ends
        the payload, so the payload's own empty lines are dropped (PEM has none that matter)."""
        lines = [line for line in payload.splitlines() if line.strip()]
        return await self.run(command + " <<\n" + "\n".join(lines) + "\n")

    async def ping(self) -> bool:
        try:
            return "Name: HAProxy" in await self.run("show info")
        except (OSError, TimeoutError):
            return False

    async def backend_stats(self, backend: str) -> BackendStats:
        """Per-server counters of ``backend`` and its own queue (``show stat``, CSV)."""
        return parse_stat(await self.run(stat_command(backend)), backend)

    async def connections_in_use(self, backend: str) -> dict[str, int]:
        """Connections each server of ``backend`` has carrying calls now (``used_cur`` of
        ``show servers conn``; idle ones are not counted)."""
        return parse_servers_conn(await self.run(f"show servers conn {backend}"))


def stat_command(backend: str, *, in_service: bool = False) -> str:
    """``show stat`` of ``backend``'s own row and its servers; ``in_service``: only the servers
    not in maintenance. Of the 1,024 slots (``ring.SERVER_SLOTS``) most are idle in
    maintenance: their rows are 220 KB of CSV and ~25 ms of parsing, the rest a few rows."""
    return f"show stat {backend} 6 -1 no-maint" if in_service else f"show stat {backend} -1 -1"


def parse_stat(text: str, backend: str) -> BackendStats:
    """The answer of ``stat_command(backend)``: its servers' counters and everything queued."""
    servers: dict[str, ServerStats] = {}
    queued = 0
    for row in csv.DictReader(io.StringIO(text.lstrip("# "))):
        if row.get("pxname") != backend or row.get("svname") == "FRONTEND":
            continue
        if row.get("svname") == "BACKEND":
            queued = _int(row.get("qcur"))
            continue
        servers[row["svname"]] = ServerStats(
            name=row["svname"],
            in_flight=_int(row.get("scur")),
            queued=_int(row.get("qcur")),
            served=_int(row.get("stot")),
            failed=_int(row.get("eresp")) + _int(row.get("econ")),
            status=row.get("status", ""),
        )
    return BackendStats(servers, queued + sum(s.queued for s in servers.values()))


def parse_servers_conn(text: str) -> dict[str, int]:
    """``show servers conn``: server name -> used_cur."""
    lines = text.splitlines()
    if not lines or not lines[0].startswith("#"):
        raise HaproxyError(text.strip())
    column = lines[0].lstrip("# ").split().index("used_cur")
    used: dict[str, int] = {}
    for line in lines[1:]:
        fields = line.split()
        if len(fields) > column:
            used[fields[0].rpartition("/")[2]] = _int(fields[column])
    return used


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


def check(answer: str, *, ok: tuple[str, ...] = ("",)) -> str:
    """Raise unless HAProxy's answer is one of the expected ones (stripped)."""
    text = answer.strip()
    if text not in ok and not any(text.startswith(prefix) for prefix in ok if prefix):
        raise HaproxyError(text)
    return text
