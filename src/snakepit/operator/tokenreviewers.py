"""Keeps the chart's TokenReview ClusterRoleBinding's subjects equal to the router
ServiceAccounts that need it (builders/tokenreview.py says who and why).

Level-based like the reconciler, and one writer for one object: any pool event only marks the
binding stale; one task reads every pool the operator serves, builds the subject list and
patches the binding when it differs. Reading all pools each time (not the events' bodies) is
what makes it correct after a restart or a missed delete: a subject is there exactly while a
pool that needs it exists. Failures are retried with backoff; a resync rechecks it anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from .builders.tokenreview import (
    BINDING_KIND,
    RBAC_API,
    PoolAuth,
    subjects_patch,
    tokenreview_subjects,
)
from .kube import ApiError, Kube
from .spec import API_VERSION, KIND, auth_of

log = logging.getLogger("snakepit.operator")


def pool_auths(bodies: Sequence[Mapping[str, Any]]) -> list[PoolAuth]:
    """The pools that exist and are not being deleted, with their ``spec.auth``. Only that
    field is parsed: a pool whose spec is otherwise invalid keeps its routers' grant."""
    found: list[PoolAuth] = []
    for body in bodies:
        meta = body.get("metadata") or {}
        if meta.get("deletionTimestamp"):
            continue
        try:
            auth = auth_of(body.get("spec") or {}, str(meta.get("namespace")))
        except (ValueError, TypeError):
            continue
        found.append((str(meta.get("namespace")), str(meta.get("name")), auth))
    return found


class TokenReviewers:
    """The binding named ``binding`` (empty: the operator manages none, e.g. run outside the
    chart) for the pools of ``namespaces`` (empty: every namespace)."""

    def __init__(
        self,
        kube: Kube,
        binding: str,
        namespaces: Sequence[str] = (),
        resync_seconds: float = 60.0,
        max_backoff: float = 60.0,
    ) -> None:
        self.kube = kube
        self.binding = binding
        self.namespaces = tuple(namespaces) or ("",)
        self.resync_seconds = resync_seconds
        self.max_backoff = max_backoff
        self._stale = asyncio.Event()
        self.patches = 0  # writes made, for tests and logs

    def touch(self) -> None:
        """A pool changed or went: sync soon (many touches, one sync)."""
        self._stale.set()

    async def sync(self) -> bool:
        """Make the subjects right now; True when the binding was changed."""
        bodies: list[Mapping[str, Any]] = []
        for namespace in self.namespaces:
            bodies += await self.kube.list(API_VERSION, KIND, namespace)
        subjects = tokenreview_subjects(pool_auths(bodies))
        current = await self.kube.get(RBAC_API, BINDING_KIND, "", self.binding)
        if current is None:
            if subjects:
                log.warning(
                    "ClusterRoleBinding %s does not exist: the routers of %d pool(s) with "
                    "spec.auth.serviceAccounts cannot review tokens (install the chart with "
                    "rbac.create, or bind system:auth-delegator to them by hand)",
                    self.binding,
                    len(subjects),
                )
            return False
        patch = subjects_patch(current, subjects)
        if patch is None:
            return False
        await self.kube.patch(RBAC_API, BINDING_KIND, "", self.binding, patch)
        self.patches += 1
        log.info(
            "ClusterRoleBinding %s: %d router ServiceAccount(s) may review tokens",
            self.binding,
            len(subjects),
        )
        return True

    async def run(self) -> None:
        """Sync whenever touched and every ``resync_seconds``; until cancelled."""
        if not self.binding:
            return
        backoff = 0.5
        self._stale.set()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stale.wait(), self.resync_seconds)
            self._stale.clear()
            try:
                await self.sync()
                backoff = 0.5
            except ApiError as exc:  # a conflict, a refusal, the API server restarting
                log.warning("could not sync ClusterRoleBinding %s: %s", self.binding, exc)
                await asyncio.sleep(backoff)
                backoff = min(self.max_backoff, backoff * 2)
                self._stale.set()
