"""Disruption budgets and network policies around the pool's pods."""

from __future__ import annotations

from ..spec import JSON, REDIS_PORT, WORKER_PORT, Pool
from .common import POOL_LABEL, ROUTER, STORE, WORKER, Names, metadata, selector
from .metrics import metrics_ingress


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


def build_worker_network_policy(pool: Pool) -> JSON:
    """Workers take calls from the pool's own pods (the router; workers calling tools) only,
    plus the peers a user lists for ``Client(direct=True)``; anyone may scrape their metrics."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(pool, Names(pool.name).workers, WORKER),
        "spec": {
            "podSelector": {"matchLabels": selector(pool, WORKER)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [_pool_pods(pool), *pool.spec.network_policy.direct_clients],
                    "ports": [{"protocol": "TCP", "port": WORKER_PORT}],
                },
                *metrics_ingress(pool),
            ],
        },
    }


def build_store_network_policy(pool: Pool) -> JSON:
    """Redis holds session state: only this pool's pods may connect."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": metadata(pool, Names(pool.name).redis, STORE),
        "spec": {
            "podSelector": {"matchLabels": selector(pool, STORE)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [_pool_pods(pool)], "ports": [{"protocol": "TCP", "port": REDIS_PORT}]}
            ],
        },
    }
