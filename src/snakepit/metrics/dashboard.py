"""The Grafana dashboard of a pool, built from the metric names defined in this package.

A pure function (``dashboard()``) so the queries sit next to the metrics they read; the chart
ships its output (``charts/snakepit/dashboards/snakepit.json``, regenerated with
``python -m snakepit.metrics.dashboard``) and a test runs every query against a real Prometheus
scraping a real pool. Queries select pools with the ``pool`` label, which the scrape config adds
from the pods' ``snakepit.dev/pool`` label (docs/observability.md).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

POOL = 'pool=~"$pool"'
RATE = "$__rate_interval"


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    description: str = ""


def _q(expr: str, legend: str = "") -> tuple[str, str]:
    return (expr, legend)


def _quantiles(bucket: str, by: str = "", legend: str = "") -> tuple[tuple[str, str], ...]:
    group = f"le, {by}" if by else "le"
    return tuple(
        _q(
            f"histogram_quantile({q}, sum by ({group}) (rate({bucket}{{{POOL}}}[{RATE}])))",
            f"{legend}p{int(q * 100)}" if not by else f"{{{{{by}}}}} p{int(q * 100)}",
        )
        for q in ((0.5, 0.9, 0.99) if not by else (0.99,))
    )


def _rate(metric: str, by: str, where: str = "") -> str:
    selector = f"{POOL},{where}" if where else POOL
    return f"sum by ({by}) (rate({metric}{{{selector}}}[{RATE}]))"


ROWS: tuple[tuple[str, tuple[Panel, ...]], ...] = (
    (
        "Pool: golden signals",
        (
            Panel(
                "Calls per second by status",
                (_q(_rate("snakepit_router_calls_total", "code"), "{{code}}"),),
                "reqps",
            ),
            Panel(
                "Error ratio",
                (
                    _q(
                        f'sum(rate(snakepit_router_calls_total{{{POOL},code!="OK"}}[{RATE}])) / '
                        f"sum(rate(snakepit_router_calls_total{{{POOL}}}[{RATE}]))",
                        "errors",
                    ),
                ),
                "percentunit",
            ),
            Panel(
                "Latency, end to end",
                _quantiles("snakepit_router_call_duration_seconds_bucket"),
                "s",
            ),
            Panel(
                "In flight and queued",
                (
                    _q(f"sum(snakepit_router_in_flight{{{POOL}}})", "in flight"),
                    _q(f"sum(snakepit_router_queued{{{POOL}}})", "queued"),
                ),
            ),
            Panel(
                "Worker saturation",
                (
                    _q(
                        f"sum(snakepit_worker_in_flight{{{POOL}}}) / "
                        f"sum(snakepit_worker_concurrency_limit{{{POOL}}})",
                        "in flight / limit",
                    ),
                ),
                "percentunit",
            ),
            Panel("Queue wait", _quantiles("snakepit_router_queue_wait_seconds_bucket"), "s"),
            Panel(
                "Queue rejections and retries",
                (
                    _q(
                        _rate("snakepit_router_queue_rejections_total", "reason"),
                        "rejected: {{reason}}",
                    ),
                    _q(_rate("snakepit_router_retries_total", "code"), "retried: {{code}}"),
                ),
                "reqps",
            ),
            Panel(
                "Workers and sessions",
                (
                    _q(f"max by (state) (snakepit_router_workers{{{POOL}}})", "workers {{state}}"),
                    _q(f"max(snakepit_router_sessions{{{POOL}}})", "sessions"),
                ),
            ),
        ),
    ),
    (
        "Per tool",
        (
            Panel(
                "Calls per second by tool",
                (_q(_rate("snakepit_router_calls_total", "tool"), "{{tool}}"),),
                "reqps",
            ),
            Panel(
                "Errors per second by tool",
                (_q(_rate("snakepit_router_calls_total", "tool", 'code!="OK"'), "{{tool}}"),),
                "reqps",
            ),
            Panel(
                "p99 latency by tool (router)",
                _quantiles("snakepit_router_call_duration_seconds_bucket", "tool"),
                "s",
            ),
            Panel(
                "p99 tool run time (worker)",
                _quantiles("snakepit_worker_tool_duration_seconds_bucket", "tool"),
                "s",
            ),
        ),
    ),
    (
        "Per worker",
        (
            Panel(
                "In flight by worker",
                (
                    _q(
                        f"max by (worker) (snakepit_router_worker_in_flight{{{POOL}}})",
                        "{{worker}}",
                    ),
                ),
            ),
            Panel(
                "p99 latency by worker",
                _quantiles("snakepit_router_worker_call_duration_seconds_bucket", "worker"),
                "s",
            ),
            Panel(
                "Worker memory (RSS)",
                (
                    _q(
                        f'process_resident_memory_bytes{{{POOL},component="worker"}}',
                        "{{instance}}",
                    ),
                ),
                "bytes",
            ),
            Panel(
                "Recycles and refusals",
                (
                    _q(_rate("snakepit_worker_recycles_total", "reason"), "recycled: {{reason}}"),
                    _q(
                        _rate("snakepit_worker_refused_calls_total", "reason"),
                        "refused: {{reason}}",
                    ),
                ),
                "reqps",
            ),
            Panel(
                "SessionContext cache hit ratio",
                (
                    _q(
                        f'sum(rate(snakepit_worker_session_cache_lookups_total{{{POOL},result="hit"}}[{RATE}])) / '
                        f"sum(rate(snakepit_worker_session_cache_lookups_total{{{POOL}}}[{RATE}]))",
                        "hits",
                    ),
                ),
                "percentunit",
            ),
            Panel(
                "Session store p99 by operation",
                (*_quantiles("snakepit_router_store_operation_duration_seconds_bucket", "op"),),
                "s",
            ),
            Panel(
                "Bytes through the router",
                (
                    _q(f"sum(rate(snakepit_router_received_bytes_total{{{POOL}}}[{RATE}]))", "in"),
                    _q(f"sum(rate(snakepit_router_sent_bytes_total{{{POOL}}}[{RATE}]))", "out"),
                ),
                "Bps",
            ),
        ),
    ),
    (
        "Operator",
        (
            Panel(
                "Reconcile passes by result",
                (
                    _q(
                        f"sum by (result) (rate(snakepit_operator_reconcile_passes_total[{RATE}]))",
                        "{{result}}",
                    ),
                ),
                "ops",
            ),
            Panel(
                "Reconcile pass duration p99",
                (
                    _q(
                        "histogram_quantile(0.99, sum by (le) "
                        f"(rate(snakepit_operator_reconcile_duration_seconds_bucket[{RATE}])))",
                        "p99",
                    ),
                ),
                "s",
            ),
            Panel(
                "Work queue and pools",
                (
                    _q("sum(snakepit_operator_queue_depth)", "queue depth"),
                    _q(
                        'sum by (condition) (snakepit_operator_pools{status="True"})',
                        "{{condition}}",
                    ),
                ),
            ),
            Panel(
                "Seconds since a pool's last clean pass",
                (
                    _q(
                        "time() - snakepit_operator_last_success_timestamp_seconds",
                        "{{namespace}}/{{pool}}",
                    ),
                ),
                "s",
            ),
        ),
    ),
)


def panels() -> list[Panel]:
    return [panel for _row, row_panels in ROWS for panel in row_panels]


def dashboard() -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (a Prometheus datasource chosen by variable)."""
    items: list[dict[str, Any]] = []
    y = 0
    next_id = 1
    for title, row_panels in ROWS:
        items.append({"type": "row", "title": title, "id": next_id, "collapsed": False,
                      "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})  # fmt: skip
        next_id += 1
        y += 1
        for index, panel in enumerate(row_panels):
            items.append(
                {
                    "type": "timeseries",
                    "title": panel.title,
                    "id": next_id,
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "gridPos": {"h": 8, "w": 6, "x": (index % 4) * 6, "y": y + (index // 4) * 8},
                    "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
                    "targets": [
                        {"expr": expr, "legendFormat": legend, "refId": chr(ord("A") + i)}
                        for i, (expr, legend) in enumerate(panel.queries)
                    ],
                }
            )
            next_id += 1
        y += ((len(row_panels) + 3) // 4) * 8
    return {
        "title": "Snakepit",
        "uid": "snakepit-pools",
        "tags": ["snakepit"],
        "schemaVersion": 39,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "type": "datasource",
                    "query": "prometheus",
                    "label": "Data source",
                },
                {
                    "name": "pool",
                    "type": "query",
                    "datasource": {"type": "prometheus", "uid": "${datasource}"},
                    "query": "label_values(snakepit_router_calls_total, pool)",
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "label": "Pool",
                },
            ]
        },
        "panels": items,
    }


def main() -> int:
    json.dump(dashboard(), sys.stdout, indent=1)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
