"""Where the workers are: a static list, or the EndpointSlices of a Kubernetes Service.

Both publish the same thing, ``{worker_id: "host:port"}``, whenever it changes. Worker ids are
what the ring hashes, so every router replica (and every direct-mode client) must derive the same
ids: the pod name from the endpoint's targetRef in Kubernetes, the given names otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("snakepit.router")

Publish = Callable[[Mapping[str, str]], None]


class Discovery(ABC):
    @abstractmethod
    async def run(self, publish: Publish) -> None:
        """Publish the worker set now and after every change, until cancelled."""


class StaticDiscovery(Discovery):
    """``"id=host:port"`` or bare ``"host:port"`` entries (the address is then the id)."""

    def __init__(self, entries: list[str]) -> None:
        self.workers: dict[str, str] = {}
        for entry in entries:
            worker_id, sep, address = entry.partition("=")
            self.workers[worker_id if sep else entry] = address if sep else entry

    async def run(self, publish: Publish) -> None:
        publish(dict(self.workers))


class EndpointSliceDiscovery(Discovery):
    """Ready endpoints of a Service's EndpointSlices, followed with a list-then-watch loop.

    The official client is synchronous, so the watch runs in a daemon thread and hands each new
    worker set to the event loop.
    """

    def __init__(
        self,
        service: str,
        namespace: str,
        port: int | None = None,
        port_name: str = "grpc",
        *,
        starting: bool = False,
    ) -> None:
        self.service = service
        self.namespace = namespace
        self.port = port
        self.port_name = port_name
        # With ``starting``, endpoints not ready yet are published too (terminating ones never):
        # the router's own health watch admits a worker the moment it serves, instead of after
        # the kubelet's next readiness probe and the EndpointSlice update that follows it. That
        # is most of a cold start (scale from zero) otherwise.
        self.starting = starting
        self._stop = threading.Event()

    async def run(self, publish: Publish) -> None:
        loop = asyncio.get_running_loop()
        thread = threading.Thread(
            target=self._watch_forever,
            args=(lambda workers: loop.call_soon_threadsafe(publish, workers),),
            name="endpointslice-watch",
            daemon=True,
        )
        thread.start()
        try:
            await asyncio.Event().wait()
        finally:
            self._stop.set()

    def _watch_forever(self, publish: Publish) -> None:
        from kubernetes import client, watch

        selector = f"kubernetes.io/service-name={self.service}"
        backoff = 0.5
        api: Any = None
        while not self._stop.is_set():
            slices: dict[str, Any] = {}
            try:
                api = api or client.DiscoveryV1Api(_api_client())
                listing = api.list_namespaced_endpoint_slice(
                    self.namespace, label_selector=selector
                )
                for item in listing.items:
                    slices[_name(item)] = item
                publish(self._workers(slices))
                version = listing.metadata.resource_version if listing.metadata else None
                stream: Any = watch.Watch()  # type: ignore[no-untyped-call]
                for event in stream.stream(
                    api.list_namespaced_endpoint_slice,
                    self.namespace,
                    label_selector=selector,
                    resource_version=version,
                    timeout_seconds=300,
                ):
                    if self._stop.is_set():
                        stream.stop()
                        return
                    item = event["object"]
                    if event["type"] == "DELETED":
                        slices.pop(_name(item), None)
                    elif event["type"] in ("ADDED", "MODIFIED"):
                        slices[_name(item)] = item
                    publish(self._workers(slices))
                backoff = 0.5
            except Exception as exc:  # network, 410 Gone, API errors: relist after a pause
                log.warning("endpointslice watch restarting", extra={"error": str(exc)})
                time.sleep(backoff)
                backoff = min(backoff * 2, 10.0)

    def _workers(self, slices: Mapping[str, Any]) -> dict[str, str]:
        workers: dict[str, str] = {}
        for item in slices.values():
            port = self.port or next(
                (p.port for p in item.ports or () if p.name == self.port_name), None
            )
            if port is None:
                continue
            for endpoint in item.endpoints or ():
                conditions = endpoint.conditions
                if conditions is not None and not self._wanted(conditions):
                    continue
                if not endpoint.addresses:
                    continue
                address = endpoint.addresses[0]
                target = endpoint.target_ref
                worker_id = target.name if target is not None and target.name else address
                host = f"[{address}]" if ":" in address else address
                workers[worker_id] = f"{host}:{port}"
        return workers

    def _wanted(self, conditions: Any) -> bool:
        if self.starting:
            return conditions.terminating is not True
        return conditions.ready is not False


def _api_client() -> Any:
    """In a pod, its ServiceAccount; elsewhere the kubeconfig ``$KUBECONFIG`` names now."""
    from kubernetes import client
    from kubernetes import config as kube_config

    config: Any = kube_config
    try:
        config.load_incluster_config()
    except config.ConfigException:
        # The library reads $KUBECONFIG once, at import; read it again here.
        config.load_kube_config(config_file=os.environ.get("KUBECONFIG"))
    return client.ApiClient()


def _name(item: Any) -> str:
    return str(item.metadata.name)
