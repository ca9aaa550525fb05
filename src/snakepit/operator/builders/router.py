"""The router Deployment, its Service, and the identity that lets it read EndpointSlices."""

from __future__ import annotations

from ..config import OperatorConfig
from ..spec import JSON, ROUTER_PORT, Pool
from .auth import router_auth_args, router_auth_volumes
from .common import (
    ROUTER,
    STORE_SECRET_ANNOTATION,
    TMP_MOUNT,
    Names,
    container_security_context,
    field_env,
    grpc_probes,
    labels,
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
    router_tls_args,
    tls_enabled,
    tls_mounts,
    tls_ports,
    tls_volumes,
)

# `snakepit router` waits this long for in-flight calls after SIGTERM (router/main.py).
ROUTER_DRAIN_SECONDS = 10
EXIT_MARGIN_SECONDS = 5

# The only API access a router needs; the operator holds the same rule so it may grant it.
ENDPOINTSLICE_RULE: JSON = {
    "apiGroups": ["discovery.k8s.io"],
    "resources": ["endpointslices"],
    "verbs": ["get", "list", "watch"],
}


# spec.limits field -> the router flag it sets.
_LIMIT_FLAGS = {
    "max_value_bytes": "--max-value-bytes",
    "max_parsed_value_bytes": "--max-parsed-value-bytes",
    "max_session_bytes": "--max-session-bytes",
    "max_variables_per_session": "--max-variables",
    "max_metadata_bytes": "--max-metadata-bytes",
    "max_session_ttl_seconds": "--max-session-ttl",
    "max_watchers": "--max-watchers",
    "max_watchers_per_session": "--max-watchers-per-session",
    "max_sessions_per_principal": "--max-sessions-per-principal",
    "max_calls_per_principal": "--max-calls-per-principal",
    "max_store_calls_per_principal": "--max-store-calls-per-principal",
    "store_call_rate_per_principal": "--store-call-rate-per-principal",
    "value_helpers": "--value-helpers",
    "max_streams_per_connection": "--max-streams-per-connection",
}


def router_data_path(pool: Pool) -> str:
    """``--data-path`` for the router pods, as the spec says: the router itself falls back to
    Python for what HAProxy cannot do (strict affinity: router/dataplane.py). An autoscaled
    pool may use either: both report their queue to the autoscaler, and HAProxy hands a call
    that finds no worker to the Python router, which holds it while the pool wakes from zero."""
    return pool.spec.router.data_path


def router_args(pool: Pool) -> list[str]:
    spec = pool.spec
    limits = [
        word
        for attr, flag in _LIMIT_FLAGS.items()
        if (value := getattr(spec.limits, attr)) is not None
        for word in (flag, str(value))
    ]
    return [
        "router",
        "--port",
        str(ROUTER_PORT),
        "--workers-service",
        Names(pool.name).workers,
        "--worker-concurrency",
        str(spec.worker_concurrency),
        "--session-ttl",
        str(spec.session.ttl_seconds),
        "--max-sessions",
        str(spec.session.max_sessions),
        "--data-path",
        router_data_path(pool),
        *metrics_args(pool),
        *limits,
        *(word for name in spec.pool_tool_principals for word in ("--allow-pool-tools", name)),
        *(router_tls_args() if tls_enabled(pool) else []),
        *router_auth_args(pool),
    ]


def build_router_deployment(
    pool: Pool, config: OperatorConfig, store_secret_uid: str | None = None
) -> JSON:
    spec = pool.spec
    names = Names(pool.name)
    wiring = store_wiring(pool)
    auth_mounts, auth_volumes = router_auth_volumes(pool)
    container: JSON = {
        "name": "router",
        "image": config.router_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["snakepit"],
        "args": router_args(pool),
        "env": [
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            # Other replicas forward hosted-tool calls to this pod's address (docs/architecture.md).
            field_env("POD_IP", "status.podIP"),
            {"name": "SNAKEPIT_STORE_URL", "value": wiring.url},
            *store_password_env(wiring),
            # Tracing is configured once per pool: the OTEL_* variables of spec.env reach the
            # routers too, so their spans join the workers' in the same backend.
            *(e for e in spec.env if str(e.get("name", "")).startswith("OTEL_")),
        ],
        "ports": [
            {"name": "grpc", "containerPort": ROUTER_PORT, "protocol": "TCP"},
            *metrics_ports(pool),
            *tls_ports(pool, internal=True),
        ],
        **grpc_probes(HEALTH_PORT if tls_enabled(pool) else ROUTER_PORT),
        "securityContext": container_security_context(),
        "volumeMounts": [TMP_MOUNT, *tls_mounts(pool), *auth_mounts],
    }
    container["resources"] = resources_for(ROUTER, spec.router.resources)
    pod_spec: JSON = {
        "serviceAccountName": names.router,
        "automountServiceAccountToken": True,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": ROUTER_DRAIN_SECONDS + EXIT_MARGIN_SECONDS,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [tmp_volume(ROUTER), *tls_volumes(pool), *auth_volumes],
        "topologySpreadConstraints": spread_by_host(pool, ROUTER),
    }
    if config.image_pull_secrets:
        pod_spec["imagePullSecrets"] = pull_secrets(config.image_pull_secrets)
    template_meta: JSON = {"labels": {**labels(pool, ROUTER), **metrics_labels(pool)}}
    annotations = metrics_annotations(pool)
    if store_secret_uid:
        annotations[STORE_SECRET_ANNOTATION] = store_secret_uid
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(pool, names.router, ROUTER),
        "spec": {
            "replicas": spec.router.replicas,
            "revisionHistoryLimit": 5,
            "selector": {"matchLabels": selector(pool, ROUTER)},
            "strategy": rolling_update(),
            "template": {"metadata": template_meta, "spec": pod_spec},
        },
    }


def build_router_service(pool: Pool) -> JSON:
    router = pool.spec.router
    port: JSON = {"name": "grpc", "port": router.port, "targetPort": "grpc", "protocol": "TCP"}
    if router.node_port is not None and router.service_type != "ClusterIP":
        port["nodePort"] = router.node_port
    ports = [port]
    if tls_enabled(pool):
        # Workers' ctx.call_tool: mutual TLS with the pool CA (builders/tls.py).
        ports.append(
            {"name": "internal", "port": INTERNAL_PORT, "targetPort": "internal", "protocol": "TCP"}
        )
    spec: JSON = {"type": router.service_type, "selector": selector(pool, ROUTER), "ports": ports}
    if router.service_type == "LoadBalancer":  # spec.py refuses one without ranges
        spec["loadBalancerSourceRanges"] = list(router.load_balancer_source_ranges)
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(
            pool, Names(pool.name).router, ROUTER, annotations=router.service_annotations
        ),
        "spec": spec,
    }


def build_router_service_account(pool: Pool) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(pool, Names(pool.name).router, ROUTER),
    }


def build_router_role(pool: Pool) -> JSON:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": metadata(pool, Names(pool.name).router, ROUTER),
        "rules": [ENDPOINTSLICE_RULE],
    }


def build_router_role_binding(pool: Pool) -> JSON:
    name = Names(pool.name).router
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": metadata(pool, name, ROUTER),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": pool.namespace}],
    }
