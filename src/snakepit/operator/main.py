"""``snakepit operator``: the kopf operator process."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time

import kopf

from .. import logs
from ..metrics import OperatorMetrics
from ..metrics.common import serve_http
from .autoscaler import Autoscalers
from .children import Children, PoolKey
from .config import OperatorConfig
from .controller import Controller
from .handlers import build_registry
from .kube import Kube, load_api_client
from .reconciler import Reconciler
from .spec import API_VERSION
from .tokenreviewers import TokenReviewers
from .workqueue import WorkQueue

log = logging.getLogger("snakepit.operator")

CRD_WAIT_SECONDS = 120.0


async def wait_for_crd(kube: Kube, timeout: float = CRD_WAIT_SECONDS) -> bool:
    """kopf resolves resources once at start in namespaced mode, so the CRD must be served first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if await kube.served(API_VERSION):
                return True
            problem = f"{API_VERSION} is not served: is the SnakepitPool CRD installed?"
        except Exception as exc:  # the API server may still be starting
            problem = f"cannot reach the API server: {exc}"
        if time.monotonic() >= deadline:
            log.error(problem)
            return False
        log.warning("%s (retrying)", problem)
        await asyncio.sleep(2.0)


async def operate(
    namespaces: list[str], clusterwide: bool, liveness_port: int, metrics_port: int | None = None
) -> int:
    config = OperatorConfig.from_env()
    kube = Kube(load_api_client())
    metrics = OperatorMetrics() if metrics_port is not None else None
    server = (
        serve_http(metrics.registry, metrics_port) if metrics and metrics_port is not None else None
    )
    try:
        if not await wait_for_crd(kube):
            return 1
        children = Children()
        queue: WorkQueue[PoolKey] = WorkQueue()
        autoscalers = Autoscalers(kube, queue.add, period=config.autoscale_period, metrics=metrics)
        controller = Controller(
            Reconciler(kube, config, children),
            children,
            queue,
            resync_seconds=config.resync_seconds,
            metrics=metrics,
            autoscalers=autoscalers,
            tokenreviewers=TokenReviewers(
                kube,
                config.tokenreview_binding,
                () if clusterwide else namespaces,
                resync_seconds=config.resync_seconds,
            ),
        )
        stop = asyncio.Event()
        workers = asyncio.create_task(controller.run())
        workers.add_done_callback(lambda _: stop.set())
        try:
            await kopf.operator(
                registry=build_registry(controller, clusterwide),
                clusterwide=clusterwide,
                namespaces=namespaces,
                standalone=True,  # one replica (Recreate): no peering objects needed
                liveness_endpoint=f"http://0.0.0.0:{liveness_port}/healthz",
                stop_flag=stop,
            )
        finally:
            workers.cancel()
            await asyncio.gather(workers, return_exceptions=True)
            await autoscalers.close()
        if workers.done() and not workers.cancelled() and workers.exception() is not None:
            log.error("reconcile workers crashed", exc_info=workers.exception())
            return 1
        return 0
    finally:
        kube.close()
        if server is not None:
            server.close()


class _QuietKopf(logging.Filter):
    """kopf attaches its whole settings object to object-related records; drop it from logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__.pop("settings", None)
        return True


def setup_logging() -> None:
    logs.setup("operator", os.environ.get("POD_NAME") or socket.gethostname())
    for handler in logging.getLogger().handlers:
        handler.addFilter(_QuietKopf())
    # Our event handlers only enqueue work; "Handler succeeded" per watch event is noise.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)


def run(
    namespaces: list[str],
    all_namespaces: bool,
    liveness_port: int,
    metrics_port: int | None = None,
) -> int:
    """Entry point of ``snakepit operator``; returns the process exit code."""
    setup_logging()
    if not namespaces and not all_namespaces:
        own = os.environ.get("POD_NAMESPACE")
        if not own:
            print(
                "snakepit operator: pass --namespace NS (repeatable) or --all-namespaces",
                file=sys.stderr,
            )
            return 2
        namespaces = [own]
    if namespaces and all_namespaces:
        print(
            "snakepit operator: --namespace and --all-namespaces exclude each other",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(operate(namespaces, all_namespaces, liveness_port, metrics_port))
    except KeyboardInterrupt:
        return 0
