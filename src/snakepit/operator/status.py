"""A pool's status from its children's status: Ready, Progressing and Degraded conditions.

Pure functions: the reconciler passes the objects the API server returned from its apply
calls (so the status reflects this very pass) and the previous status, and gets back the new
status plus the condition transitions worth a Kubernetes Event.

Semantics (kstatus-like): ``Ready`` means the pool can serve calls now (a router available,
a worker ready, the managed store ready); ``Progressing`` is True while any child is still
rolling out or waiting for its pods to become available (what ``kubectl rollout status``
waits for) and False once all are complete; ``Degraded`` is True when something needs a
human: an apply the API server refused, a rollout past its deadline, or pods that cannot be
created.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .builders import Names, selector_string
from .builders.common import WORKER
from .builders.tls import CERTS_SECRET
from .spec import JSON, Pool

READY, PROGRESSING, DEGRADED = "Ready", "Progressing", "Degraded"
# Written by the autoscaler (operator/autoscaler.py), carried over by every reconcile pass.
AUTOSCALER_FIELDS = ("desiredReplicas", "lastScaleTime", "lastScaleReason")
CONDITION_TYPES = (READY, PROGRESSING, DEGRADED)
MAX_MESSAGE = 1024


@dataclass(frozen=True)
class Problem:
    """Something that went wrong in this pass, e.g. ("ApplyFailed", "Deployment x: ...")."""

    reason: str
    message: str


@dataclass(frozen=True)
class Observed:
    """The children as the API server returned them in this pass (None: absent or failed)."""

    workers: JSON | None = None
    router: JSON | None = None
    store: JSON | None = None
    router_service: JSON | None = None
    problems: Sequence[Problem] = field(default_factory=tuple)


@dataclass(frozen=True)
class Transition:
    """A condition whose status changed in this pass (``previous`` None: first time set)."""

    type: str
    status: str
    reason: str
    message: str
    previous: str | None = None


def event_for(t: Transition) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event a transition deserves, or None for noise.

    A new pool starting out not ready and not degraded is expected, not news.
    """
    if t.type == READY:
        if t.status == "True":
            return "Normal", t.reason, f"pool is ready: {t.message}"
        if t.previous is None:
            return None
        return "Warning", t.reason, f"pool is no longer ready: {t.message}"
    if t.type == DEGRADED:
        if t.status == "True":
            return "Warning", t.reason, t.message
        if t.previous is None:
            return None
        return "Normal", "Recovered", "the pool is no longer degraded"
    return "Normal", t.reason, t.message


@dataclass(frozen=True)
class Rollout:
    """Progress of one Deployment or StatefulSet toward its spec."""

    component: str
    desired: int
    current: int
    updated: int
    ready: int
    available: int
    observed: bool
    stuck: str | None = None
    failure: str | None = None

    @property
    def complete(self) -> bool:
        return (
            self.observed
            and self.current == self.desired
            and self.updated >= self.desired
            and self.available >= self.desired
        )

    @property
    def rolling(self) -> bool:
        """A new spec is still replacing pods (as opposed to pods not being available yet)."""
        return not self.observed or self.updated < self.desired or self.current > self.desired

    def describe(self) -> str:
        if not self.observed:
            return f"{self.component}: waiting for its controller"
        return (
            f"{self.component}: {self.updated}/{self.desired} updated, "
            f"{self.available}/{self.desired} available"
        )


def rollout(component: str, obj: Mapping[str, Any]) -> Rollout:
    """Read a Deployment's or StatefulSet's status the way ``kubectl rollout status`` does."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    st = obj.get("status") or {}
    desired = int(spec.get("replicas", 1))
    stuck = failure = None
    for cond in st.get("conditions") or ():
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            stuck = str(cond.get("message") or "progress deadline exceeded")
        if cond.get("type") == "ReplicaFailure" and cond.get("status") == "True":
            failure = str(cond.get("message") or cond.get("reason") or "replica failure")
    ready = int(st.get("readyReplicas", 0))
    updated = int(st.get("updatedReplicas", 0))
    if obj.get("kind") == "StatefulSet" and st.get("currentRevision") != st.get("updateRevision"):
        updated = min(updated, desired - 1)  # a revision change is still rolling
    return Rollout(
        component=component,
        desired=desired,
        current=int(st.get("replicas", 0)),
        updated=updated,
        ready=ready,
        available=int(st.get("availableReplicas", ready)),
        observed=int(st.get("observedGeneration", 0)) >= int(meta.get("generation", 1)),
        stuck=stuck,
        failure=failure,
    )


def endpoint(pool: Pool) -> str:
    """The router's in-cluster address, what clients in the cluster pass as ``target``."""
    return f"{Names(pool.name).router}.{pool.namespace}.svc:{pool.spec.router.port}"


def external_endpoint(service: Mapping[str, Any] | None) -> str | None:
    """A LoadBalancer's published address, once the cloud provider has assigned one."""
    if not service:
        return None
    ingress = ((service.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
    ports = (service.get("spec") or {}).get("ports") or [{}]
    for entry in ingress:
        host = entry.get("hostname") or entry.get("ip")
        if host:
            return f"{host}:{ports[0].get('port')}"
    return None


def _ready(pool: Pool, rollouts: Mapping[str, Rollout | None]) -> tuple[str, str, str]:
    workers, router = rollouts["workers"], rollouts["router"]
    if workers is None or router is None:
        return "False", "NotCreated", "the worker or router Deployment does not exist yet"
    if router.available == 0:
        return "False", "RouterUnavailable", f"0/{router.desired} router pods available"
    store = rollouts.get("store")
    if pool.spec.session_store.managed and (store is None or store.ready == 0):
        return "False", "StoreUnavailable", "the managed Redis is not ready"
    if workers.desired == 0:
        if pool.spec.autoscaling is not None:
            return (
                "False",
                "ScaledToZero",
                "idle: the autoscaler stopped every worker (a call wakes it)",
            )
        return "False", "ScaledToZero", "spec.replicas is 0"
    if workers.ready == 0:
        return "False", "NoReadyWorkers", f"0/{workers.desired} workers ready"
    return (
        "True",
        "Available",
        f"{workers.ready}/{workers.desired} workers ready, "
        f"{router.available}/{router.desired} routers available",
    )


def _progressing(rollouts: Sequence[Rollout]) -> tuple[str, str, str]:
    stuck = [r for r in rollouts if r.stuck]
    if stuck:
        return (
            "False",
            "ProgressDeadlineExceeded",
            "; ".join(f"{r.component}: {r.stuck}" for r in stuck),
        )
    pending = [r for r in rollouts if not r.complete]
    if pending:
        rolling = any(r.rolling for r in pending)
        reason = "RollingOut" if rolling else "WaitingForPods"
        return "True", reason, "; ".join(r.describe() for r in pending)
    return "False", "RolloutComplete", "every component runs the current spec"


def _degraded(problems: Sequence[Problem], rollouts: Sequence[Rollout]) -> tuple[str, str, str]:
    if problems:
        return "True", problems[0].reason, "; ".join(p.message for p in problems)
    stuck = [r for r in rollouts if r.stuck]
    if stuck:
        return (
            "True",
            "ProgressDeadlineExceeded",
            "; ".join(f"{r.component}: {r.stuck}" for r in stuck),
        )
    failed = [r for r in rollouts if r.failure]
    if failed:
        return "True", "ReplicaFailure", "; ".join(f"{r.component}: {r.failure}" for r in failed)
    return "False", "AsExpected", "no problem found"


def merge_conditions(
    previous: Sequence[Mapping[str, Any]],
    computed: Mapping[str, tuple[str, str, str]],
    generation: int,
    now: str,
) -> tuple[list[JSON], list[Transition]]:
    """metav1.Condition semantics: lastTransitionTime moves only when the status flips."""
    before = {str(c.get("type")): c for c in previous}
    conditions: list[JSON] = []
    transitions: list[Transition] = []
    for ctype in CONDITION_TYPES:
        status, reason, message = computed[ctype]
        message = message[:MAX_MESSAGE]
        old = before.get(ctype)
        changed = old is None or old.get("status") != status
        conditions.append(
            {
                "type": ctype,
                "status": status,
                "reason": reason,
                "message": message,
                "observedGeneration": generation,
                "lastTransitionTime": now
                if changed or old is None
                else old.get("lastTransitionTime", now),
            }
        )
        if changed:
            previous_status = None if old is None else str(old.get("status"))
            transitions.append(Transition(ctype, status, reason, message, previous_status))
    return conditions, transitions


def tls_status(pool: Pool) -> str:
    """``status.tls``: how the pool's hops are protected, where ``kubectl get`` shows it."""
    tls = pool.spec.tls
    if tls.operator_issued:
        return f"Issued by the operator (Secret {CERTS_SECRET})"
    if tls.enabled:
        return f"Secret {tls.secret_name}"
    return "Disabled (spec.tls.enabled: false)" if tls.explicit else "Disabled"


def auth_status(pool: Pool) -> JSON:
    """``status.auth``: whether callers must prove who they are, and who may (the default
    callers are the namespace's ServiceAccounts; an opt-out says it was one)."""
    auth = pool.spec.auth
    if not auth.enabled:
        return {"enabled": False, "reason": "spec.auth.enabled: false"}
    status: JSON = {
        "enabled": True,
        "callers": [f"serviceaccount {a}" for a in auth.service_accounts],
    }
    if auth.tokens_secret:
        status["callers"].append(f"tokens in Secret {auth.tokens_secret}")
    if auth.direct_mode:
        status["directMode"] = list(auth.direct_mode)
    return status


def compute_status(
    pool: Pool, observed: Observed, previous: Mapping[str, Any], now: str
) -> tuple[JSON, list[Transition]]:
    """The complete new ``status`` and the condition transitions since ``previous``."""
    rollouts: dict[str, Rollout | None] = {
        "workers": rollout("workers", observed.workers) if observed.workers else None,
        "router": rollout("router", observed.router) if observed.router else None,
        "store": rollout("store", observed.store) if observed.store else None,
    }
    present = [r for r in rollouts.values() if r is not None]
    conditions, transitions = merge_conditions(
        previous.get("conditions") or [],
        {
            READY: _ready(pool, rollouts),
            PROGRESSING: _progressing(present),
            DEGRADED: _degraded(observed.problems, present),
        },
        pool.generation,
        now,
    )
    workers = rollouts["workers"]
    status: JSON = {
        "observedGeneration": pool.generation,
        "replicas": workers.current if workers else 0,
        "readyReplicas": workers.ready if workers else 0,
        "selector": selector_string(pool, WORKER),
        "endpoint": endpoint(pool),
        "tls": tls_status(pool),
        "auth": auth_status(pool),
        "conditions": conditions,
    }
    external = external_endpoint(observed.router_service)
    if external:
        status["externalEndpoint"] = external
    if pool.spec.autoscaling is not None:
        status.update({k: previous[k] for k in AUTOSCALER_FIELDS if k in previous})
    return status, transitions


def status_patch(previous: Mapping[str, Any], new: Mapping[str, Any]) -> JSON:
    """JSON merge patch body turning ``previous`` into ``new`` ({} when nothing changed). A
    merge patch merges objects key by key, so a key gone from a nested object (``auth``'s
    ``callers`` once auth is turned off) is nulled there too, not left behind."""
    patch: JSON = {}
    for key, value in new.items():
        old = previous.get(key)
        if old == value:
            continue
        if isinstance(old, Mapping) and isinstance(value, Mapping):
            patch[key] = status_patch(old, value)
        else:
            patch[key] = value
    patch.update({k: None for k in previous if k not in new})
    return patch
