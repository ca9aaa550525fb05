"""Pure functions from a pool to the Kubernetes objects it should own (no I/O anywhere here).

``build_children`` is the whole desired state except the store password Secret, which is
created once (``build_store_secret``) instead of being applied on every pass.
"""

from __future__ import annotations

from ..config import OperatorConfig
from ..spec import JSON, Pool
from .common import (
    COMPONENT_LABEL,
    MANAGED_BY,
    POOL_LABEL,
    ROUTER,
    STORE,
    WORKER,
    Names,
    labels,
    selector,
    selector_string,
    store_wiring,
)
from .metrics import build_metrics_service
from .policy import (
    build_pdb,
    build_router_network_policy,
    build_store_network_policy,
    build_worker_network_policy,
)
from .router import (
    build_router_deployment,
    build_router_role,
    build_router_role_binding,
    build_router_service,
    build_router_service_account,
)
from .store import (
    build_store_secret,
    build_store_service,
    build_store_statefulset,
    new_password,
)
from .workers import build_worker_deployment, build_worker_service

ChildKey = tuple[str, str, str]  # (apiVersion, kind, name)


def child_key(obj: JSON) -> ChildKey:
    return (str(obj["apiVersion"]), str(obj["kind"]), str(obj["metadata"]["name"]))


def build_children(
    pool: Pool, config: OperatorConfig, store_secret_uid: str | None = None
) -> list[JSON]:
    """Every applied child, in an order where what a pod needs exists before the pod.

    ``store_secret_uid`` is the uid of the managed store's password Secret, stamped on pod
    templates so that a regenerated Secret rolls every pod holding the old password.
    """
    managed = pool.spec.session_store.managed
    children: list[JSON] = [
        build_router_service_account(pool),
        build_router_role(pool),
        build_router_role_binding(pool),
    ]
    if managed:
        children += [
            build_store_service(pool),
            build_store_statefulset(pool, config, store_secret_uid),
        ]
    children += [
        build_worker_service(pool),
        build_router_service(pool),
        build_worker_deployment(pool, config, store_secret_uid),
        build_router_deployment(pool, config, store_secret_uid),
        build_pdb(pool, WORKER),
        build_pdb(pool, ROUTER),
    ]
    if pool.spec.metrics.enabled:
        children.append(build_metrics_service(pool))
    if pool.spec.network_policy.enabled:
        children.append(build_worker_network_policy(pool))
        children.append(build_router_network_policy(pool, config))
        if managed:
            children.append(build_store_network_policy(pool))
    return children


__all__ = [
    "COMPONENT_LABEL",
    "MANAGED_BY",
    "POOL_LABEL",
    "ROUTER",
    "STORE",
    "WORKER",
    "ChildKey",
    "Names",
    "build_children",
    "build_store_secret",
    "child_key",
    "labels",
    "new_password",
    "selector",
    "selector_string",
    "store_wiring",
]
