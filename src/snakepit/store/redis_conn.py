"""Connecting to Redis: URL and password handling, pools, bounded retries and error mapping.

redis-py itself is told not to retry (``Retry(NoBackoff(), 0)``): one retry policy, here, with
exponential backoff and a time budget, so an operation against a server that is down fails
with Unavailable after about ``retry_timeout`` seconds instead of an unbounded nest of
connection-level and command-level retries. Retrying a write is safe because every write script
carries an operation id that Redis remembers (see ``lua.py``), so a write that was applied
before its reply got lost is not applied a second time.
"""

from __future__ import annotations

import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff, NoBackoff

from ..errors import FailedPrecondition, Internal, InvalidArgument, ResourceExhausted, Unavailable

T = TypeVar("T")

PASSWORD_ENV = "SNAKEPIT_STORE_PASSWORD"
SCHEMES = ("redis", "rediss", "unix")
# How long an operation waits for Redis to come back (a restart of the managed Redis pod, which
# on a loaded node took over 15 s). A call with a shorter deadline stops at its deadline: grpc
# cancels its handler. docs/store.md.
DEFAULT_RETRY_TIMEOUT = 60.0
# Query parameters of a store URL that are ours, not redis-py's.
_OWN_PARAMS = ("prefix",)
_AUTH_ERRORS = (rex.AuthenticationError, rex.AuthorizationError, rex.NoPermissionError)
# A TLS handshake that failed on trust or protocol fails the same way every time: no retry.
_TLS_REFUSALS = ("CERTIFICATE_VERIFY_FAILED", "WRONG_VERSION_NUMBER")


def _tls_refused(exc: BaseException) -> bool:
    return isinstance(exc, rex.ConnectionError) and any(s in str(exc) for s in _TLS_REFUSALS)


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where a store URL points, with our own parameters taken out of it."""

    url: str
    where: str
    prefix: str
    password: str | None


def parse_target(url: str, *, password: str | None = None, prefix: str = "sp") -> RedisTarget:
    """Split a store URL; the password is, in order: argument, $SNAKEPIT_STORE_PASSWORD, URL."""
    parts = urlsplit(url)
    if parts.scheme not in SCHEMES:
        raise InvalidArgument(f"not a Redis URL: {url!r} (expected redis://, rediss:// or unix://)")
    query = parse_qsl(parts.query, keep_blank_values=True)
    own = {k: v for k, v in query if k in _OWN_PARAMS}
    rest = [(k, v) for k, v in query if k not in _OWN_PARAMS]
    chosen = password if password is not None else os.environ.get(PASSWORD_ENV) or None
    if parts.scheme == "unix":
        where = f"unix://{parts.path}"
    else:
        where = f"{parts.scheme}://{parts.hostname or 'localhost'}:{parts.port or 6379}"
        if parts.path not in ("", "/"):
            where += parts.path
    parts = parts._replace(query=urlencode(rest))
    if chosen is not None and parts.password is not None:
        # redis-py lets a password in the URL win over the keyword: take it out.
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{user}@{host}" if user else host)
    url = urlunsplit(parts)
    if parts.scheme == "unix" and not url.startswith("unix://"):
        # urlunsplit drops the empty authority ("unix:/path"), which redis-py 8.2 refuses.
        url = "unix://" + url.removeprefix("unix:")
    return RedisTarget(url, where, own.get("prefix", prefix), chosen)


def make_client(
    target: RedisTarget,
    *,
    socket_timeout: float,
    connect_timeout: float,
    max_connections: int | None,
) -> aioredis.Redis:
    """A pooled client. A full pool raises a (retryable) connection error rather than queueing:
    redis-py's blocking pool costs ~15 µs per command, which is a fifth of a round trip."""
    kwargs: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": connect_timeout,
        "socket_keepalive": True,
        "retry": Retry(NoBackoff(), 0),
        "decode_responses": False,
        "client_name": "snakepit-store",
        "max_connections": max_connections,
    }
    if target.password is not None:
        kwargs["password"] = target.password
    return aioredis.Redis(connection_pool=aioredis.ConnectionPool.from_url(target.url, **kwargs))


class Retrier:
    """Runs one Redis operation with backoff until it succeeds or the time budget is spent."""

    def __init__(self, where: str, timeout: float) -> None:
        self.where = where
        self.timeout = timeout
        self._retry = Retry(
            ExponentialBackoff(cap=0.5, base=0.02),
            retries=-1,
            supported_errors=(rex.ConnectionError, rex.TimeoutError),
        )

    async def run(self, op: Callable[[], Awaitable[T]]) -> T:
        try:  # the common case, without the retry machinery
            return await op()
        except _AUTH_ERRORS as exc:
            raise self.translate(exc) from exc
        except (rex.ConnectionError, rex.TimeoutError) as exc:
            if _tls_refused(exc):
                raise self.translate(exc) from exc
        except rex.RedisError as exc:
            raise self.translate(exc) from exc
        started = time.monotonic()
        deadline = started + self.timeout

        def retryable(exc: Exception) -> bool:
            if isinstance(exc, _AUTH_ERRORS) or _tls_refused(exc):
                return False
            return time.monotonic() < deadline

        try:
            return await self._retry.call_with_retry(op, _ignore, is_retryable=retryable)
        except rex.RedisError as exc:
            raise self.translate(exc, time.monotonic() - started) from exc

    def translate(self, exc: rex.RedisError, waited: float = 0.0) -> Exception:
        """The ``snakepit.errors`` exception a caller should see for a Redis failure."""
        if isinstance(exc, _AUTH_ERRORS):
            return FailedPrecondition(
                f"session store {self.where} refused authentication ({exc}); check the password "
                f"in the store URL or ${PASSWORD_ENV}"
            )
        if _tls_refused(exc):
            return FailedPrecondition(
                f"session store {self.where} refused the TLS connection ({exc}); check the CA "
                "it is verified with (ssl_ca_certs= in the store URL) and its certificate"
            )
        if isinstance(exc, rex.MaxConnectionsError):
            return ResourceExhausted(
                f"session store {self.where}: every pooled connection stayed busy for "
                f"{waited:.1f}s ({exc})"
            )
        if isinstance(exc, rex.BusyLoadingError):
            return Unavailable(f"session store {self.where} is still loading its data: {exc}")
        if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
            return Unavailable(
                f"session store {self.where} is unavailable (gave up after {waited:.1f}s): {exc}"
            )
        if isinstance(exc, rex.OutOfMemoryError):
            return ResourceExhausted(f"session store {self.where} is out of memory: {exc}")
        if isinstance(exc, rex.ReadOnlyError):
            return Unavailable(f"session store {self.where} is a read-only replica: {exc}")
        return Internal(f"session store {self.where} failed: {exc}")


async def _ignore(_error: Exception) -> None:
    """redis-py already dropped the broken connection; the next attempt takes a fresh one."""
