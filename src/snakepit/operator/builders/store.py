"""The managed session store: a one-replica Redis StatefulSet with AOF, its Service and Secret."""

from __future__ import annotations

import base64
import secrets

from ...store.acl import DEFAULT_ACL_USER, DISABLED_DEFAULT_USER_LINE, scope_rules
from ..config import OperatorConfig
from ..spec import JSON, REDIS_PORT, Pool
from .common import (
    STORE,
    STORE_SECRET_ANNOTATION,
    STORE_SECRET_KEY,
    TMP_MOUNT,
    Names,
    container_security_context,
    labels,
    metadata,
    pod_security_context,
    pull_secrets,
    quantity_bytes,
    resources_for,
    secret_env,
    selector,
    tmp_volume,
)
from .tls import REDIS_CLI_TLS, REDIS_TLS_ENV, tls_enabled, tls_mounts, tls_volumes

# Share of the container's memory limit Redis may fill with data; the rest is its own overhead
# (buffers, the AOF rewrite fork's copy-on-write pages).
MAXMEMORY_SHARE = 0.7
DEFAULT_MAXMEMORY = 700 * 2**20


def redis_maxmemory(resources: JSON) -> int:
    """``maxmemory`` in bytes for a Redis container with these resources."""
    limit = quantity_bytes((resources.get("limits") or {}).get("memory", ""))
    return int(limit * MAXMEMORY_SHARE) if limit else DEFAULT_MAXMEMORY


# Routers and workers log in as the ACL user ``snakepit`` (store/acl.py: only the store's
# commands, only its keys); the all-powerful ``default`` user is off, so nobody holding the
# password can CONFIG, FLUSHALL, DEBUG or ACL (off, yet keeping its permissions: Redis checks
# the transactions it replays from the AOF against them, see store/acl.py). The probes log in
# as ``snakepit`` too (PING).
# The password goes into a config file on the /tmp emptyDir, never into argv (visible in ps).
# It is checked first: a quote or newline in an adopted Secret would otherwise inject config
# directives. maxmemory with noeviction makes a full store refuse writes (the router answers
# RESOURCE_EXHAUSTED) instead of evicting sessions or being OOM-killed.
PASSWORD_CHARACTERS = "A-Za-z0-9_.~+/=-"
REDIS_SCRIPT = "\n".join(
    [
        "set -eu",
        "umask 077",
        'case "${REDIS_PASSWORD:-}" in',
        f'  ""|*[!{PASSWORD_CHARACTERS}]*)',
        "    echo 'snakepit: refusing to start: the store password must be non-empty and hold "
        f"only the characters {PASSWORD_CHARACTERS}' >&2",
        "    exit 64;;",
        "esac",
        'case "${REDIS_MAXMEMORY:-0}" in',
        "  *[!0-9]*) echo 'snakepit: REDIS_MAXMEMORY must be a number of bytes' >&2; exit 64;;",
        "esac",
        "{",
        f"  echo '{DISABLED_DEFAULT_USER_LINE}'",
        f"  printf 'user {DEFAULT_ACL_USER} reset on >%s {' '.join(scope_rules())}\\n' "
        '"$REDIS_PASSWORD"',
        "  printf 'maxmemory %s\\n' \"${REDIS_MAXMEMORY:-0}\"",
        "  echo 'maxmemory-policy noeviction'",
        # With spec.tls, TLS only: the plaintext port is off (REDIS_TLS_DIR is the operator's
        # constant mount path, never user input).
        '  if [ -n "${REDIS_TLS_DIR:-}" ]; then',
        "    echo 'port 0'",
        f"    echo 'tls-port {REDIS_PORT}'",
        '    echo "tls-cert-file $REDIS_TLS_DIR/tls.crt"',
        '    echo "tls-key-file $REDIS_TLS_DIR/tls.key"',
        '    echo "tls-ca-cert-file $REDIS_TLS_DIR/ca.crt"',
        "    echo 'tls-auth-clients optional'",
        # The reload loop's own user: CONFIG SET only, its password made here and never
        # leaving this container (not the pool's password, which may not allow CONFIG).
        "    reload_password=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \\n')",
        '    echo "user snakepit-tls-reload on >$reload_password +config|set"',
        "  else",
        f"    echo 'port {REDIS_PORT}'",
        "  fi",
        "  echo 'bind * -::*'",
        "  echo 'dir /data'",
        "  echo 'appendonly yes'",
        "  echo 'appendfsync everysec'",
        "  echo 'save \"\"'",
        "} > /tmp/redis.conf",
        '[ -n "${REDIS_TLS_DIR:-}" ] || exec redis-server /tmp/redis.conf',
        # With TLS, Redis reads its certificate only at start: a loop beside it asks it to
        # reload (CONFIG SET of the same files) when the mounted Secret changes. A pair caught
        # mid-renewal is refused by Redis and tried again on the next round.
        "redis-server /tmp/redis.conf &",
        "pid=$!",
        "trap 'kill -TERM $pid' TERM INT",
        'tls_files() { cat "$REDIS_TLS_DIR/tls.crt" "$REDIS_TLS_DIR/tls.key" '
        '"$REDIS_TLS_DIR/ca.crt" | cksum; }',
        "loaded=$(tls_files)",
        'while kill -0 "$pid" 2>/dev/null; do',
        '  sleep "${REDIS_TLS_RELOAD_SECONDS:-10}" & wait $! || true',
        "  now=$(tls_files)",
        '  if [ "$now" != "$loaded" ] && REDISCLI_AUTH="$reload_password" redis-cli '
        '--user snakepit-tls-reload --tls --cacert "$REDIS_TLS_DIR/ca.crt" '
        f"-h 127.0.0.1 -p {REDIS_PORT} CONFIG SET "
        'tls-cert-file "$REDIS_TLS_DIR/tls.crt" tls-key-file "$REDIS_TLS_DIR/tls.key" '
        'tls-ca-cert-file "$REDIS_TLS_DIR/ca.crt" | grep -q OK; then',
        '    loaded=$now; echo "snakepit: TLS certificate reloaded" >&2',
        "  fi",
        "done",
        'wait "$pid"',
    ]
)


def new_password() -> str:
    """URL-safe characters only, so it needs no quoting in a URL or a config file."""
    return secrets.token_urlsafe(32)


def build_store_secret(pool: Pool, password: str) -> JSON:
    """Created once with POST, never applied: re-running the reconcile must not rotate it.

    Immutable, so a rotation is an explicit delete; the operator then makes a new one and
    rolls every pod (their templates carry the Secret's uid).
    """
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(pool, Names(pool.name).store_secret, STORE),
        "type": "Opaque",
        "immutable": True,
        "data": {STORE_SECRET_KEY: base64.b64encode(password.encode()).decode()},
    }


def build_store_service(pool: Pool) -> JSON:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(pool, Names(pool.name).redis, STORE),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(pool, STORE),
            "ports": [
                {"name": "redis", "port": REDIS_PORT, "targetPort": "redis", "protocol": "TCP"}
            ],
        },
    }


def build_store_statefulset(
    pool: Pool, config: OperatorConfig, store_secret_uid: str | None = None
) -> JSON:
    """PVCs follow the StatefulSet (retention policy Delete), so deleting the pool frees them."""
    store = pool.spec.session_store
    names = Names(pool.name)
    password = secret_env("REDIS_PASSWORD", names.store_secret, STORE_SECRET_KEY)
    cli_auth = secret_env("REDISCLI_AUTH", names.store_secret, STORE_SECRET_KEY)
    resources = resources_for(STORE, store.resources)
    maxmemory = {"name": "REDIS_MAXMEMORY", "value": str(redis_maxmemory(resources))}
    tls = tls_enabled(pool)
    cli_tls = REDIS_CLI_TLS if tls else ""
    container: JSON = {
        "name": "redis",
        "image": store.image or config.redis_image,
        "imagePullPolicy": config.image_pull_policy,
        "command": ["sh", "-c", REDIS_SCRIPT],
        "env": [password, cli_auth, maxmemory, *([REDIS_TLS_ENV] if tls else [])],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT, "protocol": "TCP"}],
        "startupProbe": {
            "tcpSocket": {"port": "redis"},
            "periodSeconds": 2,
            "failureThreshold": 60,
        },
        "readinessProbe": {
            "exec": {
                "command": [
                    "sh",
                    "-c",
                    f"redis-cli --user {DEFAULT_ACL_USER} {cli_tls}-h 127.0.0.1 ping | grep -q PONG",
                ]
            },
            "periodSeconds": 5,
            "timeoutSeconds": 3,
        },
        "livenessProbe": {
            "tcpSocket": {"port": "redis"},
            "periodSeconds": 10,
            "failureThreshold": 6,
        },
        "securityContext": container_security_context(),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}, TMP_MOUNT, *tls_mounts(pool)],
        "resources": resources,
    }
    pod_spec: JSON = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 30,
        "securityContext": pod_security_context(fs_group=True),
        "containers": [container],
        "volumes": [tmp_volume(STORE), *tls_volumes(pool)],
    }
    if config.image_pull_secrets:
        pod_spec["imagePullSecrets"] = pull_secrets(config.image_pull_secrets)
    template_meta: JSON = {"labels": labels(pool, STORE)}
    if store_secret_uid:
        template_meta["annotations"] = {STORE_SECRET_ANNOTATION: store_secret_uid}
    claim_spec: JSON = {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": store.storage.size}},
    }
    if store.storage.storage_class_name is not None:
        claim_spec["storageClassName"] = store.storage.storage_class_name
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(pool, names.redis, STORE),
        "spec": {
            "replicas": 1,
            "serviceName": names.redis,
            "selector": {"matchLabels": selector(pool, STORE)},
            "updateStrategy": {"type": "RollingUpdate"},
            "persistentVolumeClaimRetentionPolicy": {
                "whenDeleted": "Delete",
                "whenScaled": "Retain",
            },
            "template": {"metadata": template_meta, "spec": pod_spec},
            "volumeClaimTemplates": [
                {"metadata": {"name": "data", "labels": labels(pool, STORE)}, "spec": claim_spec}
            ],
        },
    }
