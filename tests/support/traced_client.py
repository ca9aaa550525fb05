"""A traced application using ``snakepit.Client``: run as a process by tests/integration/test_tracing.py.

It configures OpenTelemetry from the OTEL_* environment (``snakepit.tracing.setup``), makes a few
calls under spans of its own and prints their trace ids as JSON, then flushes its spans.
"""

from __future__ import annotations

import contextlib
import json
import sys
from concurrent.futures import ThreadPoolExecutor

from opentelemetry import trace

from snakepit import Client, tracing
from snakepit.errors import ToolError


def main(target: str) -> None:
    assert tracing.setup("test-app"), "OTEL_EXPORTER_OTLP_ENDPOINT is not set"
    app = trace.get_tracer("test-app")
    ids: dict[str, object] = {}

    def traced(name: str, call):  # type: ignore[no-untyped-def]
        with app.start_as_current_span(name) as span:
            call()
            return format(span.get_span_context().trace_id, "032x")

    with Client(target) as client:
        ids["nested"] = traced("app nested", lambda: client.execute("nested_add", a=1, b=2))
        with client.session() as session:
            ids["store"] = traced("app store", lambda: session.execute("counter_increment"))

        def fail() -> None:
            with contextlib.suppress(ToolError):
                client.execute("fail", message="traced failure")

        ids["fail"] = traced("app fail", fail)
        # More calls than the pool's slots at once: some wait in the router's queue.
        with ThreadPoolExecutor(4) as threads:
            ids["held"] = list(
                threads.map(
                    lambda i: traced(f"app held {i}", lambda: client.execute("sleep", seconds=0.5)),
                    range(4),
                )
            )
    tracing.shutdown()
    print(json.dumps(ids), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
