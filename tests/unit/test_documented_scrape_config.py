"""The Prometheus job docs/observability.md tells users to copy, checked against the chart.

The e2e test (tests/e2e/test_metrics_e2e.py) runs this very job against a cluster; here, without
one, it is checked to label series exactly as the chart's PodMonitor does (``pool`` and
``component``, the labels the dashboard selects on) and to keep only annotated metrics ports.
"""

from __future__ import annotations

import json
from pathlib import Path

from tests.fixtures.prometheus import documented_kubernetes_job, kubernetes_scrape_config

MONITORING = Path(__file__).resolve().parents[2] / "charts/snakepit/templates/monitoring.yaml"


def test_the_documented_job_labels_like_the_charts_pod_monitor() -> None:
    job = documented_kubernetes_job()
    assert job["kubernetes_sd_configs"] == [{"role": "pod"}]
    rules = job["relabel_configs"]
    keeps = {r["source_labels"][0]: r["regex"] for r in rules if r.get("action") == "keep"}
    assert keeps == {
        "__meta_kubernetes_pod_annotation_prometheus_io_scrape": "true",
        "__meta_kubernetes_pod_container_port_name": "metrics",
    }
    targets = {r["target_label"]: r["source_labels"] for r in rules if "target_label" in r}
    chart = MONITORING.read_text()
    for label in ("pool", "component"):
        (source,) = targets[label]
        assert f"sourceLabels: [{source}]\n          targetLabel: {label}" in chart


def test_outside_the_cluster_the_discovery_gets_address_token_ca_and_namespaces() -> None:
    config = json.loads(
        kubernetes_scrape_config(
            "https://10.0.0.1:6443", ["pools"], Path("/p/token"), Path("/p/ca.crt"), "1s"
        )
    )
    (job,) = config["scrape_configs"]
    assert job["kubernetes_sd_configs"] == [
        {
            "role": "pod",
            "api_server": "https://10.0.0.1:6443",
            "namespaces": {"names": ["pools"]},
            "authorization": {"credentials_file": "/p/token"},
            "tls_config": {"ca_file": "/p/ca.crt"},
        }
    ]
    assert job["relabel_configs"] == documented_kubernetes_job()["relabel_configs"]
    assert config["global"]["scrape_interval"] == "1s"
