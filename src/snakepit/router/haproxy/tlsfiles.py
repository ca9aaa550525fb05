"""HAProxy's files (TLS material, the auth map), made from the router's, renewed without a reload.

HAProxy wants a certificate and its key in one PEM file and reads its files only at start. So the
router writes them into a private directory (0700, files 0600) just before HAProxy starts and
removes them once HAProxy answers (it keeps them in memory): no second copy of a key stays on
disk, and a killed router leaves at most an empty directory (with the handover socket), which
the next router on the machine removes (its pid is in the name). Before a restart they are written
again from what HAProxy was last given.

Renewal (``keep_current``): every ``RENEW_CHECK`` seconds the router's files are compared with
what HAProxy holds. A changed certificate, taken only with the key that matches it (a renewal
caught between the two writes waits for the second, as ``security/tls.py`` does), goes in through
the runtime API (``set ssl cert``, then ``commit``): new handshakes use it at once; connections
already open, and the calls on them, go on untouched. A changed CA does not: HAProxy 2.6.12
(Debian 12) crashes on a CA update that follows a certificate update that followed a CA update
(haproxy/haproxy#3165, fixed upstream in 7482b6ebf, October 2025; reproduced here with three
commands), and even before crashing it keeps the certificate of a server whose CA was updated
out of later certificate updates. So a CA change hands over to a new HAProxy process instead
(``HaproxyProcess.replace``): it takes the listening sockets from the old one (``-x``, the
``expose-fd listeners`` socket in this directory), starts with tool calls diverted to the Python
router (the ``divert`` map) until the router has pointed its servers and filled its auth map,
and then the old one stops softly. CA changes are rare (a rotation is three of them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from ...security.tls import TlsFiles, matching_pair
from ...supervisor import sweep_stale_dirs
from .config import DIVERT, HaproxyTls
from .runtime import HaproxyError, RuntimeApi

log = logging.getLogger("snakepit.router")

RENEW_CHECK = 1.0
CERT, CA = "cert", "ca-file"  # the runtime API's names for the two kinds of file
_PREFIX = "snakepit-haproxy-"
ADMIN_SOCKET = "admin.sock"  # the runtime API socket that hands listeners to a new HAProxy


@dataclass(frozen=True)
class _Item:
    name: str  # the file's name in the private directory
    kind: str  # CERT (certificate chain, then its key) or CA
    sources: tuple[str, ...]  # the router's files it is made of


class HaproxyFiles:
    """The files one HAProxy reads: pool TLS (``pool``), the pool port's TLS (``public``) and,
    with ``auth``, the (empty) auth map that ``authmap`` fills at run time."""

    def __init__(self, pool: TlsFiles | None, public: TlsFiles | None, *, auth: bool) -> None:
        items = []
        if pool is not None:
            items += [
                _Item("pool.pem", CERT, (pool.cert, pool.key)),
                _Item("pool-ca.pem", CA, (pool.ca,)),
            ]
        if public is not None:
            items.append(_Item("public.pem", CERT, (public.cert, public.key)))
            if public.ca:
                items.append(_Item("client-ca.pem", CA, (public.ca,)))
        self.items = tuple(items)
        sweep_stale_dirs(_PREFIX)  # of routers that were killed
        self.dir = Path(tempfile.mkdtemp(prefix=f"{_PREFIX}{os.getpid()}-"))
        self.map_path = self.path("auth.map") if auth else ""
        # Only with TLS is there a reason to hand over to a new HAProxy (a CA change).
        self.divert_path = self.path("divert.map") if pool is not None else ""
        self.handover_socket = self.path(ADMIN_SOCKET) if pool is not None else ""
        self.loaded: dict[str, bytes] = {}  # what HAProxy holds, by item name
        self.renewals = 0
        for item in self.items:
            content = self._content(item)
            if content is None:
                self.remove()
                raise ValueError(f"TLS certificate {item.sources[0]} does not match its key")
            self.loaded[item.name] = content

    def path(self, name: str) -> str:
        return str(self.dir / name)

    def tls_spec(self) -> HaproxyTls | None:
        names = {item.name for item in self.items}
        if "pool.pem" not in names:
            return None
        return HaproxyTls(
            pool_pem=self.path("pool.pem"),
            pool_ca=self.path("pool-ca.pem"),
            public_pem=self.path("public.pem") if "public.pem" in names else "",
            client_ca=self.path("client-ca.pem") if "client-ca.pem" in names else "",
        )

    def write(self, *, divert: bool = False) -> None:
        """Put the files where haproxy.cfg names them (just before HAProxy starts); ``divert``:
        the new HAProxy sends every tool call to the Python router until ``undivert``."""
        for name, content in self.loaded.items():
            _write_private(self.dir / name, content)
        if self.map_path:
            _write_private(Path(self.map_path), b"")
        if self.divert_path:
            _write_private(Path(self.divert_path), f"{DIVERT} 1\n".encode() if divert else b"")

    def clear(self) -> None:
        """Remove the files (HAProxy has read them); the handover socket stays."""
        names = [*self.loaded, self.map_path, self.divert_path]
        for name in filter(None, names):
            (self.dir / name).unlink(missing_ok=True)

    async def undivert(self, api: RuntimeApi) -> None:
        answer = (await api.run(f"clear map {self.divert_path}")).strip()
        if answer:
            raise HaproxyError(answer)

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _content(self, item: _Item) -> bytes | None:
        """The file HAProxy should hold now; None while a renewal is half written."""
        try:
            parts = [Path(source).read_bytes() for source in item.sources]
        except OSError:
            return None
        if item.kind == CERT and not matching_pair(parts[0], parts[1]):
            return None
        return b"\n".join(part.strip() for part in parts) + b"\n"

    def changes(self) -> dict[str, bytes]:
        """The files whose content differs from what HAProxy holds (whole pairs only)."""
        changed = {}
        for item in self.items:
            content = self._content(item)
            if content is not None and content != self.loaded.get(item.name):
                changed[item.name] = content
        return changed

    async def refresh(self, api: RuntimeApi, replace: Callable[[], Awaitable[None]]) -> int:
        """Bring HAProxy up to date: certificates through the runtime API; with a changed CA,
        everything at once through ``replace`` (a new HAProxy). How many files were renewed."""
        changed = self.changes()
        kinds = {item.name: item.kind for item in self.items}
        if any(kinds[name] == CA for name in changed):
            previous = dict(self.loaded)
            self.loaded.update(changed)
            try:
                await replace()
            except BaseException:
                self.loaded = previous
                raise
            log.info("haproxy replaced for a new CA", extra={"files": sorted(changed)})
        else:
            for name, content in changed.items():
                await _push(api, self.path(name), content)
                self.loaded[name] = content
                log.info("haproxy TLS file renewed", extra={"file": name})
        self.renewals += len(changed)
        return len(changed)

    async def keep_current(self, api: RuntimeApi, replace: Callable[[], Awaitable[None]]) -> None:
        while True:
            await asyncio.sleep(RENEW_CHECK)
            try:
                await self.refresh(api, replace)
            except (OSError, TimeoutError, RuntimeError, HaproxyError) as exc:
                log.warning("haproxy TLS renewal failed; trying again", extra={"error": str(exc)})


async def _push(api: RuntimeApi, path: str, content: bytes) -> None:
    """One certificate's transaction: ``set``, then ``commit`` (``abort`` if refused)."""
    answer = await api.run_payload(f"set ssl cert {path}", content.decode())
    if "ransaction" not in answer:  # "Transaction created/updated for ..."
        raise HaproxyError(answer.strip())
    answer = await api.run(f"commit ssl cert {path}")
    if "Success" not in answer:
        await api.run(f"abort ssl cert {path}")
        raise HaproxyError(answer.strip())


def _write_private(path: Path, content: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
