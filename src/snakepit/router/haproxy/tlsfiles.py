"""HAProxy's files (TLS material, the auth map), made from the router's, renewed without a reload.

HAProxy wants a certificate and its key in one PEM file and reads its files only at start. So the
router writes them into a private directory (0700, files 0600) just before HAProxy starts and
removes them once HAProxy answers (it keeps them in memory): no second copy of a key stays on
disk, and a killed router leaves at most an empty directory. Before a restart they are written
again from what HAProxy was last given.

Renewal (``keep_current``): every ``RENEW_CHECK`` seconds the router's files are compared with
what HAProxy holds; a changed certificate, taken only with the key that matches it (a renewal
caught between the two writes waits for the second, as ``security/tls.py`` does), or a changed
CA goes in through the runtime API (``set ssl cert``/``set ssl ca-file``, then ``commit``). New
handshakes use it at once; connections already open, and the calls on them, go on untouched.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ...security.tls import TlsFiles, matching_pair
from .config import HaproxyTls
from .runtime import HaproxyError, RuntimeApi

log = logging.getLogger("snakepit.router")

RENEW_CHECK = 1.0
CERT, CA = "cert", "ca-file"  # the runtime API's names for the two kinds of file
_PREFIX = "snakepit-haproxy-"


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
        self.dir = Path(tempfile.mkdtemp(prefix=_PREFIX))
        self.map_path = self.path("auth.map") if auth else ""
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

    def write(self) -> None:
        """Put the files where haproxy.cfg names them (just before HAProxy starts)."""
        for name, content in self.loaded.items():
            _write_private(self.dir / name, content)
        if self.map_path:
            _write_private(Path(self.map_path), b"")

    def clear(self) -> None:
        """Remove the files (HAProxy has read them): the directory stays, empty."""
        for entry in self.dir.iterdir():
            entry.unlink(missing_ok=True)

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

    async def refresh(self, api: RuntimeApi) -> int:
        """Push what changed into HAProxy; how many files were renewed."""
        renewed = 0
        for item in self.items:
            content = self._content(item)
            if content is None or content == self.loaded.get(item.name):
                continue
            await _push(api, item.kind, self.path(item.name), content)
            self.loaded[item.name] = content
            renewed += 1
            log.info("haproxy TLS file renewed", extra={"file": item.name})
        self.renewals += renewed
        return renewed

    async def keep_current(self, api: RuntimeApi) -> None:
        while True:
            await asyncio.sleep(RENEW_CHECK)
            try:
                await self.refresh(api)
            except (OSError, TimeoutError, HaproxyError) as exc:
                log.warning("haproxy TLS renewal failed; trying again", extra={"error": str(exc)})


async def _push(api: RuntimeApi, kind: str, path: str, content: bytes) -> None:
    """One file's transaction: ``set``, then ``commit`` (``abort`` if HAProxy refuses it)."""
    answer = await api.run_payload(f"set ssl {kind} {path}", content.decode())
    if "ransaction" not in answer:  # "Transaction created/updated for ..."
        raise HaproxyError(answer.strip())
    answer = await api.run(f"commit ssl {kind} {path}")
    if "Success" not in answer:
        await api.run(f"abort ssl {kind} {path}")
        raise HaproxyError(answer.strip())


def _write_private(path: Path, content: bytes) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "wb") as file:
        file.write(content)
