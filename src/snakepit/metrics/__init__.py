"""Prometheus metrics of the router, the workers and the operator, defined in one place.

Every process keeps its own ``CollectorRegistry`` (so several routers or workers can live in one
test process) and serves it over HTTP only when given a metrics port: ``serve_http``. The names
here are the contract the dashboard, the docs and any other data path (HAProxy) follow; label
sets are bounded (tool names are capped by ``BoundedLabels``, never a session id).
"""

from __future__ import annotations

from .common import BoundedLabels, TimedStore, code_name, serve_http, tool_name_of
from .operator import OperatorMetrics
from .router import RouterMetrics
from .worker import WorkerMetrics

__all__ = [
    "BoundedLabels",
    "OperatorMetrics",
    "RouterMetrics",
    "TimedStore",
    "WorkerMetrics",
    "code_name",
    "serve_http",
    "tool_name_of",
]
