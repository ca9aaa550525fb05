"""Operator-issued certificates (``spec.tls.enabled`` without ``secretName``), as pure functions.

Everything lives in two Secrets per namespace with fixed names, so the operator's RBAC names
them (``resourceNames``) and grants no read of any other Secret. Fixed names matter because a
``patch`` or ``update`` of a Secret answers with the whole Secret: holding either on every
Secret is holding ``get`` on every Secret, and renewing a per-pool Secret in place would need
exactly that.

- ``CA_SECRET`` (``snakepit-ca``): one CA per pool (keys ``<pool>.crt``, ``<pool>.key``),
  created the first time the pool needs a certificate and kept as long as the Secret is. A CA
  per pool, not one for the namespace, because members check each other by the CA and the name
  ``pool.snakepit.internal`` and a gRPC server checks a client certificate's chain, not its
  name: with one CA for the namespace a worker of one pool could call another pool's router.
  No pod mounts this Secret.
- ``CERTS_SECRET`` (``snakepit-certs``): each pool's leaf (``<pool>.tls.crt``,
  ``<pool>.tls.key``, ``<pool>.ca.crt``). A pool's pods mount only their own three keys, as
  ``tls.crt``, ``tls.key``, ``ca.crt`` (``certificate_items``): the same files a
  ``spec.tls.secretName`` Secret gives them, so everything else is unchanged.

A leaf names what ``certificate_names`` lists (the pool name members check, the router and
Redis Service DNS names), is valid ``spec.tls.certificateLifetime`` and is replaced once
``RENEW_FRACTION`` of that has passed. The kubelet updates mounted Secret files in place
(``items`` mounts too, unlike ``subPath``) and the processes reload them without a restart.
"""

from __future__ import annotations

import base64
import datetime
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from ...security.localca import BACKDATE, Issued, LocalCA
from ...security.tls import CA_FILE, CERT_FILE, KEY_FILE, POOL_NAME
from ..spec import JSON, Pool
from .carotation import rotation_keys
from .common import MANAGED_BY
from .tls import CERTS_SECRET, certificate_names, leaf_keys, leaf_keys_named

CA_SECRET = "snakepit-ca"
# A pool's CA outlives many leaves; it is rotated in steps (carotation.py).
CA_DAYS = 3650
# Renew once this share of a leaf's life has passed: a third of it is left for the kubelet to
# deliver the new files (about a minute) and for the operator to be down a while.
RENEW_FRACTION = 2 / 3


def ca_keys(pool: Pool) -> tuple[str, str]:
    return ca_keys_named(pool.name)


def ca_keys_named(pool_name: str) -> tuple[str, str]:
    return f"{pool_name}.crt", f"{pool_name}.key"


def forget_pool_patch(name: str, secret: JSON | None, pool_name: str) -> JSON | None:
    """The merge patch that drops a deleted pool's keys from the shared Secret ``name`` as
    read (``secret``), None when it holds none of them.

    Conditional on the version read: a pool of the same name created meanwhile may have added
    its new CA, which this must not remove (the caller reads the pool again after a 409).
    """
    data = (secret or {}).get("data") or {}
    if name == CA_SECRET:
        own = (*ca_keys_named(pool_name), *rotation_keys(pool_name).values())
    else:
        own = tuple(leaf_keys_named(pool_name))
    gone = {key: None for key in own if key in data}
    if not gone:
        return None
    version = (secret or {}).get("metadata", {}).get("resourceVersion")
    return {"metadata": {"resourceVersion": version}, "data": gone}


def namespace_secret(namespace: str, name: str, data: Mapping[str, str]) -> JSON:
    """One of the two shared Secrets (no owner: deleting a pool must not delete the others')."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "snakepit",
                "app.kubernetes.io/managed-by": MANAGED_BY,
            },
        },
        "type": "Opaque",
        "data": dict(data),
    }


def new_pool_ca(pool: Pool) -> LocalCA:
    """A new CA for the pool, its name unique: during a rotation two of the pool's CAs are
    trusted side by side, and chain building looks issuers up by name first."""
    name = f"snakepit pool {pool.namespace}/{pool.name} {secrets.token_hex(4)}"
    return LocalCA.generate(name, days=CA_DAYS)


def ca_data(pool: Pool, ca: LocalCA) -> dict[str, str]:
    cert_key, key_key = ca_keys(pool)
    return {cert_key: _b64(ca.cert_pem), key_key: _b64(ca.key_pem)}


def pool_ca(pool: Pool, secret: JSON | None) -> LocalCA | None:
    """The pool's CA from ``CA_SECRET``, None when it has none yet."""
    data = (secret or {}).get("data") or {}
    cert_key, key_key = ca_keys(pool)
    if cert_key not in data or key_key not in data:
        return None
    return LocalCA.from_pem(base64.b64decode(data[cert_key]), base64.b64decode(data[key_key]))


@dataclass(frozen=True)
class Certificate:
    """A pool's leaf: when it ends and when to replace it (``issued`` only when new)."""

    not_after: datetime.datetime
    renew_after: datetime.datetime
    issued: Issued | None = None


def issue_certificate(pool: Pool, ca: LocalCA, now: datetime.datetime) -> Certificate:
    """The pool's leaf: server and client (mutual TLS between routers and workers)."""
    lifetime = datetime.timedelta(seconds=pool.spec.tls.certificate_lifetime)
    issued = ca.issue(POOL_NAME, certificate_names(pool), valid_for=lifetime)
    not_after = x509.load_pem_x509_certificate(issued.cert_pem).not_valid_after_utc
    return Certificate(not_after, now + lifetime * RENEW_FRACTION, issued)


def leaf_data(
    pool: Pool, ca: LocalCA, cert: Certificate, trusted: bytes | None = None
) -> dict[str, str]:
    """The pool's keys in ``CERTS_SECRET``; ``ca.crt`` is ``trusted`` (the CA bundle during a
    rotation, carotation.py), by default ``ca`` alone."""
    assert cert.issued is not None
    files = {
        CERT_FILE: cert.issued.cert_pem,
        KEY_FILE: cert.issued.key_pem,
        CA_FILE: trusted or ca.cert_pem,
    }
    return {key: _b64(files[name]) for key, name in leaf_keys(pool).items()}


def current_certificate(
    pool: Pool,
    ca: LocalCA,
    secret: JSON | None,
    now: datetime.datetime,
    trusted: bytes | None = None,
) -> Certificate | None:
    """The pool's leaf in ``CERTS_SECRET`` if it can stay: present, from the pool's CA now,
    beside the ``ca.crt`` wanted now (``trusted``, default ``ca``), of the lifetime the spec
    asks, and not yet at its renewal time. None: issue a new one."""
    data: dict[str, Any] = (secret or {}).get("data") or {}
    keys = list(leaf_keys(pool))
    if any(key not in data for key in keys):
        return None
    try:
        leaf = x509.load_pem_x509_certificate(base64.b64decode(data[keys[0]]))
        leaf.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, InvalidSignature):
        return None
    if base64.b64decode(data[keys[2]]) != (trusted or ca.cert_pem):
        return None
    issued_at = leaf.not_valid_before_utc + BACKDATE
    lifetime = leaf.not_valid_after_utc - issued_at
    wanted = datetime.timedelta(seconds=pool.spec.tls.certificate_lifetime)
    if abs(lifetime - wanted) > datetime.timedelta(seconds=5):
        return None
    renew_after = issued_at + lifetime * RENEW_FRACTION
    if now >= renew_after:
        return None
    return Certificate(leaf.not_valid_after_utc, renew_after)


def certificate_status(cert: Certificate) -> JSON:
    """``status.certificate``: for people (``kubectl get -o yaml``); passes read the leaf."""
    return {
        "secretName": CERTS_SECRET,
        "notAfter": rfc3339(cert.not_after),
        "renewAfter": rfc3339(cert.renew_after),
    }


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
