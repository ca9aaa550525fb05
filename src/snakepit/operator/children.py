"""In-memory index of the children that exist, fed by the kopf watches of the child kinds.

kopf recommends indexing over API calls for the actual state. The reconciler uses the index
to read workload status without a request, to skip applying children nobody touched since its
last apply (a content fingerprint, status excluded), and to find children the spec no longer
wants. Each event names the pool to reconcile, so a deleted or edited child is corrected at once.
"""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .builders import POOL_LABEL, ChildKey
from .spec import JSON

PoolKey = tuple[str, str]  # (namespace, pool name)

# Kinds whose status the pool's status is computed from; only these keep their whole body.
STATUS_KINDS = frozenset({"Deployment", "StatefulSet", "Service"})


def fingerprint(obj: Mapping[str, Any]) -> str:
    """Hash of what an object says, not of what happened to it: status, resourceVersion and
    managedFields (which change on every status write) are left out."""
    meta = {
        k: v
        for k, v in (obj.get("metadata") or {}).items()
        if k not in ("resourceVersion", "managedFields")
    }
    content = {k: v for k, v in obj.items() if k not in ("status", "metadata")}
    content["metadata"] = meta
    return hashlib.sha256(json.dumps(content, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class ChildRef:
    api_version: str
    kind: str
    namespace: str
    name: str
    uid: str
    owner_uids: frozenset[str]
    content: str
    body: JSON | None = None


class Children:
    def __init__(self) -> None:
        self._by_pool: dict[PoolKey, dict[ChildKey, ChildRef]] = {}

    def observe(self, event_type: str | None, body: Mapping[str, Any]) -> PoolKey | None:
        """Record one watch event; return the pool it belongs to (None if it has no pool)."""
        meta = body.get("metadata") or {}
        pool = (meta.get("labels") or {}).get(POOL_LABEL)
        namespace = meta.get("namespace")
        if not pool or not namespace:
            return None
        key = (str(namespace), str(pool))
        ident = (str(body.get("apiVersion")), str(body.get("kind")), str(meta.get("name")))
        if event_type == "DELETED":
            known = self._by_pool.get(key, {})
            known.pop(ident, None)
            if not known:
                self._by_pool.pop(key, None)
            return key
        plain = copy.deepcopy(dict(body))
        self._by_pool.setdefault(key, {})[ident] = ChildRef(
            api_version=ident[0],
            kind=ident[1],
            namespace=key[0],
            name=ident[2],
            uid=str(meta.get("uid", "")),
            owner_uids=frozenset(str(ref.get("uid")) for ref in meta.get("ownerReferences") or ()),
            content=fingerprint(plain),
            body=plain if ident[1] in STATUS_KINDS else None,
        )
        return key

    def of(self, key: PoolKey) -> list[ChildRef]:
        return list(self._by_pool.get(key, {}).values())

    def get(self, key: PoolKey, child: ChildKey) -> ChildRef | None:
        return self._by_pool.get(key, {}).get(child)
