"""What ``spec.auth`` adds to a pool's pods (docs/security.md, "Identity"), as pure functions.

Routers get the flags that turn authentication on, the tokens Secret (if any) and the ticket
signing key, each mounted read-only; workers get only the key's public half, from the same
Secret by ``secretKeyRef`` (the private key is never in a worker pod). The signing key Secret is
created once by the reconciler (``build_ticket_secret``), like the store password: re-running a
pass must not rotate it. The kubelet updates a mounted tokens Secret in place and the router
reads the file again when it changes, so editing the Secret rotates tokens without a restart.
"""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ...security.tickets import new_private_key, private_key_pem, public_key_text
from ..spec import JSON, Pool
from .common import ROUTER, Names, metadata

TOKENS_DIR = "/etc/snakepit/tokens"
TICKET_DIR = "/etc/snakepit/ticket"
TOKENS_KEY = "tokens"
PRIVATE_KEY = "key.pem"
PUBLIC_KEY = "public"


def ticket_secret_name(pool: Pool) -> str:
    return f"{Names(pool.name).pool}-ticket-key"


def ticket_audience(pool: Pool) -> str:
    """The pool's name in its tickets: a ticket of one pool is refused by every other."""
    return f"{pool.namespace}.{pool.name}"


def build_ticket_secret(pool: Pool, key: Ed25519PrivateKey | None = None) -> JSON:
    """The pool's Ed25519 ticket key, a new one unless ``key`` (created with POST once, never
    applied). ``public`` holds the public half as ``ed25519:BASE64``, what workers read."""
    key = key or new_private_key()
    public = public_key_text(key.public_key())
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(pool, ticket_secret_name(pool), ROUTER),
        "type": "Opaque",
        "immutable": True,
        "data": {
            PRIVATE_KEY: base64.b64encode(private_key_pem(key)).decode(),
            PUBLIC_KEY: base64.b64encode(public.encode()).decode(),
        },
    }


def router_auth_args(pool: Pool) -> list[str]:
    auth = pool.spec.auth
    if not auth.enabled:
        return []
    args = [
        "--ticket-key",
        f"{TICKET_DIR}/{PRIVATE_KEY}",
        "--ticket-audience",
        ticket_audience(pool),
    ]
    if auth.tokens_secret:
        args += ["--auth-tokens", f"{TOKENS_DIR}/{TOKENS_KEY}"]
    if auth.service_accounts:
        args += ["--token-audience", auth.audience]
    for flag, values in (
        ("--allow-service-account", auth.service_accounts),
        ("--admin", auth.admins),
        ("--allow-direct", auth.direct_mode),
    ):
        for value in values:
            args += [flag, value]
    return args


# Secret files are owned by root; the router runs as a non-root user without an fsGroup, so
# 0400 would be unreadable to it (the router then fails at start). Only the router's one
# container mounts these volumes, as with the TLS Secret (builders/tls.py).
_READABLE = 0o444


def router_auth_volumes(pool: Pool) -> tuple[list[JSON], list[JSON]]:
    """(volumeMounts, volumes) of a router pod: the signing key and the tokens file."""
    auth = pool.spec.auth
    if not auth.enabled:
        return [], []
    mounts = [{"name": "ticket-key", "mountPath": TICKET_DIR, "readOnly": True}]
    volumes: list[JSON] = [
        {
            "name": "ticket-key",
            "secret": {
                "secretName": ticket_secret_name(pool),
                "items": [{"key": PRIVATE_KEY, "path": PRIVATE_KEY}],
                "defaultMode": _READABLE,
            },
        }
    ]
    if auth.tokens_secret:
        mounts.append({"name": "auth-tokens", "mountPath": TOKENS_DIR, "readOnly": True})
        volumes.append(
            {
                "name": "auth-tokens",
                "secret": {
                    "secretName": auth.tokens_secret,
                    "items": [{"key": TOKENS_KEY, "path": TOKENS_KEY}],
                    "defaultMode": _READABLE,
                },
            }
        )
    return mounts, volumes


def worker_auth_env(pool: Pool) -> list[JSON]:
    """Workers verify tickets with the public key only."""
    if not pool.spec.auth.enabled:
        return []
    return [
        {
            "name": "SNAKEPIT_TICKET_PUBLIC_KEY",
            "valueFrom": {"secretKeyRef": {"name": ticket_secret_name(pool), "key": PUBLIC_KEY}},
        },
        {"name": "SNAKEPIT_TICKET_AUDIENCE", "value": ticket_audience(pool)},
    ]
