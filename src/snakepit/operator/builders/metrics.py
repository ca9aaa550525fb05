"""What makes a pool's router and worker pods scrapable by Prometheus (``spec.metrics``).

Each pod serves ``/metrics`` on a container port named ``metrics``; the pod template carries the
conventional ``prometheus.io/*`` annotations (for Prometheus' Kubernetes pod discovery and most
agents) and a label that the headless ``<pool>-metrics`` Service selects, so a ServiceMonitor, or
a plain ``endpoints`` discovery, finds every router and worker of the pool through one Service.
"""

from __future__ import annotations

from ..spec import JSON, Pool
from .common import POOL_LABEL, Names, metadata

METRICS_LABEL = "snakepit.dev/metrics"
METRICS = "metrics"


def metrics_args(pool: Pool) -> list[str]:
    metrics = pool.spec.metrics
    return ["--metrics-port", str(metrics.port)] if metrics.enabled else []


def metrics_ports(pool: Pool) -> list[JSON]:
    metrics = pool.spec.metrics
    if not metrics.enabled:
        return []
    return [{"name": METRICS, "containerPort": metrics.port, "protocol": "TCP"}]


def metrics_annotations(pool: Pool) -> dict[str, str]:
    metrics = pool.spec.metrics
    if not metrics.enabled:
        return {}
    return {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(metrics.port),
        "prometheus.io/path": "/metrics",
    }


def metrics_labels(pool: Pool) -> dict[str, str]:
    return {METRICS_LABEL: "true"} if pool.spec.metrics.enabled else {}


def metrics_ingress(pool: Pool) -> list[JSON]:
    """A NetworkPolicy rule: anyone may scrape (Prometheus runs in some other namespace)."""
    metrics = pool.spec.metrics
    if not metrics.enabled:
        return []
    return [{"ports": [{"protocol": "TCP", "port": metrics.port}]}]


def build_metrics_service(pool: Pool) -> JSON:
    """Headless Service over every router and worker pod of the pool, port ``metrics``."""
    name = f"{Names(pool.name).pool}-metrics"
    meta = metadata(pool, name, METRICS)
    meta["labels"][METRICS_LABEL] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "clusterIP": "None",
            "selector": {POOL_LABEL: pool.name, METRICS_LABEL: "true"},
            "ports": [
                {
                    "name": METRICS,
                    "port": pool.spec.metrics.port,
                    "targetPort": METRICS,
                    "protocol": "TCP",
                }
            ],
        },
    }
