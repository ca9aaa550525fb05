"""The worker Deployment and the headless Service whose EndpointSlices the router follows."""

from __future__ import annotations

from ..config import OperatorConfig
from ..spec import JSON, WORKER_PORT, Pool
from .auth import worker_auth_env
from .common import (
    STORE_SECRET_ANNOTATION,
    TMP_MOUNT,
    WORKER,
    Names,
    container_security_context,
    field_env,
    grpc_probes,
    labels,
    merge_env,
    metadata,
    pod_security_context,
    pull_secrets,
    resources_for,
    rolling_update,
    selector,
    spread_by_host,
    store_password_env,
    store_wiring,
    tmp_volume,
)
from .metrics import metrics_annotations, metrics_args, metrics_labels, metrics_ports
from .tls import (
    HEALTH_PORT,
    INTERNAL_PORT,
    tls_enabled,
    tls_mounts,
    tls_ports,
    tls_volumes,
    worker_tls_args,
)

# Time between SIGTERM and SIGKILL beyond the worker's own drain timeout: interpreter exit.
EXIT_MARGIN_SECONDS = 5
# A stopping worker keeps refusing calls this long after NOT_SERVING, until every router has
# seen it leave (its health stream, the EndpointSlice), so no call on the wire is cancelled.
DRAIN_LINGER_SECONDS = 2


def worker_args(pool: Pool) -> list[str]:
    spec = pool.spec
    names = Names(pool.name)
    return [
        "worker",
        "--adapter",
        spec.adapter,
        "--port",
        str(WORKER_PORT),
        "--concurrency",
        str(spec.worker_concurrency),
        "--store",
        store_wiring(pool).url,
        "--router",
        f"{names.router}:{INTERNAL_PORT if tls_enabled(pool) else spec.router.port}",
        "--drain-timeout",
        str(spec.drain_timeout_seconds),
        "--drain-linger",
        str(DRAIN_LINGER_SECONDS),
        "--session-ttl",
        str(spec.session.ttl_seconds),
        *metrics_args(pool),
        "--max-call-seconds",
        str(spec.max_call_seconds),
        *(worker_tls_args() if tls_enabled(pool) else []),
    ]


def build_worker_deployment(
    pool: Pool, config: OperatorConfig, store_secret_uid: str | None = None
) -> JSON:
    """Workers roll one surge pod at a time; each gets the drain timeout plus exit margin."""
    spec = pool.spec
    overrides = spec.pod_template
    annotations = {**overrides.annotations, **metrics_annotations(pool)}
    if store_secret_uid:
        # A regenerated password Secret must restart every pod that holds the old password.
        annotations[STORE_SECRET_ANNOTATION] = store_secret_uid
    container: JSON = {
        "name": "worker",
        "image": spec.image or config.worker_image,
        "imagePullPolicy": spec.image_pull_policy,
        "command": ["snakepit"],
        "args": worker_args(pool),
        "env": merge_env(
            [
                field_env("POD_NAME", "metadata.name"),
                field_env("POD_NAMESPACE", "metadata.namespace"),
                *store_password_env(store_wiring(pool)),
                *worker_auth_env(pool),
            ],
            spec.env,
        ),
        "ports": [
            {"name": "grpc", "containerPort": WORKER_PORT, "protocol": "TCP"},
            *metrics_ports(pool),
            *tls_ports(pool),
        ],
        **grpc_probes(HEALTH_PORT if tls_enabled(pool) else WORKER_PORT),
        "securityContext": container_security_context(),
        "volumeMounts": [TMP_MOUNT, *tls_mounts(pool)],
    }
    if spec.env_from:
        container["envFrom"] = spec.env_from
    container["resources"] = resources_for(WORKER, spec.resources)
    pod_spec: JSON = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": (
            spec.drain_timeout_seconds + DRAIN_LINGER_SECONDS + EXIT_MARGIN_SECONDS
        ),
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [tmp_volume(WORKER), *tls_volumes(pool)],
        "topologySpreadConstraints": overrides.topology_spread_constraints
        or spread_by_host(pool, WORKER),
    }
    if overrides.service_account_name:
        pod_spec["serviceAccountName"] = overrides.service_account_name
    if overrides.priority_class_name:
        pod_spec["priorityClassName"] = overrides.priority_class_name
    if overrides.node_selector:
        pod_spec["nodeSelector"] = overrides.node_selector
    if overrides.tolerations:
        pod_spec["tolerations"] = overrides.tolerations
    if overrides.affinity:
        pod_spec["affinity"] = overrides.affinity
    secrets = pull_secrets([*overrides.image_pull_secrets, *config.image_pull_secrets])
    if secrets:
        pod_spec["imagePullSecrets"] = secrets
    template_meta: JSON = {
        "labels": {**overrides.labels, **labels(pool, WORKER), **metrics_labels(pool)}
    }
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(pool, Names(pool.name).workers, WORKER),
        "spec": {
            "replicas": pool.worker_replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector(pool, WORKER)},
            "strategy": rolling_update(),
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


def build_worker_service(pool: Pool) -> JSON:
    """Headless, ready endpoints only: the router's EndpointSlice watch is the worker list."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(pool, Names(pool.name).workers, WORKER),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": False,
            "selector": selector(pool, WORKER),
            "ports": [
                {"name": "grpc", "port": WORKER_PORT, "targetPort": "grpc", "protocol": "TCP"}
            ],
        },
    }
