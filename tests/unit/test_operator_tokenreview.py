"""The TokenReview ClusterRoleBinding's subjects: the pure builder, and the handler that keeps
them against an in-memory API (the real API server, with the chart's RBAC and the escalation
check, is in tests/integration/test_operator_tokenreview_kube.py)."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from snakepit.operator.builders.tokenreview import (
    router_subject,
    subjects_patch,
    tokenreview_subjects,
)
from snakepit.operator.config import OperatorConfig
from snakepit.operator.kube import ApiError, path
from snakepit.operator.spec import AuthSpec
from snakepit.operator.tokenreviewers import TokenReviewers, pool_auths

ACCOUNTS = AuthSpec(service_accounts=("ml/caller",))
TOKENS_ONLY = AuthSpec(tokens_secret="callers")
BINDING = "snakepit-tokenreviewer"


def test_only_routers_that_review_service_account_tokens_are_subjects() -> None:
    pools = [
        ("ml", "b", ACCOUNTS),
        ("ml", "a", AuthSpec(service_accounts=("ml/*",), tokens_secret="t")),
        ("ml", "tokens", TOKENS_ONLY),  # static tokens are checked without the API server
        ("ml", "open", AuthSpec(enabled=False)),
        ("other", "a", ACCOUNTS),
        ("ml", "b", ACCOUNTS),  # listed twice (two namespaces' lists overlapping): once
    ]
    assert tokenreview_subjects(pools) == [
        {"kind": "ServiceAccount", "name": "a-router", "namespace": "ml"},
        {"kind": "ServiceAccount", "name": "b-router", "namespace": "ml"},
        {"kind": "ServiceAccount", "name": "a-router", "namespace": "other"},
    ]
    assert tokenreview_subjects([]) == []


def test_the_patch_replaces_the_subjects_only_when_they_differ() -> None:
    wanted = [router_subject("ml", "a")]
    # What the API server returns: apiGroup defaulted, another order of keys.
    same = {"subjects": [{"apiGroup": "", "namespace": "ml", "name": "a-router",
                          "kind": "ServiceAccount"}]}  # fmt: skip
    assert subjects_patch(same, wanted) is None
    assert subjects_patch({"metadata": {"resourceVersion": "7"}}, wanted) == {
        "subjects": wanted,
        "metadata": {"resourceVersion": "7"},
    }
    # Someone's hand-made subject is taken back; the last pool gone empties the list.
    extra = {"subjects": [*same["subjects"], {"kind": "User", "name": "mallory"}]}
    assert subjects_patch(extra, wanted) == {"subjects": wanted}
    assert subjects_patch(same, []) == {"subjects": []}
    assert subjects_patch({}, []) is None


def _pool(ns: str, name: str, spec: dict[str, Any], deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"namespace": ns, "name": name}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-02T00:00:00Z"
    return {"metadata": meta, "spec": spec}


def test_pool_auths_skip_pools_being_deleted_and_keep_otherwise_invalid_ones() -> None:
    auth = {"auth": {"serviceAccounts": [{"namespace": "ml", "name": "caller"}]}}
    bodies = [
        _pool("ml", "live", auth),
        _pool("ml", "going", auth, deleting=True),
        # An invalid spec elsewhere (the reconciler reports it) does not cost the router its grant.
        _pool("ml", "odd", {**auth, "router": {"serviceType": "LoadBalancer"}}),
        _pool("ml", "broken", {"auth": {"serviceAccounts": [{"namespace": "ml"}]}}),
    ]
    assert [(ns, name) for ns, name, _ in pool_auths(bodies)] == [("ml", "live"), ("ml", "odd")]


class BindingApi:
    """Pools per namespace and one ClusterRoleBinding; merge patches replace ``subjects``."""

    def __init__(self, pools: list[dict[str, Any]], binding: bool = True) -> None:
        self.pools = pools
        self.binding: dict[str, Any] | None = (
            {"metadata": {"name": BINDING, "resourceVersion": "1"}} if binding else None
        )
        self.listed: list[str] = []
        self.fail_next: ApiError | None = None

    async def list(self, api_version: str, kind: str, namespace: str = "") -> list[Any]:
        self.listed.append(path(api_version, kind, namespace))
        return [p for p in self.pools if namespace in ("", p["metadata"]["namespace"])]

    async def get(self, api_version: str, kind: str, ns: str, name: str) -> Any:
        assert path(api_version, kind, ns, name).endswith(f"/clusterrolebindings/{BINDING}")
        assert "/namespaces/" not in path(api_version, kind, ns, name)
        return copy.deepcopy(self.binding)

    async def patch(self, api_version: str, kind: str, ns: str, name: str, patch: Any) -> Any:
        if self.fail_next is not None:
            error, self.fail_next = self.fail_next, None
            raise error
        assert self.binding is not None
        version = patch.get("metadata", {}).get("resourceVersion")
        if version != self.binding["metadata"]["resourceVersion"]:
            raise ApiError(409, "Conflict", "the object has been modified")
        self.binding["subjects"] = patch["subjects"]
        self.binding["metadata"]["resourceVersion"] = str(int(version) + 1)
        return self.binding


def _names(api: BindingApi) -> list[str]:
    assert api.binding is not None
    return [f"{s['namespace']}/{s['name']}" for s in api.binding.get("subjects") or ()]


AUTH = {"auth": {"serviceAccounts": [{"namespace": "ml", "name": "caller"}]}}


def test_the_binding_follows_pools_that_come_change_and_go() -> None:
    api = BindingApi([_pool("a", "one", AUTH), _pool("b", "two", AUTH), _pool("c", "x", AUTH)])
    keeper = TokenReviewers(api, BINDING, ["a", "b"])  # type: ignore[arg-type]

    async def run() -> None:
        assert await keeper.sync()
        assert _names(api) == ["a/one-router", "b/two-router"]  # c is not served here
        assert not await keeper.sync()  # unchanged: no write
        # static tokens only: no ServiceAccount to review (without serviceAccounts the default
        # callers, the namespace's ServiceAccounts, would still need the grant)
        api.pools[0]["spec"] = {"auth": {"serviceAccounts": [], "tokensSecret": "t"}}
        assert await keeper.sync()
        assert _names(api) == ["b/two-router"]
        del api.pools[1]  # deleted
        assert await keeper.sync()
        assert _names(api) == []

    asyncio.run(run())
    assert keeper.patches == 3
    assert api.listed[:2] == [
        "/apis/snakepit.dev/v1alpha1/namespaces/a/snakepitpools",
        "/apis/snakepit.dev/v1alpha1/namespaces/b/snakepitpools",
    ]


def test_cluster_wide_it_lists_every_namespace_and_without_a_binding_it_writes_nothing() -> None:
    api = BindingApi([_pool("a", "one", AUTH), _pool("c", "x", AUTH)])
    keeper = TokenReviewers(api, BINDING)  # type: ignore[arg-type]
    assert asyncio.run(keeper.sync())
    assert api.listed == ["/apis/snakepit.dev/v1alpha1/snakepitpools"]
    assert _names(api) == ["a/one-router", "c/x-router"]
    missing = BindingApi([_pool("a", "one", AUTH)], binding=False)
    assert not asyncio.run(TokenReviewers(missing, BINDING).sync())  # type: ignore[arg-type]


def test_run_retries_a_refused_write_and_syncs_again_when_touched() -> None:
    api = BindingApi([_pool("a", "one", AUTH)])
    api.fail_next = ApiError(409, "Conflict", "the object has been modified")
    keeper = TokenReviewers(api, BINDING, ["a"], resync_seconds=3600)  # type: ignore[arg-type]

    async def run() -> None:
        task = asyncio.create_task(keeper.run())
        try:
            for _ in range(200):
                if _names(api) == ["a/one-router"]:
                    break
                await asyncio.sleep(0.01)
            assert _names(api) == ["a/one-router"]  # after one refusal and a backoff
            api.pools.append(_pool("a", "two", AUTH))
            keeper.touch()
            for _ in range(200):
                if len(_names(api)) == 2:
                    break
                await asyncio.sleep(0.01)
            assert _names(api) == ["a/one-router", "a/two-router"]
        finally:
            task.cancel()

    asyncio.run(run())


def test_without_a_binding_name_the_keeper_does_nothing() -> None:
    api = BindingApi([_pool("a", "one", AUTH)])
    asyncio.run(TokenReviewers(api, "").run())  # type: ignore[arg-type]
    assert api.listed == []


@pytest.mark.parametrize(
    ("env", "binding"),
    [({}, ""), ({"SNAKEPIT_TOKENREVIEW_BINDING": BINDING}, BINDING)],
)
def test_the_binding_name_comes_from_the_chart(env: dict[str, str], binding: str) -> None:
    assert OperatorConfig.from_env(env).tokenreview_binding == binding
