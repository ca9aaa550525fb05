"""Pieces every child object shares: names, labels, ownership, pod hardening, probes, env."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ...store.acl import DEFAULT_ACL_USER
from ..spec import API_VERSION, JSON, KIND, REDIS_PORT, Pool

POOL_LABEL = "snakepit.dev/pool"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY = "snakepit-operator"
STORE_SECRET_ANNOTATION = "snakepit.dev/store-secret-uid"
STORE_SECRET_KEY = "password"
RUN_AS = 10001

WORKER, ROUTER, STORE = "worker", "router", "session-store"
# Where pods mount spec.tls.secretName (builders/tls.py), and the CA file in it.
TLS_DIR = "/etc/snakepit/tls"
TLS_CA_PATH = f"{TLS_DIR}/ca.crt"


@dataclass(frozen=True)
class Names:
    """Child object names, derived from the pool name (the CRD caps it so all of them fit)."""

    pool: str

    @property
    def workers(self) -> str:
        return f"{self.pool}-workers"

    @property
    def router(self) -> str:
        return f"{self.pool}-router"

    @property
    def redis(self) -> str:
        return f"{self.pool}-redis"

    @property
    def store_secret(self) -> str:
        return f"{self.pool}-redis-auth"


@dataclass(frozen=True)
class StoreWiring:
    """Where workers and routers find the session store, and the Secret key with its password."""

    url: str
    password_secret: str | None
    password_key: str


def store_wiring(pool: Pool) -> StoreWiring:
    store = pool.spec.session_store
    if store.managed:
        names = Names(pool.name)
        # The store's ACL user (store/acl.py); its password comes from the Secret.
        url = f"redis://{DEFAULT_ACL_USER}@{names.redis}:{REDIS_PORT}/0"
        if pool.spec.tls.enabled:
            # The managed Redis then speaks TLS only (builders/store.py); see builders/tls.py.
            url = f"rediss://{DEFAULT_ACL_USER}@{names.redis}:{REDIS_PORT}/0?ssl_ca_certs={TLS_CA_PATH}"
        return StoreWiring(url, names.store_secret, "password")
    ref = store.password_secret_ref
    return StoreWiring(
        url=store.url or "",
        password_secret=ref.name if ref else None,
        password_key=ref.key if ref else STORE_SECRET_KEY,
    )


def selector(pool: Pool, component: str) -> dict[str, str]:
    """The immutable part of the labels: what Deployments, Services and policies select on."""
    return {POOL_LABEL: pool.name, COMPONENT_LABEL: component}


def labels(pool: Pool, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "snakepit",
        "app.kubernetes.io/instance": pool.name,
        "app.kubernetes.io/managed-by": MANAGED_BY,
        **selector(pool, component),
    }


def selector_string(pool: Pool, component: str) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector(pool, component).items()))


def owner_reference(pool: Pool) -> JSON:
    """Controller reference: garbage collection deletes the child with its pool."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": pool.name,
        "uid": pool.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    pool: Pool, name: str, component: str, annotations: Mapping[str, str] | None = None
) -> JSON:
    meta: JSON = {
        "name": name,
        "namespace": pool.namespace,
        "labels": labels(pool, component),
        "ownerReferences": [owner_reference(pool)],
    }
    if annotations:
        meta["annotations"] = dict(annotations)
    return meta


def pod_security_context(fs_group: bool = False) -> JSON:
    context: JSON = {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    if fs_group:
        context["fsGroup"] = RUN_AS
        context["fsGroupChangePolicy"] = "OnRootMismatch"
    return context


def container_security_context() -> JSON:
    return {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


TMP_MOUNT: JSON = {"name": "tmp", "mountPath": "/tmp"}
# How much a pod may write to its /tmp emptyDir (node disk) before the kubelet evicts it.
TMP_SIZE = {WORKER: "1Gi", ROUTER: "64Mi", STORE: "64Mi"}

# Requests and limits for a pod whose spec gives none, so no pool runs unbounded on a node:
# no CPU limit (throttling hurts latency more than it protects), a memory limit always.
DEFAULT_RESOURCES: dict[str, JSON] = {
    WORKER: {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "2Gi"}},
    ROUTER: {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
    STORE: {"requests": {"cpu": "100m", "memory": "256Mi"}, "limits": {"memory": "1Gi"}},
}


def tmp_volume(component: str) -> JSON:
    return {"name": "tmp", "emptyDir": {"sizeLimit": TMP_SIZE[component]}}


def resources_for(component: str, given: Mapping[str, object]) -> JSON:
    """The spec's resources, or the component's defaults when the spec gives none."""
    return dict(given) if given else {k: dict(v) for k, v in DEFAULT_RESOURCES[component].items()}


_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def quantity_bytes(quantity: object) -> int | None:
    """Bytes of a Kubernetes memory quantity ("1Gi", "500M", "1024"); None if not one."""
    text = str(quantity).strip()
    for suffixes in (_BINARY, _DECIMAL):
        for suffix, factor in suffixes.items():
            if text.endswith(suffix) and text[: -len(suffix)].replace(".", "", 1).isdigit():
                return int(float(text[: -len(suffix)]) * factor)
    return int(text) if text.isdigit() else None


def grpc_probes(port: int) -> JSON:
    """Native gRPC probes on ``grpc.health.v1`` (with TLS on, ``port`` is the plaintext
    health-only port: the kubelet's gRPC probes speak no TLS).

    Startup allows five minutes for slow adapter imports (models); liveness is lenient (a busy
    worker still answers health checks, but a slow node should not get it killed); readiness
    is quick so a draining worker leaves the EndpointSlice fast.
    """
    return {
        "startupProbe": {"grpc": {"port": port}, "periodSeconds": 2, "failureThreshold": 150},
        "readinessProbe": {
            "grpc": {"port": port},
            "periodSeconds": 5,
            "timeoutSeconds": 3,
            "failureThreshold": 2,
        },
        "livenessProbe": {
            "grpc": {"port": port},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
    }


def field_env(name: str, path: str) -> JSON:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def secret_env(name: str, secret: str, key: str) -> JSON:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def store_password_env(wiring: StoreWiring) -> list[JSON]:
    if wiring.password_secret is None:
        return []
    return [secret_env("SNAKEPIT_STORE_PASSWORD", wiring.password_secret, wiring.password_key)]


def merge_env(ours: Iterable[JSON], users: Iterable[JSON]) -> list[JSON]:
    """Our variables first; a user variable of the same name replaces ours in place.

    Server-side apply keys ``env`` by name, so duplicates would be refused.
    """
    merged: dict[str, JSON] = {}
    for var in [*ours, *users]:
        merged[str(var["name"])] = dict(var)
    return list(merged.values())


def pull_secrets(names: Iterable[str]) -> list[JSON]:
    return [{"name": n} for n in dict.fromkeys(names)]


def spread_by_host(pool: Pool, component: str) -> list[JSON]:
    """Prefer one pod per node so a node failure takes out few workers; never blocks scheduling."""
    return [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": selector(pool, component)},
        }
    ]


def rolling_update() -> JSON:
    """One extra pod at a time and never one fewer: capacity holds during a rollout."""
    return {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
