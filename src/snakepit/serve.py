"""``snakepit serve``: a whole pool on one machine (router + N worker processes + a store).

This is the embedded default: the router runs in this process with its session store (memory by
default), workers are supervised child processes that reach the store through the router. The
pool counts as ready only when every worker has answered a health check.

With an autoscaling policy (``--max-workers``) the number of worker processes follows the
router's load (``snakepit.autoscale``): the same policy the operator applies to worker pods, so
it is exercised here in seconds, on one machine.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from . import logs, tracing
from .autoscale.loop import Round, ScaleLoop
from .autoscale.policy import Decision, Policy, Sample
from .errors import SnakepitError
from .grpc_options import DEFAULT_MAX_MESSAGE_MB
from .heap import freeze_startup_heap, keep_large_buffers
from .router.dataplane import make_router
from .router.discovery import StaticDiscovery
from .router.pool import PoolConfig
from .router.server import RouterConfig, RouterServer
from .router.shares import DEFAULT_STORE_CALL_RATE_PER_PRINCIPAL, DEFAULT_STORE_CALLS_PER_PRINCIPAL
from .security.gate import AuthConfig
from .security.localca import LocalCA, write_file, write_issued
from .security.tickets import public_key_text
from .security.tls import CA_FILE, CERT_FILE, KEY_FILE, POOL_NAME, TlsFiles
from .store.base import DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_TTL
from .store.limits import StoreLimits
from .store.offload import DEFAULT_HELPERS
from .supervisor import RestartPolicy, WorkerSlot, free_port, sweep_stale_dirs
from .worker.server import DEFAULT_ADAPTER, DEFAULT_MAX_CALL_SECONDS

log = logging.getLogger("snakepit.serve")


POOL_TLS_PREFIX = "snakepit-pool-tls-"
# serve's pool certificate is short-lived and renewed, while serve runs, at a third of its life.
POOL_CERT_VALIDITY = datetime.timedelta(days=3)


class PoolCA:
    """The pool CA of one ``serve``: made at start in a private temporary directory, it signs
    the one certificate the router and the workers prove pool membership with (they share a
    machine, so one key serves them all); the directory goes when the pool stops.

    A serve killed with SIGKILL cannot remove its directory, so each new one removes those of
    dead serve processes (their pid is in the name) before making its own.
    """

    def __init__(
        self, ca: LocalCA | None = None, validity: datetime.timedelta = POOL_CERT_VALIDITY
    ) -> None:
        sweep_stale_pool_dirs()
        # mode 0700
        self.dir = Path(tempfile.mkdtemp(prefix=f"{POOL_TLS_PREFIX}{os.getpid()}-"))
        self.ca = ca or LocalCA.generate("snakepit serve pool CA")
        self.validity = validity
        write_file(self.dir / CA_FILE, self.ca.cert_pem)
        self.renew()
        self.files = TlsFiles.from_dir(self.dir)

    def renew(self) -> None:
        """A fresh pool certificate in place of the old one (processes pick it up live)."""
        issued = self.ca.issue(
            POOL_NAME, [POOL_NAME, "localhost", "127.0.0.1"], valid_for=self.validity
        )
        write_issued(issued, self.dir / CERT_FILE, self.dir / KEY_FILE)

    async def keep_renewed(self) -> None:
        while True:
            await asyncio.sleep(self.validity.total_seconds() / 3)
            self.renew()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def sweep_stale_pool_dirs() -> None:
    """Remove this user's pool TLS directories whose serve process is gone."""
    sweep_stale_dirs(POOL_TLS_PREFIX)


@dataclass
class ServeConfig:
    adapter: str = DEFAULT_ADAPTER
    workers: int = 2
    host: str = "127.0.0.1"
    port: int = 50051
    store: str = "memory"
    session_ttl: float = DEFAULT_SESSION_TTL
    max_sessions: int = DEFAULT_MAX_SESSIONS
    pool: PoolConfig = field(default_factory=PoolConfig)
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB
    limits: StoreLimits = field(default_factory=StoreLimits)
    value_helpers: int = DEFAULT_HELPERS
    max_store_calls_per_principal: int = DEFAULT_STORE_CALLS_PER_PRINCIPAL
    store_call_rate_per_principal: float = DEFAULT_STORE_CALL_RATE_PER_PRINCIPAL
    max_call_seconds: float = DEFAULT_MAX_CALL_SECONDS
    worker_args: list[str] = field(default_factory=list)
    startup_timeout: float = 60.0
    drain_timeout: float = 10.0
    restart: RestartPolicy = field(default_factory=RestartPolicy)
    quiet: bool = False
    # The router's Prometheus port (0: any free port); workers then serve theirs on free ports,
    # listed by `snakepit status`. None: no metrics at all.
    metrics_port: int | None = None
    data_path: str = "auto"  # router/dataplane.py
    # Autoscaling: None keeps ``workers`` processes; a policy starts ``min_replicas`` of them.
    autoscale: Policy | None = None
    scale_period: float = 0.5
    # TLS on the pool port (``cert``/``key``; ``ca``: require client certificates it signed).
    # The pool's own hops then use mutual TLS with certificates from ``pool_ca`` (default a
    # throwaway CA): a client that trusts it can call workers directly (``--tls-generate``
    # passes the CA it generated, so its ca.pem is all a direct-mode client needs).
    tls: TlsFiles | None = None
    pool_ca: LocalCA | None = None
    # Identity (--auth-tokens, --admin, --allow-direct); off by default on one machine.
    auth: AuthConfig = field(default_factory=AuthConfig)

    @property
    def initial_workers(self) -> int:
        return self.workers if self.autoscale is None else self.autoscale.min_replicas


class LocalPool:
    def __init__(self, config: ServeConfig) -> None:
        self.config = config
        self.pool_ca = PoolCA(config.pool_ca) if config.tls is not None else None
        try:
            self.router, self.data_path = self._make_router()
        except BaseException:
            if self.pool_ca is not None:
                self.pool_ca.remove()
            raise
        self.slots: list[WorkerSlot] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._router_port = 0
        self._next_id = 0
        self._leaving: set[asyncio.Task[None]] = set()
        self.autoscaler: ScaleLoop | None = None
        self._autoscaling: asyncio.Task[None] | None = None

    def _make_router(self) -> tuple[RouterServer, str]:
        config = self.config
        return make_router(
            RouterConfig(
                host=config.host,
                port=config.port,
                router_id="router",
                store_url=config.store,
                session_ttl=config.session_ttl,
                max_sessions=config.max_sessions,
                pool=config.pool,
                max_message_mb=config.max_message_mb,
                metrics_port=config.metrics_port,
                data_path=config.data_path,
                limits=config.limits,
                value_helpers=config.value_helpers,
                max_store_calls_per_principal=config.max_store_calls_per_principal,
                store_call_rate_per_principal=config.store_call_rate_per_principal,
                tls=config.tls,
                pool_tls=None if self.pool_ca is None else self.pool_ca.files,
                auth=config.auth,
            ),
            discovery=StaticDiscovery([]),
        )

    def _worker_argv(self, slot_id: str, router_port: int) -> list[str]:
        config = self.config
        return [
            sys.executable, "-m", "snakepit", "worker",
            "--adapter", config.adapter,
            "--host", "127.0.0.1",
            "--worker-id", slot_id,
            "--concurrency", str(config.pool.worker_concurrency),
            "--store", "router",
            "--router", f"127.0.0.1:{router_port}",
            "--max-message-mb", str(config.max_message_mb),
            "--session-ttl", str(config.session_ttl),
            *self._metrics_argv(slot_id),
            *self._ticket_argv(),
            "--max-call-seconds", str(config.max_call_seconds),
            *self._tls_argv(),
            *config.worker_args,
        ]  # fmt: skip

    def _tls_argv(self) -> list[str]:
        """A worker's pool TLS files, and the client CA direct-mode clients are checked with."""
        if self.pool_ca is None:
            return []
        argv = ["--pool-tls-dir", str(self.pool_ca.dir)]
        if self.config.tls is not None and self.config.tls.ca:
            argv += ["--tls-client-ca", self.config.tls.ca]
        return argv

    def _ticket_argv(self) -> list[str]:
        """With auth on, workers get the pool's ticket public key (never the private one)."""
        issuer = self.router.gate.issuer
        if issuer is None:
            return []
        return [
            "--ticket-public-key", public_key_text(issuer.key.public_key()),
            "--ticket-audience", issuer.audience,
        ]  # fmt: skip

    def _metrics_argv(self, slot_id: str) -> list[str]:
        """A worker's ``--metrics-port`` (a free port, published in the pool status), if any."""
        if self.config.metrics_port is None:
            return []
        port = free_port()
        self.router.worker_metrics[slot_id] = f"127.0.0.1:{port}"
        return ["--metrics-port", str(port)]

    def _publish(self, _slot: WorkerSlot | None = None) -> None:
        self.router.pool.set_workers({s.worker_id: s.address for s in self.slots})

    async def start(self) -> None:
        """Start the router, then the workers; return once every worker is ready."""
        await self.router.start()
        # Workers call back on the internal port (mutual TLS with the pool CA) when there is one.
        self._router_port = self.router.internal_port or self.router.port
        for _ in range(self.config.initial_workers):
            self._add_worker()
        self._publish()
        await self._wait_ready()
        if self.pool_ca is not None:
            self._tasks.append(asyncio.get_running_loop().create_task(self.pool_ca.keep_renewed()))
        policy = self.config.autoscale
        if policy is not None:
            self.autoscaler = ScaleLoop(
                policy,
                self._read_load,
                self._resize,
                len(self.slots),
                period=self.config.scale_period,
                on_round=self._on_round,
            )
            self.router.desired_workers = len(self.slots)
            self.router.starved_listeners.append(self.autoscaler.wake)
            self._autoscaling = asyncio.get_running_loop().create_task(self.autoscaler.run())

    def _add_worker(self) -> WorkerSlot:
        worker_id = f"worker-{self._next_id}"
        self._next_id += 1
        slot = WorkerSlot(
            worker_id,
            self._worker_argv(worker_id, self._router_port),
            policy=self.config.restart,
            on_address=self._publish,
            env={"SNAKEPIT_LOG_LEVEL": "warning"} if self.config.quiet else None,
        )
        self.slots.append(slot)
        self._tasks = [t for t in self._tasks if not t.done()]  # workers that left long ago
        self._tasks.append(asyncio.get_running_loop().create_task(slot.run()))
        return slot

    def _remove_worker(self) -> None:
        """Drain one worker: the router stops sending it calls at once, then it gets SIGTERM.

        A worker still starting goes first, then the least busy one. Its calls in flight
        finish (the router keeps the channel open for them, the worker drains on SIGTERM);
        sessions simply hash to the remaining workers, their variables being in the store.
        """
        workers = self.router.pool.workers

        def cost(slot: WorkerSlot) -> tuple[bool, int]:
            handle = workers.get(slot.worker_id)
            ready = handle is not None and handle.ready
            return ready, handle.in_flight if handle is not None else 0

        slot = min(reversed(self.slots), key=cost)
        self.slots.remove(slot)
        self.router.worker_metrics.pop(slot.worker_id, None)
        self._publish()
        task = asyncio.get_running_loop().create_task(slot.stop(self.config.drain_timeout))
        self._leaving.add(task)
        task.add_done_callback(self._leaving.discard)

    async def _read_load(self) -> tuple[float, bool]:
        return await self.router.load(), True

    async def _resize(self, decision: Decision, _sample: Sample) -> None:
        while len(self.slots) < decision.desired:
            self._add_worker()
        while len(self.slots) > decision.desired:
            self._remove_worker()
        self._publish()

    def _on_round(self, round_: Round) -> None:
        self.router.desired_workers = round_.decision.desired
        self.router.scale_reason = round_.decision.reason

    async def _wait_ready(self) -> None:
        started = time.monotonic()
        total = len(self.slots)
        shown = -1
        deadline = started + self.config.startup_timeout
        while True:
            ready = sum(w.ready for w in self.router.pool.workers.values())
            if ready != shown and not self.config.quiet:
                _progress(
                    f"  workers ready: {ready}/{total} ({time.monotonic() - started:.2f} s)",
                    done=ready == total,
                )
                shown = ready
            if ready == total:
                return
            if time.monotonic() > deadline or all(s.failing for s in self.slots):
                raise RuntimeError(
                    f"only {ready} of {total} workers became ready within {self.config.startup_timeout:g}s"
                )
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        if self._autoscaling is not None:  # first: it must not start workers from now on
            self._autoscaling.cancel()
        # The calls in flight get the workers' drain time to finish (Ctrl-C, SIGTERM).
        await self.router.stop(grace=self.config.drain_timeout)
        await asyncio.gather(
            *(slot.stop(self.config.drain_timeout) for slot in self.slots), *self._leaving
        )
        for task in self._tasks:
            task.cancel()
        if self.pool_ca is not None:
            self.pool_ca.remove()


def redacted(url: str) -> str:
    """``url`` with any password replaced by ``***``: fit to print or log."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.netloc.rsplit("@", 1)[1]
        return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
    except ValueError:
        return "<unparsable store URL>"


def _progress(line: str, *, done: bool) -> None:
    if sys.stderr.isatty():
        sys.stderr.write("\r" + line + ("\n" if done else ""))
    elif done:
        sys.stderr.write(line + "\n")
    sys.stderr.flush()


async def run(config: ServeConfig) -> int:
    logs.setup("serve", "serve", level="warning")
    tracing.setup("snakepit-router")  # the workers, children with this environment, do the same
    try:
        pool = LocalPool(config)
    except (ValueError, SnakepitError) as exc:  # e.g. a bad --data-path or --auth-tokens file
        print(f"snakepit: {exc}", file=sys.stderr)
        return 2
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    policy = config.autoscale
    workers = (
        f"{config.workers} workers"
        if policy is None
        else f"{policy.min_replicas} workers, autoscaling {policy.min_replicas}..{policy.max_replicas}"
    )
    print(
        f"snakepit: starting {workers} (adapter {config.adapter}, "
        f"store {redacted(config.store)}, {pool.data_path})",
        file=sys.stderr,
        flush=True,
    )
    try:
        await pool.start()
    except Exception as exc:
        print(
            f"snakepit: could not start the pool: {str(exc).replace(config.store, redacted(config.store))}",
            file=sys.stderr,
        )
        await pool.stop()
        return 1
    freeze_startup_heap()
    keep_large_buffers(config.max_message_mb)
    target = f"{'localhost' if config.host in ('127.0.0.1', '0.0.0.0') else config.host}:{pool.router.port}"
    hint = "" if pool.router.port == 50051 else f" --target {target}"
    if config.tls is not None:
        hint += " --ca CA_FILE" + (" --cert FILE --key FILE" if config.tls.ca else "")
    print(f"snakepit: pool ready at {target} - try: snakepit call add a=1 b=2{hint}", flush=True)
    if pool.router.metrics_server is not None:
        host = target.rsplit(":", 1)[0]
        print(
            f"snakepit: metrics at http://{host}:{pool.router.metrics_server.port}/metrics",
            flush=True,
        )
    await stop.wait()
    print("snakepit: stopping", file=sys.stderr, flush=True)
    await pool.stop()
    tracing.shutdown()
    return 0
