"""Disruption budgets and network policies around the pool's pods.

Every pod gets ingress and egress rules (docs/security.md): the router takes calls from the
peers ``spec.networkPolicy.routerClients`` lists (this namespace when none); workers and
Redis only from the pool's pods. Egress allows DNS and the pool's own pods; the router also the
API server (for EndpointSlices), workers also ``spec.networkPolicy.allowEgress``; Redis none.
No rule reaches the link-local range, where clouds serve instance metadata and credentials.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from ..config import OperatorConfig
from ..spec import JSON, REDIS_PORT, ROUTER_PORT, WORKER_PORT, Pool
from .common import POOL_LABEL, ROUTER, STORE, WORKER, Names, metadata, selector
from .metrics import metrics_ingress
from .tls import HEALTH_PORT, INTERNAL_PORT, tls_enabled

# Cloud metadata endpoints (169.254.169.254, fd00:ec2::254) and the rest of link-local.
METADATA_CIDRS_V4 = ["169.254.0.0/16"]
METADATA_CIDRS_V6 = ["fe80::/10", "fd00:ec2::254/128"]
ANYWHERE_BUT_METADATA: list[JSON] = [
    {"ipBlock": {"cidr": "0.0.0.0/0", "except": METADATA_CIDRS_V4}},
    {"ipBlock": {"cidr": "::/0", "except": METADATA_CIDRS_V6}},
]
# Ports the Kubernetes API server answers on behind the `kubernetes` Service.
API_SERVER_PORTS = (443, 6443)


def build_pdb(pool: Pool, component: str) -> JSON:
    """At most one pod of the component evicted at a time.

    ``maxUnavailable`` rather than ``minAvailable`` so a one-replica component can still be
    drained off a node, and unhealthy pods may always be evicted so a broken rollout never
    blocks node maintenance.
    """
    names = Names(pool.name)
    name = {WORKER: names.workers, ROUTER: names.router}[component]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(pool, name, component),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector(pool, component)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def _pool_pods(pool: Pool) -> JSON:
    """Every pod of this pool (router, workers, store) and nothing else, in its namespace."""
    return {"podSelector": {"matchLabels": {POOL_LABEL: pool.name}}}


def _tcp(*ports: int) -> list[JSON]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def _dns() -> JSON:
    ports = [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]
    return {"to": ANYWHERE_BUT_METADATA, "ports": ports}


def _store_egress(pool: Pool) -> list[JSON]:
    """The rule reaching the session store: the pool's Redis, or the external one's port."""
    store = pool.spec.session_store
    if store.managed:
        return [{"to": [_pool_pods(pool)], "ports": _tcp(REDIS_PORT)}]
    parts = urlsplit(store.url or "")
    if parts.scheme == "unix":
        return []
    return [{"to": ANYWHERE_BUT_METADATA, "ports": _tcp(parts.port or REDIS_PORT)}]


def _policy(pool: Pool, name: str, component: str, ingress: list[JSON], egress: list[JSON]) -> JSON:
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(pool, name, component),
        "spec": {
            "podSelector": {"matchLabels": selector(pool, component)},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": ingress,
            "egress": egress,
        },
    }


def _router_ports(pool: Pool) -> list[int]:
    """The router ports the pool's own pods call: with TLS, its mutual-TLS internal port."""
    return [ROUTER_PORT, INTERNAL_PORT] if tls_enabled(pool) else [ROUTER_PORT]


def build_worker_network_policy(pool: Pool) -> JSON:
    """Workers take calls from the pool's own pods (the router; workers calling tools) only,
    plus the peers a user lists for ``Client(direct=True)``. Tool code may reach DNS, the
    router (``ctx.call_tool``), the store and what ``allowEgress`` lists: not the API server,
    not the metadata endpoint, not the internet."""
    policy = pool.spec.network_policy
    ingress = [
        {"from": [_pool_pods(pool), *policy.direct_clients], "ports": _tcp(WORKER_PORT)},
        *metrics_ingress(pool),
    ]
    egress = [
        _dns(),
        {
            "to": [{"podSelector": {"matchLabels": selector(pool, ROUTER)}}],
            "ports": _tcp(*_router_ports(pool)),
        },
        *_store_egress(pool),
        *policy.allow_egress,
    ]
    return _policy(pool, Names(pool.name).workers, WORKER, ingress, egress)


def build_router_network_policy(pool: Pool, config: OperatorConfig) -> JSON:
    """The front door: callers from ``routerClients`` (this namespace's pods when empty), and
    the pool's own pods (workers' ``ctx.call_tool``; routers forwarding hosted-tool calls to
    the replica that holds the host's stream); with ``spec.autoscaling``, also the operator's
    pods, whose autoscaler reads each router's load; with a LoadBalancer, the
    ``loadBalancerSourceRanges`` too (what the Service admits, the policy must not drop). It
    reaches DNS, workers, the other routers, the store and the API server (it watches
    EndpointSlices)."""
    clients = pool.spec.network_policy.router_clients or [{"podSelector": {}}]
    if pool.spec.router.service_type == "LoadBalancer":
        ranges = pool.spec.router.load_balancer_source_ranges
        clients = [*clients, *({"ipBlock": {"cidr": cidr}} for cidr in ranges)]
    operator = config.operator_peer() if pool.spec.autoscaling else None
    ingress = [
        {
            "from": [*clients, _pool_pods(pool), *([operator] if operator else [])],
            "ports": _tcp(ROUTER_PORT),
        },
        *metrics_ingress(pool),
    ]
    if tls_enabled(pool):
        ingress.append({"from": [_pool_pods(pool)], "ports": _tcp(INTERNAL_PORT)})
        if operator:  # the autoscaler's health stream of a TLS router (autoscale/routers.py)
            ingress.append({"from": [operator], "ports": _tcp(HEALTH_PORT)})
    egress = [
        _dns(),
        {
            "to": [{"podSelector": {"matchLabels": selector(pool, WORKER)}}],
            "ports": _tcp(WORKER_PORT),
        },
        {
            "to": [{"podSelector": {"matchLabels": selector(pool, ROUTER)}}],
            "ports": _tcp(*_router_ports(pool)),
        },
        *_store_egress(pool),
        {"to": ANYWHERE_BUT_METADATA, "ports": _tcp(*API_SERVER_PORTS)},
    ]
    return _policy(pool, Names(pool.name).router, ROUTER, ingress, egress)


def build_store_network_policy(pool: Pool) -> JSON:
    """Redis holds session state: only this pool's pods may connect, and it connects nowhere."""
    ingress = [{"from": [_pool_pods(pool)], "ports": _tcp(REDIS_PORT)}]
    return _policy(pool, Names(pool.name).redis, STORE, ingress, [])
