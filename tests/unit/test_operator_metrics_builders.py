"""``spec.metrics``: scrapable router and worker pods, one metrics Service, an open port."""

from __future__ import annotations

from tests.unit.test_operator_builders import PLAIN, arg, children, container


def _matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_router_and_worker_pods_serve_metrics_and_say_so() -> None:
    built = children()
    service = built["Service/demo-metrics"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["ports"] == [
        {"name": "metrics", "port": 9090, "targetPort": "metrics", "protocol": "TCP"}
    ]
    for name in ("Deployment/demo-router", "Deployment/demo-workers"):
        deployment = built[name]
        template = deployment["spec"]["template"]["metadata"]
        assert template["annotations"]["prometheus.io/scrape"] == "true"
        assert template["annotations"]["prometheus.io/port"] == "9090"
        assert template["annotations"]["prometheus.io/path"] == "/metrics"
        assert _matches(service["spec"]["selector"], template["labels"]), name
        main = container(deployment)
        assert arg(main["args"], "--metrics-port") == "9090"
        assert {"name": "metrics", "containerPort": 9090, "protocol": "TCP"} in main["ports"]
    # the store's pods are the pool's too, but serve no metrics: the Service must skip them
    store = built["StatefulSet/demo-redis"]["spec"]["template"]["metadata"]["labels"]
    assert not _matches(service["spec"]["selector"], store)
    ingress = built["NetworkPolicy/demo-workers"]["spec"]["ingress"]
    assert {"ports": [{"protocol": "TCP", "port": 9090}]} in ingress


def test_metrics_port_is_configurable() -> None:
    built = children({"metrics": {"port": 9400}})
    assert arg(container(built["Deployment/demo-router"])["args"], "--metrics-port") == "9400"
    assert built["Service/demo-metrics"]["spec"]["ports"][0]["port"] == 9400


def test_metrics_can_be_turned_off() -> None:
    built = children({**PLAIN, "metrics": {"enabled": False}})
    assert "Service/demo-metrics" not in built
    for name in ("Deployment/demo-router", "Deployment/demo-workers"):
        main = container(built[name])
        assert "--metrics-port" not in main["args"]
        assert [p["name"] for p in main["ports"]] == ["grpc"]
        annotations = built[name]["spec"]["template"]["metadata"].get("annotations", {})
        assert not [k for k in annotations if k.startswith("prometheus.io/")]
    assert len(built["NetworkPolicy/demo-workers"]["spec"]["ingress"]) == 1


def test_otel_variables_of_the_pool_reach_the_routers_too() -> None:
    otel = {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://collector:4317"}
    built = children({"env": [otel, {"name": "MODEL", "value": "x"}]})
    router_env = container(built["Deployment/demo-router"])["env"]
    assert otel in router_env
    assert "MODEL" not in {e["name"] for e in router_env}
    assert otel in container(built["Deployment/demo-workers"])["env"]
