"""Operator-issued certificates (``spec.tls.enabled`` without ``secretName``), as pure functions.

One CA per namespace, in a Secret with a fixed name (``CA_SECRET``), so the operator's RBAC can
grant ``get`` on that one name (``resourceNames``) and never on the namespace's other Secrets.
It belongs to no pool (no owner reference: deleting a pool must not change what the others in
the namespace trust) and is immutable: rotating it is deleting it, after which the next
issuance makes a new one and every pool's next certificate comes from it.

Each pool gets one leaf certificate in a Secret of type kubernetes.io/tls with ``ca.crt``
(``issued_secret_name``), exactly the shape a ``spec.tls.secretName`` Secret has, so the pods
mount it the same way (builders/tls.py). Its names are those of ``certificate_names``: the pool
name members check each other by (``pool.snakepit.internal``), the router and Redis Service DNS
names. It is valid ``spec.tls.certificateLifetime`` and renewed once ``RENEW_FRACTION`` of that
has passed; the kubelet then updates the mounted files and the processes reload them.
"""

from __future__ import annotations

import base64
import datetime
from dataclasses import dataclass

from cryptography import x509

from ...security.localca import Issued, LocalCA
from ...security.tls import CA_FILE, CERT_FILE, KEY_FILE, POOL_NAME
from ..spec import JSON, Pool
from .common import MANAGED_BY, ROUTER, metadata
from .tls import certificate_names, issued_secret_name

CA_SECRET = "snakepit-ca"
CA_CERT_KEY = "ca.crt"
CA_KEY_KEY = "ca.key"
# The CA outlives many leaves; its own rotation is a deliberate delete (see above).
CA_DAYS = 3650
# Renew once this share of a leaf's life has passed: a third of it is left for the kubelet to
# deliver the new files and for the operator to be down a while.
RENEW_FRACTION = 2 / 3
ISSUED_ANNOTATION = "snakepit.dev/certificate-not-after"


def build_ca_secret(namespace: str, ca: LocalCA) -> JSON:
    """The namespace's CA (created with POST once, never applied or changed)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": CA_SECRET,
            "namespace": namespace,
            "labels": {
                "app.kubernetes.io/name": "snakepit",
                "app.kubernetes.io/managed-by": MANAGED_BY,
            },
        },
        "type": "Opaque",
        "immutable": True,
        "data": {CA_CERT_KEY: _b64(ca.cert_pem), CA_KEY_KEY: _b64(ca.key_pem)},
    }


def ca_from_secret(secret: JSON) -> LocalCA:
    data = secret.get("data") or {}
    if CA_CERT_KEY not in data or CA_KEY_KEY not in data:
        raise ValueError(f"Secret {CA_SECRET} lacks {CA_CERT_KEY} or {CA_KEY_KEY}")
    return LocalCA.from_pem(base64.b64decode(data[CA_CERT_KEY]), base64.b64decode(data[CA_KEY_KEY]))


def new_namespace_ca(namespace: str) -> LocalCA:
    return LocalCA.generate(f"snakepit CA ({namespace})", days=CA_DAYS)


@dataclass(frozen=True)
class Certificate:
    """A leaf the operator issued: the files, and when to replace them."""

    issued: Issued
    not_after: datetime.datetime
    renew_after: datetime.datetime


def issue_certificate(pool: Pool, ca: LocalCA, now: datetime.datetime) -> Certificate:
    """The pool's leaf: server and client (mutual TLS between routers and workers)."""
    lifetime = datetime.timedelta(seconds=pool.spec.tls.certificate_lifetime)
    issued = ca.issue(POOL_NAME, certificate_names(pool), valid_for=lifetime)
    not_after = x509.load_pem_x509_certificate(issued.cert_pem).not_valid_after_utc
    return Certificate(issued, not_after, now + lifetime * RENEW_FRACTION)


def build_certificate_secret(pool: Pool, ca: LocalCA, cert: Certificate) -> JSON:
    """The leaf as a kubernetes.io/tls Secret with ``ca.crt``, owned by the pool."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": metadata(
            pool,
            issued_secret_name(pool),
            ROUTER,
            {ISSUED_ANNOTATION: rfc3339(cert.not_after)},
        ),
        "type": "kubernetes.io/tls",
        "data": {
            CERT_FILE: _b64(cert.issued.cert_pem),
            KEY_FILE: _b64(cert.issued.key_pem),
            CA_FILE: _b64(ca.cert_pem),
        },
    }


def certificate_status(pool: Pool, cert: Certificate) -> JSON:
    """``status.certificate``: what the operator issued last, and when it renews it (the
    operator cannot read the Secret back, so this is how a later pass knows)."""
    return {
        "secretName": issued_secret_name(pool),
        "notAfter": rfc3339(cert.not_after),
        "renewAfter": rfc3339(cert.renew_after),
        "lifetimeSeconds": pool.spec.tls.certificate_lifetime,
    }


def renewal_due(pool: Pool, status: JSON | None, now: datetime.datetime) -> bool:
    """Whether the pool needs a new leaf: none recorded, its renewal time passed, or the spec
    asks for another lifetime."""
    if not status or status.get("secretName") != issued_secret_name(pool):
        return True
    if status.get("lifetimeSeconds") != pool.spec.tls.certificate_lifetime:
        return True
    try:
        renew_after = parse_rfc3339(str(status["renewAfter"]))
    except (KeyError, ValueError):
        return True
    return now >= renew_after


def rfc3339(moment: datetime.datetime) -> str:
    return moment.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(text: str) -> datetime.datetime:
    return datetime.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
