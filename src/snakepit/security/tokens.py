"""Static bearer tokens from a file: one ``PRINCIPAL:TOKEN`` per line, ``#`` starts a comment.

The same format comes from ``snakepit serve --auth-tokens FILE`` and, on Kubernetes, from the
Secret a pool names (mounted as a file, which the kubelet updates in place). The file is read
again when it changes (checked at most every ``recheck`` seconds), so a token is added or revoked
by editing it, without a restart. Tokens are compared with ``hmac.compare_digest`` against every
entry, so the time a lookup takes says nothing about which bytes matched.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from pathlib import Path

from ..errors import InvalidArgument
from .identity import check_principal_name

log = logging.getLogger("snakepit.security")

# Shorter tokens are refused when the file is read: they could be guessed.
MIN_TOKEN_LENGTH = 16


def parse_tokens(text: str, where: str = "tokens file") -> list[tuple[str, bytes]]:
    """The (principal, token) entries of a tokens file; a malformed line is an error that names
    its line number, never its content (it holds a secret)."""
    entries: list[tuple[str, bytes]] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, token = line.partition(":")
        name, token = name.strip(), token.strip()
        if not sep or not token:
            raise InvalidArgument(f"{where} line {number}: expected PRINCIPAL:TOKEN")
        try:
            check_principal_name(name)
        except InvalidArgument as exc:
            raise InvalidArgument(f"{where} line {number}: {exc.message}") from None
        if len(token) < MIN_TOKEN_LENGTH:
            raise InvalidArgument(
                f"{where} line {number}: the token of {name!r} is shorter than "
                f"{MIN_TOKEN_LENGTH} characters"
            )
        entries.append((name, token.encode()))
    return entries


class StaticTokens:
    """The principal a bearer token names, from a tokens file kept current."""

    def __init__(self, path: str | os.PathLike[str], *, recheck: float = 1.0) -> None:
        self.path = Path(path)
        self.recheck = recheck
        self._lock = threading.Lock()
        self._entries: list[tuple[str, bytes]] = []
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._load(initial=True)

    def _stat(self) -> tuple[int, int, int]:
        st = self.path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size

    def _load(self, *, initial: bool = False) -> None:
        """Read the file when it changed. A file that turns unreadable or malformed after start
        keeps the last good entries (logged), so a half-written edit cannot lock everyone out."""
        try:
            stamp = self._stat()
            if stamp == self._stamp:
                return
            entries = parse_tokens(self.path.read_text(), str(self.path))
        except (OSError, InvalidArgument) as exc:
            if initial:
                raise InvalidArgument(f"cannot use tokens file {self.path}: {exc}") from None
            log.warning(
                "tokens file not reloaded", extra={"path": str(self.path), "error": str(exc)}
            )
            return
        self._entries, self._stamp = entries, stamp
        if not initial:
            log.info("tokens file reloaded", extra={"path": str(self.path), "tokens": len(entries)})

    def _fresh(self) -> list[tuple[str, bytes]]:
        now = time.monotonic()
        if now - self._checked >= self.recheck:
            with self._lock:
                if now - self._checked >= self.recheck:
                    self._load()
                    self._checked = now
        return self._entries

    def principal_of(self, token: str) -> str | None:
        """The principal ``token`` belongs to, or None. Every entry is compared, always."""
        given = token.encode()
        found = None
        for name, expected in self._fresh():
            if hmac.compare_digest(given, expected) and found is None:
                found = name
        return found

    def __len__(self) -> int:
        return len(self._fresh())
