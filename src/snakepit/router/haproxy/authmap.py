"""Callers the Python router has verified, for HAProxy to recognise: sha256(header) -> ticket.

HAProxy checks no credential itself: it cannot ask TokenReview or keep a tokens file current,
and a second verifier would be a second place to get it wrong. The gate reports every bearer
credential it accepts (``Gate.on_bearer``); this map gives HAProxy, through its runtime API, the
SHA-256 of that whole ``authorization`` header (never the token itself) and a pool ticket for
its principal. HAProxy sends a tool call whose one ``authorization`` header hashes to an entry
to a worker, with the ticket in place of the header (``config``); every other call goes to the
Python router, which verifies it as on the Python data path, and so adds it here. The whole
header, not a token parsed out of it: two parsers could disagree on what the token is.

Entries are checked again with the gate every ``SWEEP`` seconds (a static token against the
tokens file as it is now, a ServiceAccount token against the TokenReview cache, so at most one
review per cache ttl), dropped when it refuses them or names another principal, and dropped
after ``ENTRY_SECONDS`` in any case (the next call goes through Python and puts them back).
So a revoked credential stops working through HAProxy about one ``SWEEP`` after it stops on
the Python data path, and the ticket in an entry always has over half its life left.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from dataclasses import dataclass

from ...errors import SnakepitError
from ...security.gate import AUTHORIZATION_KEY, Gate
from ...security.identity import Principal
from .runtime import HaproxyError, RuntimeApi

log = logging.getLogger("snakepit.router")

SWEEP = 1.0
ENTRY_SECONDS = 60.0
MAX_ENTRIES = 10_000  # beyond it, new callers stay on the Python data path
RETRY_SECONDS = 0.5
_BATCH = 64  # runtime API commands per connection


def header_key(header: str) -> str:
    """The map key of an ``authorization`` header: what HAProxy computes with
    ``req.fhdr(authorization),sha2(256),hex`` (upper-case hex)."""
    return hashlib.sha256(header.encode()).hexdigest().upper()


@dataclass(frozen=True)
class _Entry:
    key: str
    name: str  # the principal
    ticket: str
    expires: float  # monotonic


class AuthMap:
    def __init__(
        self,
        gate: Gate,
        api: RuntimeApi,
        path: str,
        *,
        entry_seconds: float = ENTRY_SECONDS,
        sweep: float = SWEEP,
    ) -> None:
        if gate.issuer is None:
            raise ValueError("an auth map needs the gate's ticket issuer")
        if entry_seconds >= gate.issuer.lifetime / 2:
            raise ValueError("map entries must expire before their ticket is half used")
        self.gate = gate
        self.issuer = gate.issuer
        self.api = api
        self.path = path
        self.entry_seconds = entry_seconds
        self.sweep = sweep
        self.entries: dict[str, _Entry] = {}  # by authorization header
        self.pushed: dict[str, str] = {}  # what HAProxy's map holds: key -> ticket
        self._dirty = asyncio.Event()
        self._resync = False  # a push failed half way: start again from an empty map
        self._pushing = asyncio.Lock()  # run() and a new HAProxy's set-up both push

    def vouch(self, header: str, principal: Principal) -> None:
        """The gate accepted ``header`` as ``principal`` (called on every such call: cheap)."""
        if header in self.entries or len(self.entries) >= MAX_ENTRIES:
            return
        ticket, _ = self.issuer.ticket_for(principal.name)
        expires = time.monotonic() + self.entry_seconds
        self.entries[header] = _Entry(header_key(header), principal.name, ticket, expires)
        self._dirty.set()

    def reset(self) -> None:
        """HAProxy restarted with an empty map: fill it again."""
        self.pushed.clear()
        self._dirty.set()

    async def run(self) -> None:
        checked = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.sweep)
            self._dirty.clear()
            if time.monotonic() - checked >= self.sweep:
                checked = time.monotonic()
                await self.recheck()
            try:
                await self.push()
            except (OSError, TimeoutError, HaproxyError) as exc:
                log.warning("haproxy auth map not updated", extra={"error": str(exc)})
                await asyncio.sleep(RETRY_SECONDS)
                self._dirty.set()

    async def recheck(self) -> None:
        """Drop the entries that expired or that the gate no longer accepts as the same
        principal."""
        now = time.monotonic()
        for count, (header, entry) in enumerate(list(self.entries.items())):
            keep = now < entry.expires
            if keep:
                try:
                    principal = await self.gate.authenticate(((AUTHORIZATION_KEY, header),))
                    keep = principal.name == entry.name
                except SnakepitError:  # refused, or cannot be checked now (TokenReview down)
                    keep = False
            if not keep and self.entries.get(header) is entry:
                del self.entries[header]
            if count % 100 == 99:
                await asyncio.sleep(0)

    async def push(self) -> None:
        """Make HAProxy's map equal to the entries."""
        async with self._pushing:
            await self._push()

    async def _push(self) -> None:
        if self._resync:
            answer = (await self.api.run(f"clear map {self.path}")).strip()
            if answer:
                raise HaproxyError(answer)
            self.pushed, self._resync = {}, False
        wanted = {entry.key: entry.ticket for entry in list(self.entries.values())}
        commands = [f"del map {self.path} {key}" for key in self.pushed if key not in wanted]
        for key, ticket in wanted.items():
            held = self.pushed.get(key)
            if held is None:
                commands.append(f"add map {self.path} {key} {ticket}")
            elif held != ticket:
                commands.append(f"set map {self.path} {key} {ticket}")
        try:
            for start in range(0, len(commands), _BATCH):
                answer = (await self.api.run(*commands[start : start + _BATCH])).strip()
                if answer:
                    raise HaproxyError(answer)
        except BaseException:
            self._resync = True
            raise
        self.pushed = wanted
