"""A pool spec that says nothing about security is secure (issue 12): operator-issued TLS on
every hop, callers authenticated (the ServiceAccounts of the pool's namespace), and only an
explicit ``enabled: false`` turns either off, which status and a Warning event then show.
LoadBalancer routers are allowed only with both on and source ranges set."""

from __future__ import annotations

from typing import Any

import pytest

from snakepit.operator.builders.tokenreview import tokenreview_subjects
from snakepit.operator.reconciler import AUTH_DISABLED_MESSAGE, TLS_DISABLED_MESSAGE
from snakepit.operator.spec import SpecError, parse_spec
from snakepit.operator.status import auth_status, tls_status
from snakepit.operator.tokenreviewers import pool_auths

from .test_operator_builders import arg, children, container, make_pool
from .test_operator_reconciler import setup

OPEN = {"tls": {"enabled": False}, "auth": {"enabled": False}}
LB_RANGES = ["203.0.113.0/24"]


def router_args(spec: dict[str, Any] | None = None) -> list[str]:
    return list(container(children(spec)["Deployment/demo-router"])["args"])


def test_an_empty_spec_gets_operator_issued_tls_and_the_namespaces_callers() -> None:
    pool = make_pool()  # namespace "ml"
    assert pool.spec.tls.enabled and pool.spec.tls.operator_issued and not pool.spec.tls.explicit
    auth = pool.spec.auth
    assert auth.enabled and auth.default_callers and not auth.explicit
    assert auth.service_accounts == ("ml/*",) and auth.audience == "snakepit"
    args = router_args()
    assert arg(args, "--allow-service-account") == "ml/*"
    assert arg(args, "--token-audience") == "snakepit"
    assert "--ticket-key" in args and "--pool-tls-dir" in args and "--tls-cert" in args
    workers = container(children()["Deployment/demo-workers"])
    assert "--pool-tls-dir" in workers["args"]
    assert "SNAKEPIT_TICKET_PUBLIC_KEY" in {e["name"] for e in workers["env"]}
    assert tls_status(pool) == "Issued by the operator (Secret snakepit-certs)"
    assert auth_status(pool) == {"enabled": True, "callers": ["serviceaccount ml/*"]}
    # The default namespace is the pool's own, whichever that is.
    assert parse_spec({}, "team-a").auth.service_accounts == ("team-a/*",)


def test_listed_callers_replace_the_default_and_a_tokens_secret_adds_to_it() -> None:
    listed = make_pool({"auth": {"serviceAccounts": [{"namespace": "ci", "name": "runner"}]}})
    assert listed.spec.auth.service_accounts == ("ci/runner",)
    assert not listed.spec.auth.default_callers
    both = make_pool({"auth": {"tokensSecret": "callers", "directMode": ["*"]}})
    assert both.spec.auth.service_accounts == ("ml/*",) and both.spec.auth.tokens_secret
    assert auth_status(both) == {
        "enabled": True,
        "callers": ["serviceaccount ml/*", "tokens in Secret callers"],
        "directMode": ["*"],
    }
    tokens_only = make_pool({"auth": {"serviceAccounts": [], "tokensSecret": "callers"}})
    assert tokens_only.spec.auth.service_accounts == ()
    assert "--allow-service-account" not in router_args(
        {"auth": {"serviceAccounts": [], "tokensSecret": "callers"}}
    )


def test_auth_that_admits_nobody_is_refused_naming_the_way_out() -> None:
    with pytest.raises(SpecError, match=r"nobody could call this pool.*spec.auth.enabled: false"):
        parse_spec({"auth": {"serviceAccounts": []}}, "ml")


def test_only_explicit_opt_outs_turn_tls_and_auth_off_and_status_says_so() -> None:
    pool = make_pool(OPEN)
    assert not pool.spec.tls.enabled and pool.spec.tls.explicit
    assert not pool.spec.auth.enabled and pool.spec.auth.explicit
    assert pool.spec.auth.service_accounts == () and pool.spec.auth.tokens_secret is None
    assert tls_status(pool) == "Disabled (spec.tls.enabled: false)"
    assert auth_status(pool) == {"enabled": False, "reason": "spec.auth.enabled: false"}
    args = router_args(OPEN)
    assert not {"--ticket-key", "--allow-service-account", "--tls-cert"} & set(args)
    # Saying "true" is the same as saying nothing.
    said = make_pool({"tls": {"enabled": True}, "auth": {"enabled": True}})
    assert said.spec.auth.service_accounts == ("ml/*",) and said.spec.tls.operator_issued


async def test_each_explicit_opt_out_is_shown_in_status_and_as_a_warning_event() -> None:
    kube, reconciler, _ = setup(OPEN)
    await reconciler.reconcile(("ml", "demo"))
    assert ("Warning", "TLSDisabled", TLS_DISABLED_MESSAGE) in kube.events
    assert ("Warning", "AuthDisabled", AUTH_DISABLED_MESSAGE) in kube.events
    status = kube.objects[("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")]["status"]
    assert status["auth"] == {"enabled": False, "reason": "spec.auth.enabled: false"}
    only_auth, reconciler, _ = setup({"auth": {"enabled": False}})
    await reconciler.reconcile(("ml", "demo"))
    reasons = {e[1] for e in only_auth.events if e[0] == "Warning"}
    assert "AuthDisabled" in reasons and "TLSDisabled" not in reasons
    secure, reconciler, _ = setup()
    await reconciler.reconcile(("ml", "demo"))
    assert not [e for e in secure.events if e[0] == "Warning"]
    status = secure.objects[("snakepit.dev/v1alpha1", "SnakepitPool", "ml", "demo")]["status"]
    assert status["auth"] == {"enabled": True, "callers": ["serviceaccount ml/*"]}
    assert status["tls"] == "Issued by the operator (Secret snakepit-certs)"


def test_the_default_pools_router_is_granted_token_reviews_and_an_opted_out_one_is_not() -> None:
    bodies = [
        {"metadata": {"namespace": "ml", "name": "plain-default"}, "spec": {}},
        {"metadata": {"namespace": "ml", "name": "open"}, "spec": OPEN},
        {"metadata": {"namespace": "ml", "name": "tokens"},
         "spec": {"auth": {"serviceAccounts": [], "tokensSecret": "t"}}},
    ]  # fmt: skip
    assert tokenreview_subjects(pool_auths(bodies)) == [
        {"kind": "ServiceAccount", "name": "plain-default-router", "namespace": "ml"}
    ]


@pytest.mark.parametrize(
    ("spec", "missing"),
    [
        ({}, ["loadBalancerSourceRanges"]),
        ({"tls": {"enabled": False}}, ["TLS", "loadBalancerSourceRanges"]),
        ({"auth": {"enabled": False}}, ["authentication", "loadBalancerSourceRanges"]),
        ({**OPEN, "router": {"loadBalancerSourceRanges": LB_RANGES}}, ["TLS", "authentication"]),
    ],
    ids=["no ranges", "no tls", "no auth", "neither tls nor auth"],
)
def test_a_load_balancer_is_refused_naming_what_it_lacks(
    spec: dict[str, Any], missing: list[str]
) -> None:
    router = {"serviceType": "LoadBalancer", **spec.get("router", {})}
    with pytest.raises(SpecError) as refused:
        parse_spec({**spec, "router": router}, "ml")
    message = str(refused.value)
    lacking = message.split("missing: ")[1]
    for what in ("TLS", "authentication", "loadBalancerSourceRanges"):
        assert (what in lacking) == (what in missing), message


def test_a_load_balancer_with_tls_auth_and_ranges_is_built_and_admits_only_them() -> None:
    spec = {"router": {"serviceType": "LoadBalancer", "loadBalancerSourceRanges": LB_RANGES}}
    built = children(spec)
    service = built["Service/demo-router"]["spec"]
    assert service["type"] == "LoadBalancer"
    assert service["loadBalancerSourceRanges"] == LB_RANGES
    ingress = built["NetworkPolicy/demo-router"]["spec"]["ingress"][0]["from"]
    assert {"ipBlock": {"cidr": LB_RANGES[0]}} in ingress
    assert "loadBalancerSourceRanges" not in children()["Service/demo-router"]["spec"]
    everyone = {"serviceType": "LoadBalancer", "loadBalancerSourceRanges": ["0.0.0.0/0"]}
    with pytest.raises(SpecError, match="admits every address"):
        parse_spec({"router": everyone}, "ml")
