"""kopf handlers: configure kopf, and route pool and child watch events to the controller.

Only low-level event handlers are used. kopf's create/update handlers would store a diff
base annotation on every pool, and its timers and daemons would put a finalizer on every pool
(so pools could not be deleted while the operator is down); neither is needed when each pass
recomputes everything from the spec and owner references let the garbage collector delete.
"""

from __future__ import annotations

from typing import Any

import kopf

from .builders import MANAGED_BY, POOL_LABEL
from .controller import Controller
from .settings import configure
from .spec import GROUP, PLURAL, VERSION

# Every kind the operator applies, watched so a change or deletion re-reconciles its pool.
CHILD_RESOURCES: tuple[tuple[str, str, str], ...] = (
    ("apps", "v1", "deployments"),
    ("apps", "v1", "statefulsets"),
    ("", "v1", "services"),
    ("", "v1", "serviceaccounts"),
    ("rbac.authorization.k8s.io", "v1", "roles"),
    ("rbac.authorization.k8s.io", "v1", "rolebindings"),
    ("policy", "v1", "poddisruptionbudgets"),
    ("networking.k8s.io", "v1", "networkpolicies"),
)
CHILD_LABELS: dict[str, Any] = {
    "app.kubernetes.io/managed-by": MANAGED_BY,
    POOL_LABEL: kopf.PRESENT,
}


def build_registry(controller: Controller, clusterwide: bool) -> Any:
    registry = kopf.OperatorRegistry()

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        """Same credentials as our API client: in-cluster token, else the kubeconfig."""
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    def startup(settings: Any, **_: Any) -> None:
        configure(settings, clusterwide)

    # The event handlers are coroutines on purpose: kopf runs plain functions in a thread pool,
    # and the controller's work queue wakes its workers with an asyncio.Event, which is only safe
    # to set from the event loop. Both handlers are quick and never block.
    @kopf.on.event(GROUP, VERSION, PLURAL, registry=registry)
    async def pool_event(type: str | None, body: Any, **_: Any) -> None:
        controller.on_pool_event(type, body)

    async def child_event(type: str | None, body: Any, **_: Any) -> None:
        controller.on_child_event(type, body)

    for group, version, plural in CHILD_RESOURCES:
        kopf.on.event(
            group, version, plural, id=f"child-{plural}", labels=CHILD_LABELS, registry=registry
        )(child_event)

    @kopf.on.probe(id="queued", registry=registry)
    def queued(**_: Any) -> int:
        return len(controller.queue)

    return registry
