"""Reading a pool's load from its router replicas, and hearing at once when one holds calls.

``router_load`` is the one place the load of a router is read (calls in flight plus queued,
from GetPoolStatus). When the tool-call data path moves to HAProxy (issue 11), the numbers the
autoscaler follows must come from wherever calls then wait: this function is what changes.

A router that does not answer is reported as ``None``, never as zero: the policy then grows on
what the others report but never shrinks (see ``policy.total_load``).

A secured router (TLS, authentication: the default on Kubernetes) answers GetPoolStatus only to a
caller it trusts, and the operator is none of its callers. Its load is then read where it is
public anyway: the router's ``/metrics`` (``snakepit_router_in_flight`` +
``snakepit_router_queued``, plaintext HTTP, scraped by anyone the NetworkPolicy admits), and the
health stream comes from its plaintext health-only port (``--health-port``), which serves the
same ``grpc.health.v1`` servicer, ``snakepit.capacity`` included (``metrics_load``,
``RouterSet(metrics_port=..., health_port=...)``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from ..protocol import method_path, pb
from . import CAPACITY_SERVICE
from .policy import total_load

log = logging.getLogger("snakepit.autoscale")

READ_TIMEOUT = 2.0


async def router_load(channel: Any, timeout: float = READ_TIMEOUT) -> float | None:
    """Calls in flight plus queued at one router, or None when it does not answer in time."""
    status_rpc = channel.unary_unary(
        method_path("GetPoolStatus"),
        request_serializer=pb.GetPoolStatusRequest.SerializeToString,
        response_deserializer=pb.PoolStatus.FromString,
    )
    try:
        status = await status_rpc(pb.GetPoolStatusRequest(), timeout=timeout)
    except grpc.aio.AioRpcError:
        return None
    return float(status.in_flight + status.queued)


LOAD_METRICS = ("snakepit_router_in_flight", "snakepit_router_queued")


def parse_metrics_load(text: str) -> float | None:
    """In flight plus queued from a router's Prometheus text, None unless both are there."""
    found: dict[str, float] = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in LOAD_METRICS:
            try:
                found[name] = float(value.split()[0])
            except (ValueError, IndexError):
                return None
    return sum(found.values()) if len(found) == len(LOAD_METRICS) else None


def _fetch(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return str(answer.read(1 << 20).decode("utf-8", "replace"))


async def metrics_load(host: str, port: int, timeout: float = READ_TIMEOUT) -> float | None:
    """Calls in flight plus queued at one router from its /metrics, or None when it does not
    answer in time (or not with those numbers)."""
    try:
        text = await asyncio.wait_for(
            asyncio.to_thread(_fetch, f"http://{_join(host, port)}/metrics", timeout), timeout
        )
    except (OSError, TimeoutError, ValueError):
        return None
    return parse_metrics_load(text)


def _host(address: str) -> str:
    return address.rsplit(":", 1)[0]


def _join(host: str, port: int) -> str:
    return f"{host}:{port}"


class RouterSet:
    """Channels to every router replica of one pool; ``on_starved`` fires when one holds calls.

    Each router's ``snakepit.capacity`` health service turns NOT_SERVING while it holds calls
    that no ready worker can take (a pool at zero): a health Watch stream per router hears it
    the moment it happens. With ``metrics_port`` the load is read from each router's /metrics
    instead of GetPoolStatus, and with ``health_port`` the stream comes from that port (the
    plaintext health-only port of a TLS router); both on the host of the address discovered.
    """

    def __init__(
        self,
        on_starved: Callable[[], None],
        *,
        metrics_port: int | None = None,
        health_port: int | None = None,
    ) -> None:
        self._on_starved = on_starved
        self.metrics_port = metrics_port
        self.health_port = health_port
        self._channels: dict[str, Any] = {}
        self._watches: dict[str, asyncio.Task[None]] = {}
        self.known = False  # until discovery first reports, "no router" means "not known yet"

    @property
    def addresses(self) -> list[str]:
        return sorted(self._channels)

    def set_routers(self, addresses: Iterable[str]) -> None:
        wanted = set(addresses)
        self.known = True
        for address in [a for a in self._channels if a not in wanted]:
            self._watches.pop(address).cancel()
            channel = self._channels.pop(address)
            asyncio.get_running_loop().create_task(channel.close())
        for address in wanted - set(self._channels):
            health = (
                address if self.health_port is None else _join(_host(address), self.health_port)
            )
            channel = grpc.aio.insecure_channel(health)
            self._channels[address] = channel
            self._watches[address] = asyncio.get_running_loop().create_task(
                self._watch(address, channel)
            )

    async def read(self) -> tuple[float, bool]:
        """Total load over the routers, and whether every one of them answered."""
        if not self.known:
            return 0.0, False
        if self.metrics_port is not None:
            port = self.metrics_port
            loads = await asyncio.gather(*(metrics_load(_host(a), port) for a in self._channels))
        else:
            loads = await asyncio.gather(*(router_load(c) for c in self._channels.values()))
        return total_load(loads)

    async def _watch(self, address: str, channel: Any) -> None:
        stub = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service=CAPACITY_SERVICE)
        backoff = 0.1
        while True:
            call = stub.Watch(request)
            try:
                async for response in call:
                    backoff = 0.1
                    if response.status == health_pb2.HealthCheckResponse.NOT_SERVING:
                        log.info("router %s holds calls with no ready worker", address)
                        self._on_starved()
            except grpc.aio.AioRpcError:
                pass
            except asyncio.CancelledError:
                call.cancel()
                raise
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)

    async def close(self) -> None:
        for task in self._watches.values():
            task.cancel()
        for task in self._watches.values():
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.gather(*(c.close() for c in self._channels.values()))
        self._watches.clear()
        self._channels.clear()
