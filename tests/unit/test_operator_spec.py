"""Parsing a SnakepitPool into typed values: defaults, and what the builders refuse."""

from __future__ import annotations

import pytest

from snakepit.operator.config import OperatorConfig
from snakepit.operator.spec import DEFAULT_ADAPTER, SpecError, parse_pool, parse_spec


def test_empty_spec_gets_the_documented_defaults() -> None:
    spec = parse_spec({})
    assert spec.replicas == 2
    assert spec.adapter == DEFAULT_ADAPTER
    assert spec.worker_concurrency == 4
    assert spec.drain_timeout_seconds == 25
    assert spec.router.replicas == 2
    assert spec.router.service_type == "ClusterIP"
    assert spec.router.port == 50051
    assert spec.session.ttl_seconds == 3600
    assert spec.session.max_sessions == 10_000
    assert spec.session_store.managed is True
    assert spec.session_store.storage.size == "1Gi"
    assert spec.network_policy.enabled is True
    assert spec.image is None


def test_pool_identity_comes_from_metadata() -> None:
    pool = parse_pool(
        {"metadata": {"name": "p", "namespace": "n", "uid": "u", "generation": 9}, "spec": {}}
    )
    assert (pool.name, pool.namespace, pool.uid, pool.generation) == ("p", "n", "u", 9)


def test_external_store_needs_a_url() -> None:
    with pytest.raises(SpecError, match="url"):
        parse_spec({"sessionStore": {"managed": False}})


def test_unknown_service_type_is_refused() -> None:
    with pytest.raises(SpecError, match="serviceType"):
        parse_spec({"router": {"serviceType": "ExternalName"}})


def test_operator_config_reads_its_environment() -> None:
    config = OperatorConfig.from_env(
        {
            "SNAKEPIT_ROUTER_IMAGE": "r:1",
            "SNAKEPIT_REDIS_IMAGE": "db:1",
            "SNAKEPIT_WORKER_IMAGE": "w:1",
            "SNAKEPIT_IMAGE_PULL_SECRETS": "a, b,",
            "POD_NAMESPACE": "ops",
            "SNAKEPIT_OPERATOR_POD_LABELS": "b=2,a=1",
        }
    )
    assert config.operator_peer() == {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
        "podSelector": {"matchLabels": {"a": "1", "b": "2"}},
    }
    assert (config.router_image, config.redis_image, config.worker_image) == ("r:1", "db:1", "w:1")
    assert config.image_pull_secrets == ("a", "b")
    defaults = OperatorConfig.from_env({})
    assert defaults.operator_peer() is None
    assert defaults.router_image == "snakepit/operator:dev"
    assert defaults.redis_image == "snakepit/redis:dev"


def test_router_pods_carry_the_data_path_the_spec_names(monkeypatch: pytest.MonkeyPatch) -> None:
    """auto by default, as for ``snakepit router`` and ``serve``: HAProxy from the router image
    unless the spec needs the Python router; the router command line the builder writes is one
    its parser accepts."""
    from snakepit.cli import build_parser

    monkeypatch.delenv("SNAKEPIT_DATA_PATH", raising=False)
    assert build_parser().parse_args(["serve"]).data_path == "auto"
    assert build_parser().parse_args(["router"]).data_path == "auto"

    from .test_operator_builders import arg, children, container

    def args(spec: dict[str, object] | None = None) -> list[str]:
        return list(container(children(spec)["Deployment/demo-router"])["args"])

    assert parse_spec({}).router.data_path == "auto"
    assert arg(args(), "--data-path") == "auto"
    assert arg(args({"router": {"dataPath": "python"}}), "--data-path") == "python"
    assert arg(args({"router": {"dataPath": "auto"}}), "--data-path") == "auto"
    parsed = build_parser().parse_args(args({"router": {"dataPath": "haproxy"}}))
    assert parsed.data_path == "haproxy"
    # An autoscaled pool takes the path it names: HAProxy reports its queue to the autoscaler
    # and hands a call that finds no worker to the Python router, which holds it.
    for path in ("auto", "haproxy"):
        autoscaled = {"autoscaling": {"maxReplicas": 4}, "router": {"dataPath": path}}
        assert parse_spec(autoscaled).autoscaling is not None
        assert arg(args(autoscaled), "--data-path") == path


def test_a_data_path_the_router_cannot_serve_is_refused_at_apply() -> None:
    with pytest.raises(SpecError, match="dataPath must be one of auto, haproxy, python"):
        parse_spec({"router": {"dataPath": "envoy"}})
    # Both data paths count calls per principal (router/haproxy/principal_shares.py).
    for path in ("auto", "haproxy", "python"):
        shared = parse_spec({"limits": {"maxCallsPerPrincipal": 4}, "router": {"dataPath": path}})
        assert shared.router.data_path == path
        assert shared.limits.max_calls_per_principal == 4
