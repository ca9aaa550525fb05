"""TLS material from files, and the gRPC credentials made of it, renewed without a restart.

Servers use ``grpc.dynamic_ssl_server_credentials``: grpc asks ``ServerTls`` before each new
handshake whether the certificate changed, so renewed files (cert-manager, the operator, a
``cp``) take effect on the next connection while the ones already open, and the calls on them,
go on untouched. Channel credentials are fixed once a channel exists, so the processes that keep
long-lived channels (the router to its workers, a worker to its router) ask ``ChannelTls.changed``
now and then and build a new channel beside the old one, which closes once its calls finish.

Files are compared with what was loaded (at most every ``_STAT_INTERVAL`` on a server), and a
certificate is taken only with the key that matches it: a renewal caught between writing the
key and the certificate keeps the previous pair until both are there.

Pool members (the router and the workers) carry a certificate from the pool CA naming
``POOL_NAME``; each checks its peer against that name and CA, so a pod that merely carries the
pool's labels, or a process that registered itself at a pool address, proves nothing.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

log = logging.getLogger("snakepit.tls")

# The name in every pool member's certificate (a SAN), checked by its peers instead of the
# address they dial: pod IPs and loopback ports change, pool membership does not.
POOL_NAME = "pool.snakepit.internal"
# The file names of a Kubernetes TLS Secret (and of what cert-manager writes), used for a
# directory of pool TLS material: ``--pool-tls-dir``.
CERT_FILE, KEY_FILE, CA_FILE = "tls.crt", "tls.key", "ca.crt"
# How often a server compares its files at most (a handshake in between reuses the answer).
_STAT_INTERVAL = 0.5

Stamp = tuple[bytes, ...]


def _stamp(paths: Sequence[str]) -> Stamp:
    """The files' contents: a few KB read at most once a second or so, and exact, where
    size, mtime and inode can all repeat when a file is rewritten within one clock tick."""
    return tuple(Path(path).read_bytes() for path in paths)


def _read(path: str) -> bytes:
    return Path(path).read_bytes()


def matching_pair(cert_pem: bytes, key_pem: bytes) -> bool:
    """Whether the first certificate in ``cert_pem`` is for the private key ``key_pem``."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError:
        return False
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(
        cert.public_key().public_bytes(der, spki) == key.public_key().public_bytes(der, spki)
    )


def _bundle(paths: Sequence[str]) -> bytes:
    return b"\n".join(_read(p).strip() for p in paths) + b"\n"


@dataclass(frozen=True)
class TlsFiles:
    """A process's TLS files: the certificate (chain) it presents, its key, the CA it trusts."""

    cert: str = ""
    key: str = ""
    ca: str = ""

    @classmethod
    def from_dir(cls, directory: str | os.PathLike[str]) -> TlsFiles:
        """The files of a Kubernetes TLS Secret mounted at ``directory``."""
        root = Path(directory)
        return cls(str(root / CERT_FILE), str(root / KEY_FILE), str(root / CA_FILE))

    def check(self) -> None:
        """Raise ValueError naming what is missing or unreadable, before anything listens."""
        if bool(self.cert) != bool(self.key):
            raise ValueError("a TLS certificate needs its key, and a key its certificate")
        for what, path in (("certificate", self.cert), ("key", self.key), ("CA", self.ca)):
            if path and not os.access(path, os.R_OK):
                raise ValueError(f"TLS {what} file {path} does not exist or is not readable")
        if self.cert and not matching_pair(_read(self.cert), _read(self.key)):
            raise ValueError(f"TLS key {self.key} is not the key of certificate {self.cert}")


class ServerTls:
    """Server credentials from a certificate and key, and the client CAs whose certificates it
    requires (none: no client certificate asked for); all reread when they change."""

    def __init__(self, cert: str, key: str, client_cas: Sequence[str] = ()) -> None:
        self.files = TlsFiles(cert, key)
        self.files.check()
        self.client_cas = tuple(client_cas)
        self._paths = (cert, key, *self.client_cas)
        self._lock = threading.Lock()
        self._stamp: Stamp = ()
        self._checked = 0.0
        self.reloads = 0  # how many renewed pairs were taken (tests and logs)
        self._initial = self._load()
        if self._initial is None:
            raise ValueError(f"cannot load TLS certificate {cert} with key {key}")

    def _load(self) -> Any:
        """The configuration of the files as they are now; None if unchanged or inconsistent."""
        try:
            stamp = _stamp(self._paths)
            if stamp == self._stamp:
                return None
            cert, key = _read(self.files.cert), _read(self.files.key)
            roots = _bundle(self.client_cas) if self.client_cas else None
        except OSError as exc:
            log.warning(
                "TLS files unreadable; keeping the previous ones", extra={"error": str(exc)}
            )
            return None
        if not matching_pair(cert, key):
            return None  # caught mid-renewal: the other half comes next
        self._stamp = stamp
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    def _fetch(self) -> Any:
        # Called by grpc before every handshake, on one of its threads.
        now = time.monotonic()
        with self._lock:
            if now - self._checked < _STAT_INTERVAL:
                return None
            self._checked = now
            config = self._load()
            if config is not None:
                self.reloads += 1
                log.info("TLS certificate renewed", extra={"cert": self.files.cert})
            return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._initial, self._fetch, require_client_authentication=bool(self.client_cas)
        )


class ChannelTls:
    """Channel credentials: the CA that must have signed the server (none: the system roots),
    an optional client certificate, and ``server_name`` to check instead of the dialled host."""

    def __init__(
        self, ca: str = "", cert: str = "", key: str = "", *, server_name: str = ""
    ) -> None:
        self.files = TlsFiles(cert, key, ca)
        self.files.check()
        self.server_name = server_name
        self._paths = tuple(p for p in (ca, cert, key) if p)
        self._stamp: Stamp = ()
        self._credentials: grpc.ChannelCredentials | None = None

    @classmethod
    def pool(cls, files: TlsFiles) -> ChannelTls:
        """How one pool member dials another: pool CA, own certificate, the pool's name."""
        return cls(files.ca, files.cert, files.key, server_name=POOL_NAME)

    def for_pool_members(self) -> ChannelTls:
        """The same CA and client certificate, checking the pool's name instead of the dialled
        address: how a direct-mode client dials workers, whose certificates name the pool, not
        their pod addresses."""
        files = self.files
        return ChannelTls(files.ca, files.cert, files.key, server_name=POOL_NAME)

    def changed(self) -> bool:
        """Whether the files differ from those of the last ``credentials()`` (a stat each)."""
        try:
            return _stamp(self._paths) != self._stamp
        except OSError:
            return False  # being replaced; look again later

    def credentials(self) -> grpc.ChannelCredentials:
        if self._credentials is None or self.changed():
            stamp = _stamp(self._paths)
            ca = _read(self.files.ca) if self.files.ca else None
            cert = _read(self.files.cert) if self.files.cert else None
            key = _read(self.files.key) if self.files.key else None
            if cert is not None and key is not None and not matching_pair(cert, key):
                if self._credentials is not None:
                    return self._credentials  # mid-renewal: keep the old pair a moment more
                raise ValueError(f"TLS key {self.files.key} does not match {self.files.cert}")
            self._credentials = grpc.ssl_channel_credentials(ca, key, cert)
            self._stamp = stamp
        return self._credentials

    def options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


ChannelFactory = Callable[..., Any]
# How often a renewing channel looks at its files at most, and how long a replaced channel may
# keep its calls (a watch stream, a long tool call) before it closes anyway.
RENEW_CHECK = 1.0
RENEW_GRACE = 3600.0


class RenewingChannel:
    """A ``grpc.aio`` channel that dials again when its TLS files change or it is ``max_age`` old.

    Each call looks (files at most once per ``RENEW_CHECK``) whether it is time; then new calls
    go on a new channel and the old one closes once its calls have finished. Multicallables
    made from this object stay valid across renewals, so the long-lived clients of a process (a
    worker's store and ``ctx.call_tool`` client, a tool host's stream) need no restart.

    ``max_age``: the caller closes its connection before the server ages it out, so the
    server's close never finds a call on it (client/rotation.py says why that matters). Without
    ``tls`` the channel is plaintext and only ages.
    """

    def __init__(
        self,
        target: str,
        tls: ChannelTls | None,
        options: Sequence[tuple[str, Any]],
        max_age: float | None = None,
    ) -> None:
        self._target = target
        self._tls = tls
        self._options = [*options, *(tls.options() if tls is not None else ())]
        self._max_age = max_age or None
        self._channel = self._dial()
        self._born = self._checked = time.monotonic()
        self.generation = 0
        self._closing: set[asyncio.Task[None]] = set()

    def _dial(self) -> grpc.aio.Channel:
        if self._tls is None:
            return grpc.aio.insecure_channel(self._target, self._options)
        return grpc.aio.secure_channel(self._target, self._tls.credentials(), self._options)

    def current(self) -> grpc.aio.Channel:
        now = time.monotonic()
        aged = self._max_age is not None and now - self._born >= self._max_age
        renewed = False
        if self._tls is not None and (aged or now - self._checked >= RENEW_CHECK):
            self._checked = now
            renewed = self._tls.changed()
        if aged or renewed:
            self._redial(now)
            if renewed:  # also when the age came first: the new channel has the new files
                log.info("TLS files renewed; redialled", extra={"target": self._target})
        return self._channel

    def _redial(self, now: float) -> None:
        old, self._channel = self._channel, self._dial()
        self._born = now
        self.generation += 1
        task = asyncio.get_running_loop().create_task(old.close(grace=RENEW_GRACE))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def unary_unary(self, method: str, *args: Any, **kwargs: Any) -> _Renewing:
        return _Renewing(self, "unary_unary", method, args, kwargs)

    def unary_stream(self, method: str, *args: Any, **kwargs: Any) -> _Renewing:
        return _Renewing(self, "unary_stream", method, args, kwargs)

    def stream_unary(self, method: str, *args: Any, **kwargs: Any) -> _Renewing:
        return _Renewing(self, "stream_unary", method, args, kwargs)

    def stream_stream(self, method: str, *args: Any, **kwargs: Any) -> _Renewing:
        return _Renewing(self, "stream_stream", method, args, kwargs)

    async def close(self, grace: float | None = None) -> None:
        await self._channel.close(grace)
        for task in list(self._closing):
            task.cancel()

    async def channel_ready(self) -> None:
        await self.current().channel_ready()


class _Renewing:
    """A multicallable on the renewing channel's current channel (remade after a renewal)."""

    def __init__(
        self, owner: RenewingChannel, kind: str, method: str, args: Any, kwargs: Any
    ) -> None:
        self._owner = owner
        self._kind = kind
        self._method = method
        self._args = args
        self._kwargs = kwargs
        self._generation = owner.generation
        self._callable = self._make(owner.current())

    def _make(self, channel: grpc.aio.Channel) -> Any:
        return getattr(channel, self._kind)(self._method, *self._args, **self._kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        channel = self._owner.current()
        if self._generation != self._owner.generation:
            self._generation = self._owner.generation
            self._callable = self._make(channel)
        return self._callable(*args, **kwargs)


def channel_factory(tls: ChannelTls | None, *, aio: bool, renew: bool = True) -> ChannelFactory:
    """``factory(target, options=...)``: a plaintext or TLS channel, blocking or asyncio; an
    asyncio TLS channel renews itself (``RenewingChannel``) unless ``renew`` is False (its
    owner redials itself, as the router does for its workers)."""
    if tls is None:
        insecure: ChannelFactory = grpc.aio.insecure_channel if aio else grpc.insecure_channel
        return insecure

    def secure(target: str, *, options: Sequence[tuple[str, Any]] = ()) -> Any:
        if aio and renew:
            return RenewingChannel(target, tls, options)
        module: Any = grpc.aio if aio else grpc
        return module.secure_channel(target, tls.credentials(), options=[*options, *tls.options()])

    return secure


def client_tls(
    ca: str | None = None,
    tls: bool | ChannelTls = False,
    cert: str | None = None,
    key: str | None = None,
) -> ChannelTls | None:
    """A client's TLS from its keywords: ``ca`` (or a client certificate) means TLS with that
    CA, ``tls=True`` TLS with the system roots; none of them, plaintext."""
    if isinstance(tls, ChannelTls):
        return tls
    if not (ca or tls or cert or key):
        return None
    return ChannelTls(ca or "", cert or "", key or "")


# What grpc says when the two ends disagree about TLS or trust (its handshake errors).
_PLAINTEXT_ANSWER = "WRONG_VERSION_NUMBER"
_UNTRUSTED = "CERTIFICATE_VERIFY_FAILED"
# A server that wants a client certificate (grpc closes the handshake; HAProxy, over TLS 1.3,
# sends its "certificate required" alert after the handshake, which grpc reports as a record it
# cannot decrypt: "Unwrap failed").
_CLOSED = ("Socket closed", "Connection reset", "Broken pipe", "handshake failure", "Unwrap failed")
# Words that place such a close in the handshake. Without them grpc saw the connection close
# after it was made: over TLS 1.3 that is also how a refused client certificate looks (the
# server checks it after the client's side of the handshake is done), but so does a connection
# lost while a call ran, and a sentence about certificates alone would hide the latter.
_IN_HANDSHAKE = ("handshake", "Unwrap failed", "failed to connect")
PROBE_TIMEOUT = 2.0


def speaks_tls(target: str, timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the server at HOST:PORT answers a TLS ClientHello (certificate not checked:
    this only asks which protocol it speaks, to explain a failed plaintext connection)."""
    import socket
    import ssl

    host, _, port = target.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, int(port)), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=host or None),
        ):
            return True
    except ssl.SSLError as exc:
        # An alert from the server (e.g. it wants a client certificate) is still TLS.
        return "WRONG_VERSION_NUMBER" not in str(exc) and "record layer" not in str(exc)
    except (OSError, ValueError):
        return False


def explain_connect_failure(details: str, target: str, *, tls: bool) -> str | None:
    """One clear sentence for a connection that failed over TLS (or the lack of it), or None
    when the failure is something else. Probes the server once for a plaintext client."""
    if tls and _PLAINTEXT_ANSWER in details:
        return (
            f"{target} answered in plaintext, but this client uses TLS: the server has no TLS "
            "(start it with --tls-cert/--tls-key), or connect without ca=/tls=/--ca"
        )
    if tls and _UNTRUSTED in details:
        return (
            f"the certificate of {target} is not signed by a CA this client trusts "
            "(ca=/--ca/$SNAKEPIT_TLS_CA names the CA file of the pool)"
        )
    if tls and any(sign in details for sign in _CLOSED):
        if any(sign in details for sign in _IN_HANDSHAKE):
            return (
                f"{target} closed the TLS handshake: it requires a client certificate this "
                "client did not present or it does not trust (cert=/key=, --cert/--key)"
            )
        return (
            f"{target} closed the connection ({details.strip()}): when every call fails so, it "
            "requires a client certificate this client did not present or it does not trust "
            "(cert=/key=, --cert/--key); when only some do, the connection was lost under them"
        )
    if not tls and any(sign in details for sign in _CLOSED) and speaks_tls(target):
        return (
            f"{target} speaks TLS, but this client connects in plaintext: pass ca=CA_FILE "
            "(or tls=True for a publicly trusted certificate; CLI --ca or $SNAKEPIT_TLS_CA)"
        )
    return None
