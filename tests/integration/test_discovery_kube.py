"""EndpointSlice discovery against a real kube-apiserver: ready endpoints only, changes followed.

The slices are written by the test (no pods run in the control-plane tier), exactly as the
EndpointSlice controller would write them for a Service's pods.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping

import pytest

from localkube.providers import KubeCluster
from snakepit.router.discovery import EndpointSliceDiscovery

pytestmark = pytest.mark.timeout(120)


def endpoint_slice(name: str, service: str, endpoints: list[tuple[str, str, bool]]) -> str:
    return json.dumps(
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": name,
                "labels": {
                    "kubernetes.io/service-name": service,
                    "endpointslice.kubernetes.io/managed-by": "tests.snakepit.dev",
                },
            },
            "addressType": "IPv4",
            "ports": [{"name": "grpc", "port": 50052, "protocol": "TCP"}],
            "endpoints": [
                {
                    "addresses": [ip],
                    "conditions": {"ready": ready},
                    "targetRef": {"kind": "Pod", "name": pod},
                }
                for pod, ip, ready in endpoints
            ],
        }
    )


async def next_set(updates: asyncio.Queue[dict[str, str]], want: Mapping[str, str]) -> None:
    async with asyncio.timeout(30):
        while (got := await updates.get()) != want:
            pass
    assert got == want


async def test_discovery_follows_the_ready_endpoints_of_a_service(
    kube_control_plane: KubeCluster, kube_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(kube_control_plane.kubeconfig))
    cluster, ns = kube_control_plane, kube_namespace
    cluster.apply(
        endpoint_slice(
            "w-a", "workers", [("pod-1", "10.1.0.1", True), ("pod-2", "10.1.0.2", False)]
        ),
        ns,
    )
    cluster.apply(endpoint_slice("other", "not-ours", [("pod-9", "10.1.0.9", True)]), ns)

    updates: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    discovery = EndpointSliceDiscovery("workers", ns)
    task = asyncio.create_task(discovery.run(lambda workers: updates.put_nowait(dict(workers))))
    try:
        await next_set(
            updates, {"pod-1": "10.1.0.1:50052"}
        )  # not-ready pod-2 and other Services left out

        await asyncio.to_thread(
            cluster.apply,
            endpoint_slice(
                "w-a", "workers", [("pod-1", "10.1.0.1", True), ("pod-2", "10.1.0.2", True)]
            ),
            ns,
        )
        await next_set(updates, {"pod-1": "10.1.0.1:50052", "pod-2": "10.1.0.2:50052"})

        await asyncio.to_thread(
            cluster.apply, endpoint_slice("w-b", "workers", [("pod-3", "10.1.0.3", True)]), ns
        )
        await next_set(
            updates,
            {"pod-1": "10.1.0.1:50052", "pod-2": "10.1.0.2:50052", "pod-3": "10.1.0.3:50052"},
        )

        await asyncio.to_thread(cluster.kubectl_run, "-n", ns, "delete", "endpointslice", "w-a")
        await next_set(updates, {"pod-3": "10.1.0.3:50052"})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_worker_discovery_also_publishes_starting_endpoints_never_terminating(
    kube_control_plane: KubeCluster, kube_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The router admits a starting worker by its own health check (faster cold starts)."""
    monkeypatch.setenv("KUBECONFIG", str(kube_control_plane.kubeconfig))
    cluster, ns = kube_control_plane, kube_namespace
    body = json.loads(
        endpoint_slice(
            "w-s",
            "workers",
            [
                ("ready", "10.1.0.1", True),
                ("starting", "10.1.0.2", False),
                ("leaving", "10.1.0.3", False),
            ],
        )
    )
    body["endpoints"][2]["conditions"] = {"ready": False, "serving": True, "terminating": True}
    cluster.apply(json.dumps(body), ns)
    updates: asyncio.Queue[dict[str, str]] = asyncio.Queue()
    discovery = EndpointSliceDiscovery("workers", ns, starting=True)
    task = asyncio.create_task(discovery.run(lambda workers: updates.put_nowait(dict(workers))))
    try:
        await next_set(updates, {"ready": "10.1.0.1:50052", "starting": "10.1.0.2:50052"})
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
