"""One reconcile pass against an in-memory API: what it applies, creates, prunes and reports.

The real API server is exercised in tests/integration/test_operator_kube.py; here the fake
only stores objects, so the pass's decisions can be checked precisely and fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
from typing import Any

import pytest

from snakepit.operator.builders import build_children
from snakepit.operator.children import Children
from snakepit.operator.config import OperatorConfig
from snakepit.operator.controller import Controller, pool_needs_pass
from snakepit.operator.kube import ApiError
from snakepit.operator.reconciler import ReconcileError, Reconciler
from snakepit.operator.spec import parse_pool
from snakepit.operator.workqueue import WorkQueue

Key = tuple[str, str, str, str]  # apiVersion, kind, namespace, name


class FakeKube:
    def __init__(self) -> None:
        self.objects: dict[Key, dict[str, Any]] = {}
        self.applied: list[str] = []
        self.created: list[str] = []
        self.deleted: list[str] = []
        self.status_patches: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []
        self.refuse: set[str] = set()
        self.uids = 0
        self.gets: list[str] = []
        self.patched: list[str] = []

    @staticmethod
    def key(obj: dict[str, Any]) -> Key:
        meta = obj["metadata"]
        return (obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])

    def put(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.uids += 1
        stored = copy.deepcopy(obj)
        stored["metadata"].setdefault("uid", f"uid-{self.uids}")
        stored["metadata"].setdefault("resourceVersion", str(self.uids))
        self.objects[self.key(stored)] = stored
        return stored

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        name = f"{obj['kind']}/{obj['metadata']['name']}"
        if name in self.refuse:
            raise ApiError(422, "Invalid", f"{name} refused")
        self.applied.append(name)
        old = self.objects.get(self.key(obj))
        stored = self.put(obj)
        if old is not None:
            stored["metadata"]["uid"] = old["metadata"]["uid"]
            stored["status"] = old.get("status", {})
        return stored

    async def get(self, api_version: str, kind: str, ns: str, name: str) -> dict[str, Any] | None:
        self.gets.append(f"{kind}/{name}")
        if f"get {kind}/{name}" in self.refuse:
            raise ApiError(500, "InternalError", "etcd is having a bad day")
        found = self.objects.get((api_version, kind, ns, name))
        return copy.deepcopy(found) if found else None

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        if f"create {obj['kind']}/{obj['metadata']['name']}" in self.refuse:
            raise ApiError(500, "InternalError", "etcd is having a bad day")
        if self.key(obj) in self.objects:
            raise ApiError(409, "AlreadyExists", "exists")
        self.created.append(f"{obj['kind']}/{obj['metadata']['name']}")
        return self.put(obj)

    async def patch(
        self, api_version: str, kind: str, ns: str, name: str, patch: dict[str, Any]
    ) -> dict[str, Any]:
        """A JSON merge patch of ``data``, conditional on a resourceVersion in it."""
        self.patched.append(f"{kind}/{name}")
        stored = self.objects.get((api_version, kind, ns, name))
        if stored is None:
            raise ApiError(404, "NotFound", "not found")
        wanted = patch.get("metadata", {}).get("resourceVersion")
        if wanted is not None and wanted != stored["metadata"].get("resourceVersion"):
            raise ApiError(409, "Conflict", "the object has been modified")
        data = stored.setdefault("data", {})
        for k, v in patch.get("data", {}).items():  # null removes a key, as in a merge patch
            if v is None:
                data.pop(k, None)
            else:
                data[k] = v
        stored["metadata"]["resourceVersion"] = str(self.uids + 1000)
        self.uids += 1
        return copy.deepcopy(stored)

    async def delete(self, api_version: str, kind: str, ns: str, name: str, uid: str) -> None:
        self.deleted.append(f"{kind}/{name}")
        self.objects.pop((api_version, kind, ns, name), None)

    async def patch_status(self, pool: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
        self.status_patches.append(patch)
        stored = self.objects[self.key(pool)]
        merge_patch(stored.setdefault("status", {}), patch)
        return stored

    async def event(self, obj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason, message))


def pool_body(spec: dict[str, Any] | None = None, generation: int = 1) -> dict[str, Any]:
    return {
        "apiVersion": "snakepit.dev/v1alpha1",
        "kind": "SnakepitPool",
        "metadata": {
            "name": "demo",
            "namespace": "ml",
            "uid": "pool-uid",
            "generation": generation,
        },
        "spec": spec or {},
    }


def child_count(spec: dict[str, Any] | None = None) -> int:
    """How many children the builders make for this spec (the reconciler applies each)."""
    return len(build_children(parse_pool(pool_body(spec)), OperatorConfig()))


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> None:
    """A JSON merge patch (RFC 7386) as the API server applies it: objects merge key by key,
    null removes, anything else replaces."""
    for k, v in patch.items():
        if v is None:
            target.pop(k, None)
        elif isinstance(v, dict) and isinstance(target.get(k), dict):
            merge_patch(target[k], v)
        else:
            target[k] = copy.deepcopy(v)


def setup(spec: dict[str, Any] | None = None) -> tuple[FakeKube, Reconciler, Children]:
    kube = FakeKube()
    kube.put(pool_body(spec))
    children = Children()
    reconciler = Reconciler(
        kube,  # type: ignore[arg-type]
        OperatorConfig(),
        children,
        clock=lambda: "2030-01-01T00:00:00Z",
        password=lambda: "pw-" + str(kube.uids),
    )
    return kube, reconciler, children


SECURED_POOL_SECRETS = [
    "Secret/demo-redis-auth",
    "Secret/demo-ticket-key",
    "Secret/snakepit-ca",
    "Secret/snakepit-certs",
]


async def test_first_pass_creates_secret_applies_children_and_writes_status() -> None:
    kube, reconciler, _ = setup()
    result = await reconciler.reconcile(("ml", "demo"))
    assert result is not None
    # The store password, and for the default (secured) pool its ticket key and certificates.
    assert kube.created == SECURED_POOL_SECRETS
    assert "Deployment/demo-workers" in kube.applied
    assert result.applied == child_count()
    (patch,) = kube.status_patches
    assert patch["observedGeneration"] == 1
    assert {c["type"] for c in patch["conditions"]} == {"Ready", "Progressing", "Degraded"}
    assert ("Normal", "Reconciled", "applied generation 1") in kube.events


async def test_password_secret_is_never_regenerated_or_rewritten() -> None:
    kube, reconciler, _ = setup()
    await reconciler.reconcile(("ml", "demo"))
    secret = await kube.get("v1", "Secret", "ml", "demo-redis-auth")
    assert secret is not None
    kube.gets.clear()
    for _ in range(3):
        await reconciler.reconcile(("ml", "demo"))
    assert kube.created == SECURED_POOL_SECRETS
    assert "Secret/demo-redis-auth" not in kube.applied
    # Never read, no RBAC for it; only the certificate Secrets are read, by name (the chart's
    # resourceNames).
    read = {g for g in kube.gets if g.startswith("Secret/")}
    assert read <= {"Secret/snakepit-ca", "Secret/snakepit-certs"}, read
    workers = await kube.get("apps/v1", "Deployment", "ml", "demo-workers")
    assert workers is not None
    annotations = workers["spec"]["template"]["metadata"]["annotations"]
    assert annotations["snakepit.dev/store-secret-uid"] == secret["metadata"]["uid"]
    assert await kube.get("v1", "Secret", "ml", "demo-redis-auth") == secret


async def test_an_existing_secret_is_used_as_is() -> None:
    kube, reconciler, _ = setup()
    kube.put(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "demo-redis-auth", "namespace": "ml", "uid": "mine"},
            "data": {"password": "Y2hvc2Vu"},
        }
    )
    await reconciler.reconcile(("ml", "demo"))
    assert "Secret/demo-redis-auth" not in kube.created
    workers = await kube.get("apps/v1", "Deployment", "ml", "demo-workers")
    assert workers is not None
    annotations = workers["spec"]["template"]["metadata"]["annotations"]
    assert annotations["snakepit.dev/store-secret-uid"] == "adopted"  # read without a Secret get


async def test_unchanged_pass_writes_no_status_and_posts_no_event() -> None:
    kube, reconciler, _ = setup()
    await reconciler.reconcile(("ml", "demo"))
    patches, events = len(kube.status_patches), len(kube.events)
    await reconciler.reconcile(("ml", "demo"))
    assert len(kube.status_patches) == patches
    assert len(kube.events) == events


async def test_refused_child_degrades_the_pool_and_raises_for_a_retry() -> None:
    kube, reconciler, _ = setup()
    kube.refuse.add("Deployment/demo-router")
    with pytest.raises(ReconcileError, match="demo-router refused"):
        await reconciler.reconcile(("ml", "demo"))
    status = kube.objects[("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")]["status"]
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ApplyFailed")
    assert (
        "Warning",
        "ApplyFailed",
        "Deployment demo-router: Deployment/demo-router refused",
    ) in kube.events
    assert "Deployment/demo-workers" in kube.applied  # the rest was still applied


async def test_children_no_longer_wanted_are_pruned_only_if_this_pool_owns_them() -> None:
    kube, reconciler, children = setup()
    await reconciler.reconcile(("ml", "demo"))
    for obj in list(kube.objects.values()):
        children.observe("ADDED", obj)
    stranger = kube.put(
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "name": "demo-extra",
                "namespace": "ml",
                "labels": {"snakepit.dev/pool": "demo"},
                "ownerReferences": [{"uid": "someone-else"}],
            },
        }
    )
    children.observe("ADDED", stranger)
    body = kube.objects[("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")]
    body["spec"] = {"sessionStore": {"managed": False, "url": "redis://ext:6379/0"}}
    body["metadata"]["generation"] = 2
    result = await reconciler.reconcile(("ml", "demo"))
    assert result is not None
    assert sorted(kube.deleted) == [
        "NetworkPolicy/demo-redis",
        "Service/demo-redis",
        "StatefulSet/demo-redis",
    ]
    assert ("v1", "Service", "ml", "demo-extra") in kube.objects


async def test_invalid_spec_is_reported_not_applied() -> None:
    kube, reconciler, _ = setup({"sessionStore": {"managed": False}})
    assert await reconciler.reconcile(("ml", "demo")) is None
    assert kube.applied == []
    (patch,) = kube.status_patches
    degraded = next(c for c in patch["conditions"] if c["type"] == "Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert "url" in degraded["message"]


async def test_deleted_or_deleting_pool_is_left_to_the_garbage_collector() -> None:
    kube, reconciler, _ = setup()
    assert await reconciler.reconcile(("ml", "gone")) is None
    body = kube.objects[("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")]
    body["metadata"]["deletionTimestamp"] = "2030-01-01T00:00:00Z"
    assert await reconciler.reconcile(("ml", "demo")) is None
    assert kube.applied == []


def test_pool_events_for_our_own_status_writes_do_not_retrigger() -> None:
    body = pool_body(generation=3)
    assert pool_needs_pass(None, body)  # initial listing
    assert pool_needs_pass("MODIFIED", body)  # spec changed, not yet observed
    body["status"] = {"observedGeneration": 3, "conditions": [{"type": "Ready"}]}
    assert not pool_needs_pass("MODIFIED", body)
    assert not pool_needs_pass("DELETED", body)


def test_child_events_enqueue_their_known_pool() -> None:
    _, reconciler, children = setup()
    controller = Controller(reconciler, children)
    child = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": "demo-workers",
            "namespace": "ml",
            "labels": {"snakepit.dev/pool": "demo"},
        },
    }
    controller.on_child_event("DELETED", child)
    assert len(controller.queue) == 0  # pool not known yet
    controller.on_pool_event(None, pool_body())
    assert len(controller.queue) == 1
    controller.on_child_event("DELETED", child)
    assert len(controller.queue) == 1  # deduplicated
    controller.on_pool_event("DELETED", pool_body())
    assert ("ml", "demo") not in controller.known


class RecordingReconciler:
    """Stands in for the reconciler: the subject here is which queue the controller's workers
    read, not what a pass does (that is the rest of this file)."""

    def __init__(self) -> None:
        self.passed = asyncio.Event()
        self.keys: list[tuple[str, str]] = []

    async def reconcile(self, key: tuple[str, str]) -> None:
        self.keys.append(key)
        self.passed.set()

    def forget(self, key: tuple[str, str]) -> None:
        pass


async def test_a_key_added_to_the_queue_handed_over_gets_a_pass_before_any_resync() -> None:
    """The operator gives one empty queue to both the autoscaler (``queue.add``) and the
    controller. An empty WorkQueue is falsy (it has a length); the controller once replaced it
    with its own, so an autoscaler decision reached the Deployment only at the next resync."""
    queue: WorkQueue[tuple[str, str]] = WorkQueue()
    reconciler = RecordingReconciler()
    controller = Controller(reconciler, Children(), queue, resync_seconds=3600)  # type: ignore[arg-type]
    assert controller.queue is queue
    workers = asyncio.create_task(controller.run())
    try:
        queue.add(("ml", "demo"))  # what the autoscaler does after writing desiredReplicas
        async with asyncio.timeout(30):  # a bound on a hang, not a timing claim: resync is 1 h
            await reconciler.passed.wait()
        assert reconciler.keys == [("ml", "demo")]
    finally:
        workers.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await workers


def watch_everything(kube: FakeKube, children: Children) -> None:
    """What the kopf watches would report: every object as it now is."""
    for obj in kube.objects.values():
        children.observe("MODIFIED", obj)


async def test_children_nobody_touched_are_not_applied_again() -> None:
    kube, reconciler, children = setup()
    first = await reconciler.reconcile(("ml", "demo"))
    assert first is not None and first.applied == child_count()
    watch_everything(kube, children)
    kube.applied.clear()
    again = await reconciler.reconcile(("ml", "demo"))
    assert again is not None
    assert (again.applied, again.unchanged) == (0, child_count())
    assert kube.applied == []


async def test_status_only_changes_are_read_from_the_index_not_applied() -> None:
    kube, reconciler, children = setup()
    await reconciler.reconcile(("ml", "demo"))
    deployment = kube.objects[("apps/v1", "Deployment", "ml", "demo-workers")]
    deployment["status"] = {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2}
    deployment["metadata"]["resourceVersion"] = "99"
    watch_everything(kube, children)
    kube.applied.clear()
    await reconciler.reconcile(("ml", "demo"))
    assert kube.applied == []
    pool = kube.objects[("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")]
    assert pool["status"]["readyReplicas"] == 2


async def test_edited_or_deleted_children_are_applied_again() -> None:
    kube, reconciler, children = setup()
    await reconciler.reconcile(("ml", "demo"))
    watch_everything(kube, children)
    edited = copy.deepcopy(kube.objects[("apps/v1", "Deployment", "ml", "demo-workers")])
    edited["spec"]["replicas"] = 9  # someone ran kubectl scale on the Deployment
    children.observe("MODIFIED", edited)
    gone = kube.objects.pop(("v1", "Service", "ml", "demo-router"))
    children.observe("DELETED", gone)
    kube.applied.clear()
    await reconciler.reconcile(("ml", "demo"))
    assert sorted(kube.applied) == ["Deployment/demo-workers", "Service/demo-router"]


async def test_a_refused_change_still_reports_what_runs() -> None:
    kube, reconciler, children = setup()
    await reconciler.reconcile(("ml", "demo"))
    workers = kube.objects[("apps/v1", "Deployment", "ml", "demo-workers")]
    workers["status"] = {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2}
    watch_everything(kube, children)
    pool = kube.objects[("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")]
    pool["spec"] = {"replicas": 5}
    pool["metadata"]["generation"] = 2
    kube.refuse.add("Deployment/demo-workers")  # e.g. a quota admission webhook says no
    with pytest.raises(ReconcileError):
        await reconciler.reconcile(("ml", "demo"))
    assert pool["status"]["readyReplicas"] == 2
    degraded = next(c for c in pool["status"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ApplyFailed")


async def test_a_deleted_pool_is_forgotten() -> None:
    kube, reconciler, children = setup()
    controller = Controller(reconciler, children)
    controller.on_pool_event(None, pool_body())
    await reconciler.reconcile(("ml", "demo"))
    watch_everything(kube, children)
    controller.on_pool_event("DELETED", pool_body())
    assert ("ml", "demo") not in controller.known
    kube.applied.clear()
    await reconciler.reconcile(("ml", "demo"))  # same name again: nothing is taken for granted
    assert len(kube.applied) == child_count()


async def test_without_the_secret_nothing_is_applied_so_no_pod_rolls() -> None:
    kube, reconciler, children = setup()
    await reconciler.reconcile(("ml", "demo"))
    workers = kube.objects[("apps/v1", "Deployment", "ml", "demo-workers")]
    workers["status"] = {"observedGeneration": 1, "replicas": 2, "readyReplicas": 2}
    watch_everything(kube, children)
    kube.refuse.add("create Secret/demo-redis-auth")
    pool = kube.objects[("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")]
    pool["spec"] = {"replicas": 4}
    pool["metadata"]["generation"] = 2
    kube.applied.clear()
    with pytest.raises(ReconcileError, match="bad day"):
        await reconciler.reconcile(("ml", "demo"))
    assert kube.applied == []
    degraded = next(c for c in pool["status"]["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ApplyFailed")
    assert pool["status"]["readyReplicas"] == 2  # read from the index, not lost to the failure
    kube.refuse.clear()
    await reconciler.reconcile(("ml", "demo"))
    assert "Deployment/demo-workers" in kube.applied


async def test_spec_auth_creates_the_ticket_key_once() -> None:
    spec = {"auth": {"tokensSecret": "demo-tokens"}}
    kube, reconciler, _ = setup(spec)
    for _ in range(3):
        await reconciler.reconcile(("ml", "demo"))
    assert kube.created.count("Secret/demo-ticket-key") == 1
    assert "Secret/demo-ticket-key" not in kube.applied
    first = await kube.get("v1", "Secret", "ml", "demo-ticket-key")
    await reconciler.reconcile(("ml", "demo"))
    assert await kube.get("v1", "Secret", "ml", "demo-ticket-key") == first  # never rotated
