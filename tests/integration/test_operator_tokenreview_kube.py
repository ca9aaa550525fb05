"""The routers of pools that list ``spec.auth.serviceAccounts`` may create TokenReviews, with no
binding made by hand, and lose that as soon as their pool no longer needs it (control-plane
tier of test_operator_kube.py: the real operator process under the chart's RBAC, the real
RBAC authorizer and escalation check; no pod runs).

A router's ServiceAccount is proven able, or unable, by creating a TokenReview with a token of
its own (TokenRequest API) of a real caller's token; ``kubectl auth can-i`` answers for
ServiceAccounts that no longer exist.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from .test_operator_kube import (
    TOKENREVIEW_BINDING,
    OperatorEnv,
    op,
    service_account_kubeconfig,
    wait_for,
)

pytestmark = pytest.mark.kube

__all__ = ["op"]

AUDIENCE = "snakepit"


def _subjects(env: OperatorEnv) -> set[str]:
    binding = env.admin.json("get", "clusterrolebinding", TOKENREVIEW_BINDING)
    return {f"{s['namespace']}/{s['name']}" for s in binding.get("subjects") or ()}


def _review(env: OperatorEnv, kubeconfig: Path, token: str) -> tuple[int, Any]:
    """Create a TokenReview of ``token`` as the account of ``kubeconfig``: (exit code, answer
    or error text)."""
    review = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "spec": {"token": token, "audiences": [AUDIENCE]},
    }
    proc = env.admin.run(
        f"--kubeconfig={kubeconfig}", "create", "--validate=false", "-f", "-", "-o", "json",
        stdin=json.dumps(review), check=False,
    )  # fmt: skip
    return proc.returncode, json.loads(proc.stdout) if proc.returncode == 0 else proc.stderr


def _can_review(env: OperatorEnv, account: str) -> bool:
    who = f"system:serviceaccount:{env.namespace}:{account}"
    proc = env.admin.run("auth", "can-i", "create", "tokenreviews", "--as", who, check=False)
    return proc.stdout.strip() == "yes"


def test_a_router_may_review_tokens_while_its_pool_lists_service_accounts(
    op: OperatorEnv, tmp_path: Path
) -> None:
    ns = op.namespace
    accounts = {"auth": {"serviceAccounts": [{"namespace": ns, "name": "caller"}]}}
    op.admin.run("-n", ns, "create", "serviceaccount", "caller")
    caller = op.admin.run(
        "-n", ns, "create", "token", "caller", "--audience", AUDIENCE, "--duration", "10m"
    ).stdout.strip()  # fmt: skip
    op.create_pool("reviewed", {"replicas": 0, "router": {"replicas": 0}, **accounts})
    # Static tokens only (an empty list replaces the default callers): no review needed.
    tokens_only = {"serviceAccounts": [], "tokensSecret": "callers"}
    op.create_pool("tokens-only", {"replicas": 0, "auth": tokens_only})
    # Nothing said about auth: the namespace's ServiceAccounts are the callers, reviewed.
    op.create_pool("defaulted", {"replicas": 0, "router": {"replicas": 0}})
    wait_for("the router's subject", lambda: f"{ns}/reviewed-router" in _subjects(op), 30)
    wait_for("the default pool's subject", lambda: f"{ns}/defaulted-router" in _subjects(op), 30)
    assert f"{ns}/tokens-only-router" not in _subjects(op)  # static tokens need no review

    wait_for("the router ServiceAccount", lambda: op.get("v1", "ServiceAccount", "reviewed-router"))
    router = service_account_kubeconfig(op.admin, ns, "reviewed-router", tmp_path / "router.kc")
    code, answer = _review(op, router, caller)
    assert code == 0, answer
    assert answer["status"]["authenticated"] is True
    assert answer["status"]["user"]["username"] == f"system:serviceaccount:{ns}:caller"
    assert not _can_review(op, "tokens-only-router")

    # The pool stops listing ServiceAccounts: the same router, same token, is refused.
    op.patch_pool("reviewed", {"spec": {"auth": {"serviceAccounts": [], "tokensSecret": "t"}}})
    wait_for("the subject removed", lambda: f"{ns}/reviewed-router" not in _subjects(op), 30)
    code, error = wait_for(
        "a refused review", lambda: (r := _review(op, router, caller))[0] != 0 and r, 30, 0.5
    )
    assert "forbidden" in error.lower() and "tokenreviews" in error, error

    # Listed again, then the pool deleted: the subject goes with it.
    op.patch_pool("reviewed", {"spec": accounts})
    wait_for("the subject back", lambda: f"{ns}/reviewed-router" in _subjects(op), 30)
    assert _can_review(op, "reviewed-router")
    for pool in ("reviewed", "tokens-only", "defaulted"):
        op.admin.run("-n", ns, "delete", "spp", pool, "--wait=false")
    wait_for("the subject gone", lambda: f"{ns}/reviewed-router" not in _subjects(op), 30)
    assert not _can_review(op, "reviewed-router")


def test_the_operator_can_grant_token_reviews_and_nothing_else(op: OperatorEnv) -> None:
    """Its RBAC names that one binding and that one role; it does not hold the grant itself."""
    operator = f"system:serviceaccount:{op.namespace}:snakepit"

    def can(*what: str) -> bool:
        proc = op.admin.run("auth", "can-i", *what, "--as", operator, check=False)
        return proc.stdout.strip() == "yes"

    assert can("patch", f"clusterrolebindings/{TOKENREVIEW_BINDING}")
    assert can("bind", f"clusterroles/{TOKENREVIEW_BINDING}")
    assert not can("patch", "clusterrolebindings/cluster-admin")
    assert not can("create", "clusterrolebindings")
    assert not can("bind", "clusterroles/cluster-admin")
    assert not can("escalate", "clusterroles")
    assert not can("create", "tokenreviews")
    # Binding a role other than the reviewer through that binding is refused by the API server:
    # a binding's roleRef cannot change, and `bind` covers that one role only.
    proc = op.admin.run(
        f"--as={operator}", "patch", "clusterrolebinding", TOKENREVIEW_BINDING, "--type=merge",
        "-p", json.dumps({"roleRef": {"apiGroup": "rbac.authorization.k8s.io",
                                      "kind": "ClusterRole", "name": "cluster-admin"}}),
        check=False,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "cannot change roleRef" in proc.stderr or "forbidden" in proc.stderr.lower()
