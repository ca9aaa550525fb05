"""TLS wiring of a pool's pods (``spec.tls``): the Secret mounted where the processes read it,
their TLS flags, the router's internal port, and probes that do not need TLS.

One certificate (the Secret named by ``spec.tls.secretName``, cert-manager's shape: tls.crt,
tls.key, ca.crt; without a name, the one the operator issues, under the pool's keys of
``CERTS_SECRET``, builders/certs.py) serves the whole pool: it names the pool (``POOL_NAME``, what members check
each other by), the router Service and the Redis Service (``certificate_names``). Whoever writes
the Secret renews it; the kubelet updates the mounted files and every process picks them up
without a restart (security/tls.py).
"""

from __future__ import annotations

from ...security.tls import CA_FILE, CERT_FILE, KEY_FILE, POOL_NAME
from ..spec import JSON, Pool
from .common import TLS_DIR, Names

TLS_VOLUME = "tls"
# The router's mutual-TLS port for its workers and peer routers, and the plaintext
# grpc.health.v1-only port of routers and workers (the kubelet's gRPC probes speak no TLS).
INTERNAL_PORT = 50053
HEALTH_PORT = 50054


def tls_enabled(pool: Pool) -> bool:
    return pool.spec.tls.enabled


# Where the operator keeps the certificates it issues, every pool's of the namespace under its
# own keys (builders/certs.py says why one Secret with a fixed name).
CERTS_SECRET = "snakepit-certs"


def leaf_keys(pool: Pool) -> dict[str, str]:
    """Key of the pool's leaf in ``CERTS_SECRET`` -> the file name its pods see."""
    return leaf_keys_named(pool.name)


def leaf_keys_named(pool_name: str) -> dict[str, str]:
    """``leaf_keys`` by the pool's name alone (a deleted pool has no spec to parse)."""
    return {f"{pool_name}.{name}": name for name in (CERT_FILE, KEY_FILE, CA_FILE)}


def certificate_names(pool: Pool) -> list[str]:
    """The names the pool's certificate must carry (its SANs)."""
    names = Names(pool.name)
    services = [
        f"{service}{suffix}"
        for service in (names.router, names.redis)
        for suffix in ("", f".{pool.namespace}", f".{pool.namespace}.svc",
                       f".{pool.namespace}.svc.cluster.local")
    ]  # fmt: skip
    return [POOL_NAME, *services, "localhost", "127.0.0.1"]


def tls_volumes(pool: Pool) -> list[JSON]:
    """The Secret as files readable by the container's non-root user (only it mounts them)."""
    if not tls_enabled(pool):
        return []
    secret: JSON = {"secretName": pool.spec.tls.secret_name, "defaultMode": 0o444}
    if pool.spec.tls.operator_issued:  # its own three keys only, under the usual file names
        items = [{"key": key, "path": path} for key, path in leaf_keys(pool).items()]
        secret = {"secretName": CERTS_SECRET, "items": items, "defaultMode": 0o444}
    return [{"name": TLS_VOLUME, "secret": secret}]


def tls_mounts(pool: Pool) -> list[JSON]:
    """Mounted as a directory (never subPath), so the kubelet's renewals reach the files."""
    if not tls_enabled(pool):
        return []
    return [{"name": TLS_VOLUME, "mountPath": TLS_DIR, "readOnly": True}]


def tls_ports(pool: Pool, *, internal: bool = False) -> list[JSON]:
    """Container ports TLS adds: the plaintext health port, and the router's internal one."""
    if not tls_enabled(pool):
        return []
    ports = [{"name": "health", "containerPort": HEALTH_PORT, "protocol": "TCP"}]
    if internal:
        ports.append({"name": "internal", "containerPort": INTERNAL_PORT, "protocol": "TCP"})
    return ports


def tls_file(name: str) -> str:
    return f"{TLS_DIR}/{name}"


def router_tls_args() -> list[str]:
    return [
        "--tls-cert", tls_file(CERT_FILE),
        "--tls-key", tls_file(KEY_FILE),
        "--pool-tls-dir", TLS_DIR,
        "--internal-port", str(INTERNAL_PORT),
        "--health-port", str(HEALTH_PORT),
    ]  # fmt: skip


def worker_tls_args() -> list[str]:
    return ["--pool-tls-dir", TLS_DIR, "--health-port", str(HEALTH_PORT)]


REDIS_TLS_ENV: JSON = {"name": "REDIS_TLS_DIR", "value": TLS_DIR}
REDIS_CLI_TLS = f"--tls --cacert {tls_file(CA_FILE)} "
