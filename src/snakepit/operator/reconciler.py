"""One reconcile pass of one pool: read it, apply every child, prune, write status.

Level-based: the pass never asks what changed. It reads the pool as it is now, applies the
complete desired state (server-side apply, so an unchanged child costs no write and a changed
or deleted one is put back), and derives status from what the API server returned.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .builders import ChildKey, Names, build_children, build_store_secret, child_key, new_password
from .builders.auth import build_ticket_secret
from .builders.carotation import (
    DEFAULT_SETTLE,
    ROTATE_ANNOTATION,
    CaRotation,
    next_step_after,
    read_rotation,
    rotation_data,
    rotation_step,
)
from .builders.certs import (
    CA_SECRET,
    ca_keys,
    certificate_status,
    current_certificate,
    forget_pool_patch,
    issue_certificate,
    leaf_data,
    namespace_secret,
    new_pool_ca,
    pool_ca,
)
from .builders.common import STORE_SECRET_ANNOTATION
from .builders.tls import CERTS_SECRET
from .children import Children, PoolKey, fingerprint
from .config import OperatorConfig
from .kube import ApiError, Kube, now_rfc3339
from .spec import API_VERSION, JSON, KIND, Pool, SpecError, parse_pool
from .status import (
    DEGRADED,
    PROGRESSING,
    READY,
    Observed,
    Problem,
    Transition,
    compute_status,
    event_for,
    merge_conditions,
    status_patch,
)

log = logging.getLogger("snakepit.operator")

# Kinds the reconciler applies. The store password Secret is not among them: it stays until
# the pool is deleted, so switching back to a managed store keeps the same password.
PRUNABLE_KINDS = frozenset(
    {
        "Deployment",
        "StatefulSet",
        "Service",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "PodDisruptionBudget",
        "NetworkPolicy",
    }
)

TLS_DISABLED_MESSAGE = (
    "spec.tls.enabled is false: every hop of this pool (callers, router, workers, Redis) is "
    "plaintext and nothing proves a worker is one (docs/security.md)"
)

AUTH_DISABLED_MESSAGE = (
    "spec.auth.enabled is false: anyone who can reach the router (and, in direct mode, a "
    "worker) calls as 'anonymous', sees every session and may change any of them "
    "(docs/security.md)"
)

# What pods carry for a password Secret the operator found rather than created.
ADOPTED_SECRET = "adopted"


def apply_waves(desired: Sequence[JSON]) -> list[list[JSON]]:
    """Apply order: RoleBindings after everything else.

    Binding a Role is checked against the Role's rules (RBAC escalation prevention), so the
    Role must exist first; all other children are independent and applied concurrently.
    """
    first = [o for o in desired if o["kind"] != "RoleBinding"]
    second = [o for o in desired if o["kind"] == "RoleBinding"]
    return [wave for wave in (first, second) if wave]


def _had_problems(status: Mapping[str, Any]) -> bool:
    for cond in status.get("conditions") or ():
        if cond.get("type") == DEGRADED and cond.get("reason") in ("ApplyFailed", "PruneFailed"):
            return bool(cond.get("status") == "True")
    return False


class ReconcileError(Exception):
    """The pass could not apply everything; the work queue retries it with backoff."""


@dataclass(frozen=True)
class PassResult:
    """What one pass did, for logs and tests."""

    applied: int
    unchanged: int
    pruned: int
    problems: Sequence[Problem]
    transitions: Sequence[Transition]
    # condition type -> status ("True"/"False"/"Unknown") after the pass, for metrics
    conditions: Mapping[str, str] = field(default_factory=dict)
    # Seconds until this pool needs a pass whatever the watches say (a certificate renewal).
    requeue_after: float | None = None


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        config: OperatorConfig,
        children: Children,
        clock: Callable[[], str] = now_rfc3339,
        password: Callable[[], str] = new_password,
        wall: Callable[[], datetime.datetime] = _utcnow,
    ) -> None:
        self.kube = kube
        self.config = config
        self.children = children
        self.clock = clock
        self.password = password
        self.wall = wall
        # How long each step of a CA rotation is given to reach every pod (carotation.py).
        self.ca_settle = DEFAULT_SETTLE
        # child -> (fingerprint of what we applied, fingerprint of what the server returned)
        self._applied: dict[tuple[PoolKey, ChildKey], tuple[str, str]] = {}

    async def reconcile(self, key: PoolKey) -> PassResult | None:
        namespace, name = key
        body = await self.kube.get(API_VERSION, KIND, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            self.forget(key)
            if body is None:
                await self._forget_certificates(namespace, name)
            return None  # gone or going: garbage collection removes the children
        try:
            pool = parse_pool(body)
        except (SpecError, KeyError, TypeError, ValueError) as exc:
            await self._report_invalid(body, str(exc))
            return None
        result = await self._converge(body, pool)
        if result.problems:
            raise ReconcileError("; ".join(p.message for p in result.problems))
        return result

    async def _converge(self, body: JSON, pool: Pool) -> PassResult:
        problems: list[Problem] = []
        secret_uid = None
        if pool.spec.session_store.managed:
            try:
                secret_uid = await self._ensure_store_secret(pool)
            except ApiError as exc:
                problems.append(Problem("ApplyFailed", f"Secret: {exc.message}"))
        if pool.spec.auth.enabled:
            try:
                await self._ensure_ticket_secret(pool)
            except ApiError as exc:
                problems.append(Problem("ApplyFailed", f"Secret: {exc.message}"))
        previous: Mapping[str, Any] = body.get("status") or {}
        # Kept as it was when this pass cannot issue (the next one retries).
        certificate, requeue_after = previous.get("certificate"), None
        if pool.spec.tls.operator_issued:
            try:
                rotate = (body["metadata"].get("annotations") or {}).get(ROTATE_ANNOTATION, "")
                certificate, requeue_after = await self._ensure_certificate(pool, str(rotate))
            except ApiError as exc:
                problems.append(Problem("ApplyFailed", f"certificate: {exc.message}"))
            except ValueError as exc:  # a CA someone else wrote into the Secret, unusable
                problems.append(Problem("ApplyFailed", f"Secret {CA_SECRET}: {exc}"))
        desired = build_children(pool, self.config, secret_uid)
        current: dict[ChildKey, JSON] = {}
        applied = 0
        # Without the Secret's uid the pod templates would differ and roll every pod: apply
        # nothing this pass, report from the index, and let the retry try again.
        waves = [] if problems else apply_waves(desired)
        for child in [] if waves else self.children.of((pool.namespace, pool.name)):
            if child.body is not None:
                current[(child.api_version, child.kind, child.name)] = child.body
        for wave in waves:
            results = await asyncio.gather(*(self._sync(pool, obj) for obj in wave))
            for obj, (result, problem, did_apply) in zip(wave, results, strict=True):
                applied += did_apply
                if problem is not None:
                    problems.append(problem)
                if result is not None:
                    current[child_key(obj)] = result
        pruned = (
            0 if problems else await self._prune(pool, {child_key(o) for o in desired}, problems)
        )
        names = Names(pool.name)
        observed = Observed(
            workers=current.get(("apps/v1", "Deployment", names.workers)),
            router=current.get(("apps/v1", "Deployment", names.router)),
            store=current.get(("apps/v1", "StatefulSet", names.redis)),
            router_service=current.get(("v1", "Service", names.router)),
            problems=problems,
        )
        status, transitions = compute_status(pool, observed, previous, self.clock())
        if certificate is not None and pool.spec.tls.operator_issued:
            status["certificate"] = certificate
        await self._write_status(body, previous, status, transitions)
        if not problems and (
            previous.get("observedGeneration") != pool.generation or _had_problems(previous)
        ):
            await self._event(body, "Normal", "Reconciled", f"applied generation {pool.generation}")
            if pool.spec.tls.explicit and not pool.spec.tls.enabled:
                await self._event(body, "Warning", "TLSDisabled", TLS_DISABLED_MESSAGE)
            if pool.spec.auth.explicit and not pool.spec.auth.enabled:
                await self._event(body, "Warning", "AuthDisabled", AUTH_DISABLED_MESSAGE)
        unchanged = len(desired) - applied if waves else 0
        conditions = {c["type"]: c["status"] for c in status.get("conditions") or ()}
        return PassResult(
            applied, unchanged, pruned, problems, transitions, conditions, requeue_after
        )

    async def _sync(self, pool: Pool, obj: JSON) -> tuple[JSON | None, Problem | None, bool]:
        """Apply ``obj`` unless the live child is exactly what our last apply left there.

        The comparison is by fingerprint (status excluded): a child someone edited, deleted or
        that a new spec changes differs and is applied; one whose only news is its status is
        read from the watch index instead, which spares the API server most passes' writes.
        """
        pool_key = (pool.namespace, pool.name)
        key = child_key(obj)
        wanted = fingerprint(obj)
        live = self.children.get(pool_key, key)
        if live is not None and self._applied.get((pool_key, key)) == (wanted, live.content):
            return (live.body or {}), None, False
        try:
            response = await self.kube.apply(obj)
        except ApiError as exc:
            self._applied.pop((pool_key, key), None)
            problem = Problem(
                "ApplyFailed", f"{obj['kind']} {obj['metadata']['name']}: {exc.message}"
            )
            # Status still reports what runs now, e.g. the old Deployment a bad edit left alone.
            return (live.body if live else None), problem, True
        self._applied[(pool_key, key)] = (wanted, fingerprint(response))
        return response, None, True

    def forget(self, key: PoolKey) -> None:
        """Drop what we remember about a pool's children (the pool is gone)."""
        for remembered in [k for k in self._applied if k[0] == key]:
            del self._applied[remembered]

    async def _ensure_ticket_secret(self, pool: Pool) -> None:
        """The pool's ticket signing key: created once, kept as it is (409) ever after, so
        routers and workers always agree on it. Rotating it is deleting it, then restarting
        the routers and workers (docs/security.md)."""
        try:
            await self.kube.create(build_ticket_secret(pool))
        except ApiError as exc:
            if exc.status != 409:
                raise

    async def _ensure_certificate(self, pool: Pool, rotate: str) -> tuple[JSON, float]:
        """The pool's leaf certificate (builders/certs.py): ``status.certificate`` after this
        pass and the seconds until it must be renewed or its CA rotation moves on.

        Level-based like the rest: read the two fixed-name Secrets (the only Secrets the
        operator may read), move a CA rotation on (carotation.py; ``rotate``: the pool's
        ``ROTATE_ANNOTATION``), keep a leaf that can stay, else issue one and merge it in under
        the pool's keys (a merge patch leaves the other pools' keys alone).
        """
        now = self.wall()
        rotation = await self._pool_ca(pool, rotate, now)
        ca, trusted = rotation.current, rotation.trusted()
        certs = await self.kube.get("v1", "Secret", pool.namespace, CERTS_SECRET)
        cert = current_certificate(pool, ca, certs, now, trusted)
        if cert is None:
            cert = issue_certificate(pool, ca, now)
            data = leaf_data(pool, ca, cert, trusted)
            await self._merge_into(pool.namespace, CERTS_SECRET, certs, data)
        status = certificate_status(cert)
        if rotation.phase != "steady":
            status["caRotation"] = rotation.phase
        after = min(
            max(1.0, (cert.renew_after - now).total_seconds()),
            next_step_after(rotation, now, self.ca_settle),
        )
        return status, after

    async def _forget_certificates(self, namespace: str, name: str) -> None:
        """Drop a deleted pool's CA and leaf from the two shared Secrets, which have no owner
        for the garbage collector to follow (builders/certs.py). Only once the pool is gone,
        not while it is going: its pods still mount the leaf until they stop. Pools have no
        finalizer (handlers.py), so a pool deleted while the operator is down keeps its keys
        (no pod mounts them; a new pool of the same name would take that CA over)."""
        for secret_name in (CERTS_SECRET, CA_SECRET):
            try:
                secret = await self.kube.get("v1", "Secret", namespace, secret_name)
            except ApiError as exc:
                if exc.status == 403:  # an operator without operator-issued TLS here
                    return
                raise
            patch = forget_pool_patch(secret_name, secret, name)
            if patch is not None:
                # A 409 (the Secret changed since read) fails the pass: it is retried, reading
                # the pool again first.
                await self.kube.patch("v1", "Secret", namespace, secret_name, patch)
                log.info(
                    "removed the keys of deleted pool %s/%s from %s", namespace, name, secret_name
                )

    async def _pool_ca(self, pool: Pool, rotate: str, now: datetime.datetime) -> CaRotation:
        """The pool's CA and its rotation from ``CA_SECRET``: made and added under its keys
        when missing, moved one step on when due. Every write is conditional on the Secret's
        resourceVersion: two writers never give one pool two CAs or skip a step (the loser
        reads the winner's)."""
        cert_key, key_key = ca_keys(pool)
        for _ in range(5):
            secret = await self.kube.get("v1", "Secret", pool.namespace, CA_SECRET)
            ca = pool_ca(pool, secret)
            if ca is None:
                state = CaRotation(new_pool_ca(pool), request=rotate)
            else:
                current = read_rotation(pool.name, ca, (secret or {}).get("data") or {})
                moved = rotation_step(
                    current, now, request=rotate, new_ca=lambda: new_pool_ca(pool),
                    settle=self.ca_settle,
                )  # fmt: skip
                if moved is None:
                    return current
                state = moved
                log.info("CA rotation of pool %s/%s: %s", pool.namespace, pool.name, state.phase)
            data = rotation_data(pool.name, cert_key, key_key, state)
            try:
                await self._merge_into(pool.namespace, CA_SECRET, secret, data, conditional=True)
                return state
            except ApiError as exc:
                if exc.status != 409:
                    raise
        raise ApiError(409, "Conflict", f"Secret {CA_SECRET} kept changing; retrying later")

    async def _merge_into(
        self,
        namespace: str,
        name: str,
        secret: JSON | None,
        data: Mapping[str, str | None],
        *,
        conditional: bool = False,
    ) -> None:
        """Add ``data`` to a shared Secret (``secret``: as read): created when missing, else
        merge-patched. ``conditional``: only onto the version read (409 when someone wrote in
        between, or created it first); otherwise keys of other pools never collide."""
        if secret is None:
            present = {k: v for k, v in data.items() if v is not None}
            try:
                await self.kube.create(namespace_secret(namespace, name, present))
                return
            except ApiError as exc:
                if exc.status != 409 or conditional:
                    raise
        patch: JSON = {"data": dict(data)}
        version = (secret or {}).get("metadata", {}).get("resourceVersion")
        if conditional and version:
            patch["metadata"] = {"resourceVersion": version}
        await self.kube.patch("v1", "Secret", namespace, name, patch)

    async def _ensure_store_secret(self, pool: Pool) -> str:
        """The uid pods carry for the password Secret, without ever reading a Secret.

        The operator holds only ``create`` on Secrets (no ``get``, which cluster-wide would
        read every Secret in the cluster): it creates the Secret each pass. Created, its uid
        is new and every pod rolls to the new password (a deleted Secret is how a user
        rotates it). Already there (409), the pods keep the uid their template carries; a
        Secret the operator did not create (adopted as is) is marked ``ADOPTED_SECRET``.
        """
        try:
            created = await self.kube.create(build_store_secret(pool, self.password()))
            return str(created.get("metadata", {}).get("uid", ""))
        except ApiError as exc:
            if exc.status != 409:
                raise
        names = Names(pool.name)
        key = ("apps/v1", "Deployment", names.workers)
        live = self.children.get((pool.namespace, pool.name), key)
        workers = live.body if live is not None and live.body is not None else None
        if workers is None:
            workers = await self.kube.get(*key[:2], pool.namespace, names.workers)
        template = ((workers or {}).get("spec") or {}).get("template") or {}
        uid = ((template.get("metadata") or {}).get("annotations") or {}).get(
            STORE_SECRET_ANNOTATION
        )
        return str(uid) if uid else ADOPTED_SECRET

    async def _prune(self, pool: Pool, wanted: set[ChildKey], problems: list[Problem]) -> int:
        """Delete children of this very pool (by uid) that the spec no longer asks for."""
        pruned = 0
        for child in self.children.of((pool.namespace, pool.name)):
            if (child.api_version, child.kind, child.name) in wanted:
                continue
            if child.kind not in PRUNABLE_KINDS:
                continue
            if pool.uid not in child.owner_uids:
                continue
            try:
                await self.kube.delete(
                    child.api_version, child.kind, child.namespace, child.name, child.uid
                )
                pruned += 1
            except ApiError as exc:
                problems.append(Problem("PruneFailed", f"{child.kind} {child.name}: {exc.message}"))
        return pruned

    async def _write_status(
        self,
        body: JSON,
        previous: Mapping[str, Any],
        status: JSON,
        transitions: Sequence[Transition],
    ) -> None:
        patch = status_patch(previous, status)
        if patch:
            try:
                await self.kube.patch_status(body, patch)
            except ApiError as exc:
                if exc.status == 404:
                    return  # deleted during the pass; the garbage collector takes it from here
                raise
        for transition in transitions:
            event = event_for(transition)
            if event is not None:
                await self._event(body, *event)

    async def _report_invalid(self, body: JSON, message: str) -> None:
        previous: Mapping[str, Any] = body.get("status") or {}
        generation = int(body["metadata"].get("generation", 1))
        conditions, transitions = merge_conditions(
            previous.get("conditions") or [],
            {
                READY: ("False", "InvalidSpec", message),
                PROGRESSING: ("False", "InvalidSpec", message),
                DEGRADED: ("True", "InvalidSpec", message),
            },
            generation,
            self.clock(),
        )
        status = {**previous, "observedGeneration": generation, "conditions": conditions}
        await self._write_status(body, previous, status, transitions)

    async def _event(self, body: JSON, type_: str, reason: str, message: str) -> None:
        try:
            await self.kube.event(body, type_, reason, message)
        except ApiError as exc:  # an event is a courtesy; never fail the pass over one
            log.warning("could not post event %s: %s", reason, exc)
