"""Kubernetes trust boundaries the operator builds: network policies in and out, LoadBalancer
refusal, default resources and /tmp limits, Redis memory bound, limits reaching the pods."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import pytest

from snakepit.operator.builders import build_children
from snakepit.operator.builders.common import quantity_bytes
from snakepit.operator.builders.store import redis_maxmemory
from snakepit.operator.config import OperatorConfig
from snakepit.operator.spec import SpecError

from .test_operator_builders import CONFIG, PLAIN, arg, children, container, env, make_pool

METADATA = ipaddress.ip_address("169.254.169.254")


def egress_reaches(rule: dict[str, Any], address: ipaddress.IPv4Address) -> bool:
    """Whether an egress rule's ipBlocks admit ``address`` (peers by selector never do)."""
    for peer in rule.get("to", []):
        block = peer.get("ipBlock")
        if block is None:
            continue
        network = ipaddress.ip_network(block["cidr"])
        if address.version != network.version or address not in network:
            continue
        if not any(address in ipaddress.ip_network(e) for e in block.get("except", [])):
            return True
    return False


def ports(rule: dict[str, Any]) -> set[int]:
    return {p["port"] for p in rule.get("ports", [])}


def test_the_router_admits_this_namespace_by_default_and_the_listed_callers_otherwise() -> None:
    policy = children()["NetworkPolicy/demo-router"]["spec"]
    assert policy["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == "router"
    pool_pods = {"podSelector": {"matchLabels": {"snakepit.dev/pool": "demo"}}}
    grpc, metrics, internal = policy["ingress"]
    assert grpc == {
        "from": [{"podSelector": {}}, pool_pods],
        "ports": [{"protocol": "TCP", "port": 50051}],
    }
    assert metrics == {"ports": [{"protocol": "TCP", "port": 9090}]}  # scrapers, any namespace
    # TLS (the default): workers' ctx.call_tool on the internal port, pool pods only
    assert internal == {"from": [pool_pods], "ports": [{"protocol": "TCP", "port": 50053}]}
    callers = [
        {"namespaceSelector": {"matchLabels": {"team": "ml"}}},
        {"ipBlock": {"cidr": "10.1.0.0/16"}},
    ]
    listed = children({"networkPolicy": {"routerClients": callers}})["NetworkPolicy/demo-router"]
    # the listed callers, and the pool's own pods (ctx.call_tool, routers forwarding to routers)
    assert listed["spec"]["ingress"][0]["from"] == [*callers, pool_pods]


def test_an_autoscaled_router_admits_the_operator_pods_that_read_its_load() -> None:
    """Found under a real engine: the autoscaler (in the operator's namespace) reads each
    router over gRPC, which the default rule (this namespace's pods) refuses."""
    config = replace(
        CONFIG,
        namespace="snakepit-system",
        pod_labels=(("app.kubernetes.io/instance", "sp"), ("app.kubernetes.io/name", "op")),
    )
    operator = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "snakepit-system"}},
        "podSelector": {
            "matchLabels": {"app.kubernetes.io/instance": "sp", "app.kubernetes.io/name": "op"}
        },
    }

    def router_peers(spec: dict[str, Any], config: OperatorConfig) -> list[Any]:
        built = build_children(make_pool(spec), config, "sec")
        (policy,) = [
            o
            for o in built
            if o["metadata"]["name"] == "demo-router" and o["kind"] == "NetworkPolicy"
        ]
        return list(policy["spec"]["ingress"][0]["from"])

    autoscaled = {"autoscaling": {"minReplicas": 1, "maxReplicas": 4}}
    assert operator in router_peers(autoscaled, config)
    assert operator not in router_peers({}, config)  # no autoscaler, no access
    # An operator that does not know where it runs admits nobody extra.
    assert router_peers(autoscaled, CONFIG) == router_peers({}, CONFIG)


def test_no_pod_may_reach_the_cloud_metadata_endpoint() -> None:
    external = {"sessionStore": {"managed": False, "url": "redis://cache.example:6380/0"}}
    for spec in ({}, external):
        for name, obj in children(spec).items():
            if obj["kind"] != "NetworkPolicy":
                continue
            assert "Egress" in obj["spec"]["policyTypes"], name
            for rule in obj["spec"]["egress"]:
                assert not egress_reaches(rule, METADATA), (name, rule)


def test_workers_reach_dns_router_and_store_only_plus_what_the_spec_allows() -> None:
    allowed = {"to": [{"ipBlock": {"cidr": "10.9.0.0/16"}}], "ports": [{"port": 443}]}
    spec = {**PLAIN, "networkPolicy": {"allowEgress": [allowed]}}  # TLS adds the internal port
    workers = children(spec)["NetworkPolicy/demo-workers"]
    rules = workers["spec"]["egress"]
    assert ports(rules[0]) == {53}
    assert rules[1] == {
        "to": [
            {
                "podSelector": {
                    "matchLabels": {
                        "snakepit.dev/pool": "demo",
                        "app.kubernetes.io/component": "router",
                    }
                }
            }
        ],
        "ports": [{"protocol": "TCP", "port": 50051}],
    }
    assert ports(rules[2]) == {6379} and "ipBlock" not in rules[2]["to"][0]
    assert rules[3] == allowed
    # Nothing but the user's own rule opens 443/6443: tool code cannot call the API server.
    assert not [r for r in rules[:3] if ports(r) & {443, 6443}]


def test_the_router_reaches_the_api_server_and_redis_reaches_nothing() -> None:
    built = children()
    router = built["NetworkPolicy/demo-router"]["spec"]["egress"]
    assert any(ports(r) == {443, 6443} for r in router)
    assert any(ports(r) == {50052} for r in router)
    assert built["NetworkPolicy/demo-redis"]["spec"]["egress"] == []


def test_an_external_store_is_reached_on_its_own_port() -> None:
    spec = {"sessionStore": {"managed": False, "url": "redis://cache.example:6380/0"}}
    rules = children(spec)["NetworkPolicy/demo-workers"]["spec"]["egress"]
    assert any(ports(r) == {6380} for r in rules)


def test_a_load_balancer_router_without_source_ranges_is_refused() -> None:
    # (what else it needs, and one that has it all: test_operator_secure_default.py)
    with pytest.raises(SpecError, match=r"missing: spec\.router\.loadBalancerSourceRanges"):
        children({"router": {"serviceType": "LoadBalancer"}})


def test_pods_get_default_resources_unless_the_spec_sets_them() -> None:
    built = children()
    assert container(built["Deployment/demo-workers"])["resources"]["limits"]["memory"] == "2Gi"
    mine = {"limits": {"memory": "8Gi", "nvidia.com/gpu": "1"}}
    workers = children({"resources": mine})["Deployment/demo-workers"]
    assert container(workers)["resources"] == mine


def test_redis_refuses_writes_before_its_memory_limit_kills_it() -> None:
    redis = children()["StatefulSet/demo-redis"]
    assert env(redis)["REDIS_MAXMEMORY"]["value"] == str(int(2**30 * 0.7))
    sized = children({"sessionStore": {"resources": {"limits": {"memory": "500M"}}}})
    assert env(sized["StatefulSet/demo-redis"])["REDIS_MAXMEMORY"]["value"] == "350000000"
    assert redis_maxmemory({}) == 700 * 2**20
    assert [quantity_bytes(q) for q in ("1Gi", "1.5Gi", "500M", "1024", "lots")] == [
        2**30,
        int(1.5 * 2**30),
        500_000_000,
        1024,
        None,
    ]


def test_limits_and_max_call_seconds_reach_the_pods() -> None:
    built = children(
        {
            "maxCallSeconds": 42,
            "limits": {
                "maxValueBytes": 1000,
                "maxWatchersPerSession": 3,
                "maxSessionsPerPrincipal": 50,
                "valueHelpers": 1,
                "maxStreamsPerConnection": 64,
            },
        }
    )
    worker_args = container(built["Deployment/demo-workers"])["args"]
    assert arg(worker_args, "--max-call-seconds") == "42"
    router_args = container(built["Deployment/demo-router"])["args"]
    assert arg(router_args, "--max-value-bytes") == "1000"
    assert arg(router_args, "--max-watchers-per-session") == "3"
    assert arg(router_args, "--max-sessions-per-principal") == "50"
    assert arg(router_args, "--value-helpers") == "1"
    assert arg(router_args, "--max-streams-per-connection") == "64"
    assert "--max-variables" not in router_args  # unset limits keep the router's default
    assert arg(container(children()["Deployment/demo-workers"])["args"], "--max-call-seconds") == (
        "300"
    )


@pytest.mark.parametrize(
    "peer",
    [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}, {"namespaceSelector": {}}],
)
@pytest.mark.parametrize("field", ["directClients", "routerClients"])
def test_peers_that_admit_anybody_are_refused(field: str, peer: dict[str, Any]) -> None:
    with pytest.raises(SpecError, match="admits every"):
        children({"networkPolicy": {field: [peer]}})


def test_pool_wide_hosted_tool_principals_reach_the_router() -> None:
    built = children(
        {"hostedTools": {"poolWidePrincipals": ["alice", "system:serviceaccount:ml:app"]}}
    )
    args = container(built["Deployment/demo-router"])["args"]
    pairs = [args[i + 1] for i, word in enumerate(args) if word == "--allow-pool-tools"]
    assert pairs == ["alice", "system:serviceaccount:ml:app"]
    assert "--allow-pool-tools" not in container(children()["Deployment/demo-router"])["args"]
    with pytest.raises(SpecError, match="poolWidePrincipals"):
        children({"hostedTools": {"poolWidePrincipals": ["a/b"]}})
