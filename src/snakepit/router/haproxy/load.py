"""The calls HAProxy holds now, for the router's in-flight and queue gauges.

With HAProxy on the data path a tool call waits in HAProxy's queue and runs on a worker without
the Python pool knowing, so ``snakepit_router_in_flight``, ``_queued`` and ``_worker_in_flight``
(what the autoscaler and the dashboard read) add HAProxy's own counters to the pool's (which
still counts the calls HAProxy hands to the Python router). They are read when Prometheus
scrapes, from ``show stat`` of the workers backend: ``qcur`` of the backend and of each server
(queued), ``scur`` of each server (running), server names mapped to workers by ``ServerSync``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ...metrics.router import Load
from .config import WORKERS_BACKEND
from .runtime import BackendStats, HaproxyError, RuntimeApi, parse_stat, stat_command

log = logging.getLogger("snakepit.router")


def load_of(
    stats: BackendStats, worker_of: Callable[[bytes], str | None], dropped: int | None = None
) -> Load:
    """Calls queued and running in HAProxy's workers backend, the running ones by worker;
    ``dropped``: HAProxy's count of log lines it could not send."""
    workers: dict[str, int] = {}
    for name, server in stats.servers.items():
        worker = worker_of(name.encode())
        if worker is not None and server.in_flight:
            workers[worker] = workers.get(worker, 0) + server.in_flight
    return Load(
        in_flight=sum(s.in_flight for s in stats.servers.values()),
        queued=stats.queued,
        workers=workers,
        dropped_log_lines=dropped,
    )


def dropped_logs(info: str) -> int | None:
    """``DroppedLogs`` of ``show info``: log lines HAProxy could not send (a datagram socket
    whose buffer was full makes it drop the line and count it)."""
    for line in info.splitlines():
        if line.startswith("DroppedLogs:"):
            return int(line.partition(":")[2])
    return None


class HaproxyLoad:
    """``Load`` from HAProxy's runtime API, read in the scraping thread (prometheus_client's
    HTTP server), never on the event loop, and kept for ``ttl`` seconds so that several
    scrapers (Prometheus, the autoscaler) cost one read. Only the backend and the servers
    in service are asked for (``stat_command``): about a millisecond, where all 1,024 slots
    took 25 ms to parse. None when HAProxy does not answer (restarting): the gauges then show
    the Python pool alone rather than a stale count."""

    def __init__(
        self,
        api: RuntimeApi,
        worker_of: Callable[[bytes], str | None],
        ttl: float = 1.0,
        timeout: float = 0.5,
    ) -> None:
        self.api = api
        self.worker_of = worker_of
        self.ttl = ttl
        self.timeout = timeout
        self._lock = threading.Lock()
        self._read_at = float("-inf")
        self._load: Load | None = None

    def __call__(self) -> Load | None:
        with self._lock:
            now = time.monotonic()
            if now - self._read_at >= self.ttl:
                self._load = self._read()
                self._read_at = now
            return self._load

    def _read(self) -> Load | None:
        command = stat_command(WORKERS_BACKEND, in_service=True)
        try:
            text = self.api.run_blocking(command, "show info", timeout=self.timeout)
        except (OSError, TimeoutError, HaproxyError) as exc:
            log.debug("haproxy load not read", extra={"error": str(exc)})
            return None
        # Each answer ends with an empty line: the CSV, then ``show info``'s "Name: value" lines.
        stats, _, info = text.partition("\n\n")
        return load_of(parse_stat(stats, WORKERS_BACKEND), self.worker_of, dropped_logs(info))
