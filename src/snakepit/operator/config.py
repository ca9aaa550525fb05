"""Operator-wide settings that come from its environment (set by the Helm chart)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_WORKER_IMAGE = "snakepit/worker:dev"
DEFAULT_ROUTER_IMAGE = "snakepit/operator:dev"
DEFAULT_REDIS_IMAGE = "snakepit/redis:dev"
FIELD_MANAGER = "snakepit-operator"


@dataclass(frozen=True)
class OperatorConfig:
    """Images the operator puts into pools whose spec does not name one.

    Router pods run the operator's own image (it carries ``snakepit router``), so a chart
    upgrade moves routers and operator to the same version together.
    """

    worker_image: str = DEFAULT_WORKER_IMAGE
    router_image: str = DEFAULT_ROUTER_IMAGE
    redis_image: str = DEFAULT_REDIS_IMAGE
    image_pull_policy: str = "IfNotPresent"
    image_pull_secrets: tuple[str, ...] = ()
    resync_seconds: float = 60.0
    # Seconds between two readings of an autoscaled pool's routers (a held call wakes it sooner).
    autoscale_period: float = 1.0
    # Where the operator's own pods run and the labels that select them (set by the chart): an
    # autoscaled pool's router NetworkPolicy admits them, since the autoscaler reads each
    # router's load over gRPC. Empty when unknown (the operator runs outside the cluster).
    namespace: str = ""
    pod_labels: tuple[tuple[str, str], ...] = ()
    # The chart's ClusterRoleBinding of its TokenReview ClusterRole, whose subjects the operator
    # keeps equal to the routers that review tokens (builders/tokenreview.py); "": none.
    tokenreview_binding: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> OperatorConfig:
        env = os.environ if env is None else env
        secrets = env.get("SNAKEPIT_IMAGE_PULL_SECRETS", "")
        return cls(
            worker_image=env.get("SNAKEPIT_WORKER_IMAGE") or DEFAULT_WORKER_IMAGE,
            router_image=env.get("SNAKEPIT_ROUTER_IMAGE") or DEFAULT_ROUTER_IMAGE,
            redis_image=env.get("SNAKEPIT_REDIS_IMAGE") or DEFAULT_REDIS_IMAGE,
            image_pull_policy=env.get("SNAKEPIT_IMAGE_PULL_POLICY") or "IfNotPresent",
            image_pull_secrets=tuple(s.strip() for s in secrets.split(",") if s.strip()),
            resync_seconds=float(env.get("SNAKEPIT_RESYNC_SECONDS") or 60.0),
            autoscale_period=float(env.get("SNAKEPIT_AUTOSCALE_PERIOD") or 1.0),
            namespace=env.get("POD_NAMESPACE", ""),
            pod_labels=_labels(env.get("SNAKEPIT_OPERATOR_POD_LABELS", "")),
            tokenreview_binding=env.get("SNAKEPIT_TOKENREVIEW_BINDING", ""),
        )

    def operator_peer(self) -> dict[str, object] | None:
        """The NetworkPolicy peer that is this operator's pods, or None when unknown."""
        if not self.namespace or not self.pod_labels:
            return None
        return {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": self.namespace}},
            "podSelector": {"matchLabels": dict(self.pod_labels)},
        }


def _labels(text: str) -> tuple[tuple[str, str], ...]:
    """``k=v,k2=v2`` (a label selector of equalities, as kubectl writes it) as sorted pairs."""
    pairs = (item.split("=", 1) for item in text.split(",") if "=" in item)
    return tuple(sorted((k.strip(), v.strip()) for k, v in pairs))
