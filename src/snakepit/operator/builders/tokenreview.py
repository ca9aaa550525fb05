"""Who may ask the API server whether a caller's token is real: the subjects of the chart's
TokenReview ClusterRoleBinding, as pure functions (docs/operator.md, "RBAC").

A router whose pool lists ``spec.auth.serviceAccounts`` checks each caller's token with the
TokenReview API, which is cluster-scoped: no RoleBinding can grant ``create tokenreviews``. The
chart therefore ships one ClusterRole that allows exactly that and one ClusterRoleBinding of it,
and the operator keeps that binding's subjects equal to the router ServiceAccounts of the pools
that need it, no more: a pool that stops listing ServiceAccounts, or is deleted, loses its
router's grant. The operator holds only ``get``/``patch``/``update`` on that one binding and
``bind`` on that one ClusterRole, by name (the RBAC escalation check lets a binding be changed
by whoever may ``bind`` its role), so it can grant nothing else to anybody.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..spec import JSON, AuthSpec
from .common import Names

RBAC_API = "rbac.authorization.k8s.io/v1"
BINDING_KIND = "ClusterRoleBinding"

# One pool as the binding sees it: (namespace, pool name, its auth spec).
PoolAuth = tuple[str, str, AuthSpec]


def needs_token_review(auth: AuthSpec) -> bool:
    """Only ServiceAccount callers are checked with TokenReview (static tokens are not)."""
    return auth.enabled and bool(auth.service_accounts)


def router_subject(namespace: str, pool: str) -> JSON:
    return {"kind": "ServiceAccount", "name": Names(pool).router, "namespace": namespace}


def tokenreview_subjects(pools: Iterable[PoolAuth]) -> list[JSON]:
    """The binding's subjects for these pools: each router ServiceAccount that checks tokens,
    once, in a stable order (so an unchanged set never rewrites the binding)."""
    wanted = {(ns, name) for ns, name, auth in pools if needs_token_review(auth)}
    return [router_subject(ns, name) for ns, name in sorted(wanted)]


def _subject_key(subject: Mapping[str, Any]) -> tuple[str, str, str]:
    return (
        str(subject.get("kind", "")),
        str(subject.get("namespace", "")),
        str(subject.get("name", "")),
    )


def subjects_patch(binding: Mapping[str, Any], subjects: Sequence[JSON]) -> JSON | None:
    """The merge patch that makes ``binding``'s subjects exactly ``subjects`` (None when they
    already are). It replaces the whole list, conditional on the version read: a subject someone
    added by hand is taken back, and two writers never interleave."""
    current = sorted(_subject_key(s) for s in binding.get("subjects") or ())
    if current == sorted(_subject_key(s) for s in subjects):
        return None
    version = (binding.get("metadata") or {}).get("resourceVersion")
    patch: JSON = {"subjects": list(subjects)}
    if version:
        patch["metadata"] = {"resourceVersion": version}
    return patch
