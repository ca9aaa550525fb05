"""The ``snakepit`` command: serve, worker, router, operator, call, status.

Every option can also come from the environment (``SNAKEPIT_`` + the option name in capitals,
dashes as underscores), which is how pods are configured.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .autoscale.policy import (
    DEFAULT_IDLE_SECONDS,
    DEFAULT_SCALE_DOWN_SECONDS,
    DEFAULT_SCALE_UP_SECONDS,
)
from .grpc_options import DEFAULT_MAX_MESSAGE_MB

DEFAULT_TARGET = "localhost:50051"


def _env(name: str, default: Any, conv: Callable[[str], Any] = str) -> Any:
    raw = os.environ.get("SNAKEPIT_" + name.upper().replace("-", "_"))
    return default if raw is None or raw == "" else conv(raw)


def _add(
    parser: argparse.ArgumentParser,
    flag: str,
    default: Any,
    conv: Callable[[str], Any] = str,
    **kw: Any,
) -> None:
    name = flag.lstrip("-")
    parser.add_argument(flag, default=_env(name, default, conv), type=conv, **kw)


def _pool_options(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--worker-concurrency", 4, int, help="calls in flight per worker (default 4)")
    _add(parser, "--queue-size", 1000, int, help="calls that may wait when every worker is busy")
    _add(parser, "--queue-timeout", 30.0, float, help="seconds a call may wait in the queue")
    _add(
        parser,
        "--max-calls-per-principal",
        0,
        int,
        help="calls one caller may have running through a router at once; the rest wait "
        "(0: no limit, the default)",
    )
    from .router.shares import (
        DEFAULT_STORE_CALL_RATE_PER_PRINCIPAL,
        DEFAULT_STORE_CALLS_PER_PRINCIPAL,
    )

    _add(
        parser,
        "--max-store-calls-per-principal",
        DEFAULT_STORE_CALLS_PER_PRINCIPAL,
        int,
        help="session/variable calls one authenticated caller may have in flight on a router; "
        f"the rest wait (0: no limit; default {DEFAULT_STORE_CALLS_PER_PRINCIPAL})",
    )
    _add(
        parser,
        "--store-call-rate-per-principal",
        DEFAULT_STORE_CALL_RATE_PER_PRINCIPAL,
        float,
        help="session/variable calls a second one authenticated caller may start on a router, "
        "on average; more wait their turn (0: no limit; "
        f"default {DEFAULT_STORE_CALL_RATE_PER_PRINCIPAL:g})",
    )
    from .grpc_options import DEFAULT_MAX_STREAMS_PER_CONNECTION

    _add(
        parser,
        "--max-streams-per-connection",
        DEFAULT_MAX_STREAMS_PER_CONNECTION,
        int,
        help="calls one client connection may have open at once on the router; its further "
        "calls wait on the client's side, a few may be refused UNAVAILABLE (REFUSED_STREAM) "
        "(0: no bound, the default)",
    )
    _add(
        parser,
        "--affinity",
        "hint",
        choices=["hint", "strict"],
        help="session affinity (default hint)",
    )
    _add(parser, "--session-ttl", 3600.0, float, help="seconds a session lives after its last use")
    _add(parser, "--max-sessions", 10_000, int, help="live sessions the store accepts")
    _add(
        parser,
        "--max-sessions-per-principal",
        1000,
        int,
        help="live sessions one authenticated caller may hold (default 1000)",
    )
    _add(parser, "--max-message-mb", DEFAULT_MAX_MESSAGE_MB, int, help="largest message accepted")
    _add(
        parser,
        "--data-path",
        "auto",
        choices=["auto", "haproxy", "python"],
        help="what carries tool calls: auto (default: haproxy when installed and the options "
        "allow it, else python; the start-up line says which and why), haproxy, or python",
    )
    from .store.limits import DEFAULT_LIMITS as lim

    _add(parser, "--max-value-bytes", lim.max_value_bytes, int, help="stored bytes of one value")
    _add(
        parser,
        "--max-parsed-value-bytes",
        lim.max_parsed_value_bytes,
        int,
        help="bytes of one string/list/map value (parsed: in a value helper above 256 KiB)",
    )
    _add(
        parser,
        "--max-session-bytes",
        lim.max_session_bytes,
        int,
        help="value bytes a session holds",
    )
    _add(parser, "--max-variables", lim.max_variables, int, help="variables per session")
    _add(
        parser,
        "--max-metadata-bytes",
        lim.max_metadata_bytes,
        int,
        help="metadata per session/variable",
    )
    _add(
        parser, "--max-session-ttl", lim.max_ttl, float, help="longest TTL a caller may ask for (s)"
    )
    _add(parser, "--max-watchers", lim.max_watchers, int, help="WatchVariables streams in total")
    from .store.offload import DEFAULT_HELPERS

    _add(
        parser,
        "--value-helpers",
        DEFAULT_HELPERS,
        int,
        help="processes that check large written values off the event loop (0: on the loop)",
    )
    _add(
        parser,
        "--max-watchers-per-session",
        lim.max_watchers_per_session,
        int,
        help="WatchVariables streams per session",
    )


def _max_call_seconds(parser: argparse.ArgumentParser) -> None:
    from .worker.server import DEFAULT_MAX_CALL_SECONDS

    _add(
        parser,
        "--max-call-seconds",
        DEFAULT_MAX_CALL_SECONDS,
        float,
        help="longest a tool call may run, whatever its deadline (0: no limit; "
        f"default {DEFAULT_MAX_CALL_SECONDS:g})",
    )


def _store_limits(args: argparse.Namespace) -> Any:
    """The store limits the ``--max-*`` flags set (docs/security.md)."""
    from .store.limits import StoreLimits

    return StoreLimits(
        max_value_bytes=args.max_value_bytes,
        max_parsed_value_bytes=args.max_parsed_value_bytes,
        max_session_bytes=args.max_session_bytes,
        max_variables=args.max_variables,
        max_metadata_bytes=args.max_metadata_bytes,
        max_ttl=args.max_session_ttl,
        max_watchers=args.max_watchers,
        max_watchers_per_session=args.max_watchers_per_session,
        max_sessions_per_principal=args.max_sessions_per_principal,
    )


def _pool_config(args: argparse.Namespace) -> Any:
    from .router.pool import PoolConfig

    return PoolConfig(
        worker_concurrency=args.worker_concurrency,
        queue_size=args.queue_size,
        queue_timeout=args.queue_timeout,
        affinity=args.affinity,
        max_message_mb=args.max_message_mb,
        max_calls_per_principal=args.max_calls_per_principal,
        max_streams_per_connection=args.max_streams_per_connection,
    )


def _repeatable(parser: argparse.ArgumentParser, flag: str, metavar: str, text: str) -> None:
    """A flag given any number of times; its environment variable holds a comma-separated list."""
    raw = _env(flag.lstrip("-"), "")
    parser.add_argument(
        flag,
        action="append",
        default=[v.strip() for v in raw.split(",") if v.strip()],
        metavar=metavar,
        help=text + " (repeatable)",
    )


def _auth_options(parser: argparse.ArgumentParser, *, router: bool) -> None:
    """Identity flags of ``serve`` and ``router`` (docs/security.md)."""
    _add(parser, "--auth-tokens", "", help="PRINCIPAL:TOKEN per line; callers must present one")
    _repeatable(parser, "--admin", "PRINCIPAL", "a principal that sees every session")
    _repeatable(parser, "--allow-direct", "PRINCIPAL", "a principal allowed direct mode; '*': all")
    _repeatable(
        parser,
        "--allow-pool-tools",
        "PRINCIPAL",
        "a principal that may host tools for the whole pool (register_tool(pool_wide=True)); "
        "'*': all",
    )
    _repeatable(
        parser,
        "--allow-service-account",
        "NAMESPACE/NAME",
        "a ServiceAccount whose tokens may call (TokenReview); NAMESPACE/* for all",
    )
    _add(parser, "--token-audience", "snakepit", help="audience ServiceAccount tokens must carry")
    if router:
        _add(
            parser, "--ticket-key", "", help="Ed25519 PEM key the pool's routers sign tickets with"
        )
        _add(parser, "--ticket-audience", "snakepit", help="the pool's name in its tickets")


def _auth_config(args: argparse.Namespace) -> Any:
    from .security.gate import AuthConfig

    return AuthConfig(
        tokens_file=args.auth_tokens,
        admins=tuple(args.admin),
        direct=tuple(args.allow_direct),
        pool_tools=tuple(args.allow_pool_tools),
        service_accounts=tuple(args.allow_service_account),
        token_audience=args.token_audience,
        signing_key=getattr(args, "ticket_key", ""),
        audience=getattr(args, "ticket_audience", "snakepit"),
    )


def _metrics_option(parser: argparse.ArgumentParser, default: int | None, text: str) -> None:
    """``--metrics-port P``: serve Prometheus metrics at http://HOST:P/metrics (0: any port)."""
    _add(parser, "--metrics-port", default, _port_or_none, help=text)


def _port_or_none(raw: str) -> int | None:
    return None if raw.lower() in ("", "none", "off") else int(raw)


def _autoscale_options(parser: argparse.ArgumentParser) -> None:
    """Autoscaling, on with --max-workers: worker processes follow the load (calls in flight)."""
    _add(parser, "--max-workers", 0, int, help="autoscale up to this many workers (0: off)")
    _add(parser, "--min-workers", 1, int, help="autoscale down to this many; 0 when idle")
    _add(
        parser,
        "--target-load",
        0.0,
        float,
        help="calls in flight per worker to aim for (default 0.75 x --worker-concurrency)",
    )
    _add(
        parser,
        "--scale-up-delay",
        DEFAULT_SCALE_UP_SECONDS,
        float,
        help="seconds a higher load must last before workers are added (default 0)",
    )
    _add(
        parser,
        "--scale-down-delay",
        DEFAULT_SCALE_DOWN_SECONDS,
        float,
        help="seconds a lower load must last before workers are removed (default 60)",
    )
    _add(
        parser,
        "--idle-timeout",
        DEFAULT_IDLE_SECONDS,
        float,
        help="seconds without calls before zero workers, with --min-workers 0 (default 300)",
    )
    _add(parser, "--scale-interval", 0.5, float, help="seconds between load readings")


def _autoscale_policy(args: argparse.Namespace) -> Any:
    """The policy of ``serve --max-workers``, or None (a fixed --workers pool)."""
    if args.max_workers <= 0:
        return None
    from .autoscale.policy import Policy, default_target

    try:
        return Policy(
            min_replicas=args.min_workers,
            max_replicas=args.max_workers,
            target_per_worker=args.target_load or default_target(args.worker_concurrency),
            scale_up_seconds=args.scale_up_delay,
            scale_down_seconds=args.scale_down_delay,
            idle_seconds=args.idle_timeout,
        )
    except ValueError as exc:
        raise SystemExit(f"snakepit serve: {exc}") from None


def _server_tls_options(parser: argparse.ArgumentParser) -> None:
    _add(parser, "--tls-cert", "", help="serve TLS with this PEM certificate (chain)")
    _add(parser, "--tls-key", "", help="the PEM private key of --tls-cert")
    _add(
        parser,
        "--tls-client-ca",
        "",
        help="require client certificates signed by this PEM CA (mutual TLS)",
    )


def _server_tls(args: argparse.Namespace) -> Any:
    """The TlsFiles of --tls-cert/--tls-key/--tls-client-ca, or None (plaintext)."""
    from .security.tls import TlsFiles

    if not (args.tls_cert or args.tls_key or args.tls_client_ca):
        return None
    if not (args.tls_cert and args.tls_key):
        raise SystemExit("snakepit: --tls-cert and --tls-key go together")
    return _checked(TlsFiles(args.tls_cert, args.tls_key, args.tls_client_ca))


def _checked(files: Any) -> Any:
    """``files`` once they exist and match; else exit naming what is wrong."""
    try:
        files.check()
    except ValueError as exc:
        raise SystemExit(f"snakepit: {exc}") from None
    return files


def _pool_tls_option(parser: argparse.ArgumentParser) -> None:
    _add(
        parser,
        "--pool-tls-dir",
        "",
        help="directory with tls.crt, tls.key and ca.crt from the pool CA: mutual TLS between "
        "the router and its workers",
    )


def _pool_tls(args: argparse.Namespace) -> Any:
    from .security.tls import TlsFiles

    if not args.pool_tls_dir:
        return None
    return _checked(TlsFiles.from_dir(args.pool_tls_dir))


def _health_port_option(parser: argparse.ArgumentParser) -> None:
    _add(
        parser,
        "--health-port",
        0,
        int,
        help="also serve grpc.health.v1 alone, in plaintext, on this port (for probes that "
        "cannot speak TLS; 0: none)",
    )


def _client_tls_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--ca",
        default=_env("tls-ca", ""),
        help="connect with TLS, trusting this PEM CA (default $SNAKEPIT_TLS_CA)",
    )
    parser.add_argument(
        "--tls", action="store_true", help="connect with TLS, trusting the system's CAs"
    )
    _add(parser, "--cert", "", help="client certificate (PEM) for a pool that requires one")
    _add(parser, "--key", "", help="the PEM private key of --cert")


def _client_tls(args: argparse.Namespace) -> dict[str, Any]:
    """The client's TLS keywords; files that are missing or do not match end the command."""
    from .security.tls import TlsFiles

    _checked(TlsFiles(args.cert, args.key, args.ca))
    return {
        "ca": args.ca or None,
        "tls": args.tls,
        "cert": args.cert or None,
        "key": args.key or None,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="snakepit",
        description="Pools of Python gRPC workers behind a session-affinity router.",
        epilog="Start a local pool with `snakepit serve`, then `snakepit call add a=1 b=2`.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser(
        "serve", help="run a whole pool on this machine (router + workers + store)"
    )
    _add(
        serve,
        "--adapter",
        "snakepit.examples.showcase:ShowcaseAdapter",
        help="MOD:CLASS of your Adapter",
    )
    _add(serve, "--workers", 2, int, help="worker processes (default 2)")
    _add(serve, "--host", "127.0.0.1", help="address the router listens on (default 127.0.0.1)")
    _add(serve, "--port", 50051, int, help="router port (default 50051)")
    serve.add_argument(
        "--store",
        default=_env("store-url", "memory"),
        help="session store: memory or redis://host:port/db (password in $SNAKEPIT_STORE_PASSWORD)",
    )
    _pool_options(serve)
    _metrics_option(serve, None, "router's Prometheus metrics port (default: none served)")
    _max_call_seconds(serve)
    _autoscale_options(serve)
    _server_tls_options(serve)
    serve.add_argument(
        "--tls-generate",
        default="",
        metavar="DIR",
        help="make a throwaway CA in DIR (ca.pem, server.pem, client.pem and keys) and serve "
        "TLS with it; clients then pass --ca DIR/ca.pem",
    )
    _auth_options(serve, router=False)
    serve.add_argument("--verbose", action="store_true", help="show the workers' JSON logs")

    worker = sub.add_parser("worker", help="run one worker process (what worker pods run)")
    _add(
        worker,
        "--adapter",
        "snakepit.examples.showcase:ShowcaseAdapter",
        help="MOD:CLASS of your Adapter",
    )
    _add(worker, "--host", "0.0.0.0")
    _add(worker, "--port", 50052, int)
    _add(worker, "--worker-id", "", help="id in the router's ring (default: $POD_NAME or host-pid)")
    worker.add_argument(
        "--concurrency",
        type=int,
        default=_env("worker-concurrency", 4, int),
        help="calls in flight (default 4)",
    )
    worker.add_argument(
        "--store",
        default=_env("store-url", ""),
        help="redis://… to reach the session store directly, or `router`",
    )
    worker.add_argument(
        "--router", default=_env("router-address", ""), help="router HOST:PORT for ctx.call_tool"
    )
    _add(worker, "--session-ttl", 3600.0, float)
    _add(worker, "--max-message-mb", DEFAULT_MAX_MESSAGE_MB, int)
    _add(
        worker,
        "--max-requests",
        0,
        int,
        help="recycle after this many calls, plus up to 10%% at random (0: never)",
    )
    _add(worker, "--max-age", 0.0, float, help="recycle after this many seconds (0: never)")
    _add(worker, "--max-rss-mb", 0.0, float, help="recycle above this resident memory (0: never)")
    _add(worker, "--drain-timeout", 25.0, float, help="seconds to let calls finish on SIGTERM")
    _add(
        worker,
        "--drain-linger",
        2.0,
        float,
        help="seconds to keep answering (and refusing) after turning NOT_SERVING, so routers "
        "see the worker leave before its connection closes",
    )
    _add(
        worker,
        "--drain-grace",
        1.0,
        float,
        help="seconds after turning NOT_SERVING during which new calls are still run, while "
        "routers take the worker out (at most --drain-linger; 0: refuse at once)",
    )
    _add(
        worker,
        "--backlog",
        -1,
        int,
        help="calls that may wait for a slot beyond --concurrency (default 4x the concurrency)",
    )
    _add(worker, "--backlog-timeout", 30.0, float, help="seconds a call may wait in the backlog")
    _metrics_option(worker, None, "Prometheus metrics port (default: none served)")
    _max_call_seconds(worker)
    _pool_tls_option(worker)
    _health_port_option(worker)
    worker.add_argument(
        "--tls-client-ca",
        action="append",
        default=[],
        help="with --pool-tls-dir: also accept client certificates from this CA (direct mode)",
    )
    _add(
        worker,
        "--ticket-public-key",
        "",
        help="the pool's ticket key (ed25519:BASE64 or a PEM file): calls need a ticket",
    )
    _add(worker, "--ticket-audience", "snakepit", help="the pool's name in its tickets")

    router = sub.add_parser("router", help="run the router (what router pods run)")
    _add(router, "--host", "0.0.0.0")
    _add(router, "--port", 50051, int)
    router.add_argument("--store", default=_env("store-url", "memory"), help="memory or redis://…")
    _add(router, "--workers", "", help="static workers: [ID=]HOST:PORT,…")
    _add(
        router,
        "--workers-service",
        "",
        help="Kubernetes Service whose EndpointSlices list the workers",
    )
    _add(router, "--namespace", "", help="namespace of --workers-service (default $POD_NAMESPACE)")
    _add(router, "--worker-port", 0, int, help="worker port (default: the Service's `grpc` port)")
    _add(router, "--shutdown-delay", 6.0, float, help="seconds to keep answering after SIGTERM")
    _add(
        router,
        "--max-connection-age",
        5.0,
        float,
        help="seconds before clients are asked to reconnect",
    )
    _add(
        router,
        "--advertise-address",
        "",
        help="HOST:PORT other routers forward hosted-tool calls to (default $POD_IP:PORT)",
    )
    _pool_options(router)
    _metrics_option(router, None, "Prometheus metrics port (default: none served)")
    _server_tls_options(router)
    _pool_tls_option(router)
    _health_port_option(router)
    _add(
        router,
        "--internal-port",
        50053,
        int,
        help="with --pool-tls-dir: the mutual-TLS port for workers and peer routers",
    )
    _auth_options(router, router=True)

    operator = sub.add_parser("operator", help="run the Kubernetes operator")
    operator.add_argument(
        "--namespace", action="append", default=None, help="watch this namespace (repeatable)"
    )
    operator.add_argument("--all-namespaces", action="store_true", help="watch every namespace")
    _add(operator, "--liveness-port", 8080, int)
    _metrics_option(operator, None, "Prometheus metrics port (default: none served)")

    call = sub.add_parser("call", help="call a tool and print its result as JSON")
    call.add_argument("tool")
    call.add_argument(
        "arguments",
        nargs="*",
        metavar="KEY=VALUE",
        help="values are JSON when they parse as JSON, else strings",
    )
    call.add_argument("--session", default=None, help="run in this session (created if missing)")
    _add(call, "--target", DEFAULT_TARGET)
    _add(call, "--token", "", help="bearer token of a secured pool (default $SNAKEPIT_TOKEN)")
    call.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    call.add_argument(
        "--stream", action="store_true", help="print each streamed item on its own line"
    )
    _client_tls_options(call)

    status = sub.add_parser("status", help="show the pool's workers, queue and totals")
    _add(status, "--target", DEFAULT_TARGET)
    _add(status, "--token", "", help="bearer token of a secured pool (default $SNAKEPIT_TOKEN)")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _client_tls_options(status)
    status.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="redraw the table every SECONDS (default 2) until Ctrl-C",
    )
    return parser


def parse_arguments(pairs: Sequence[str]) -> dict[str, Any]:
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"snakepit call: arguments look like key=value, got {pair!r}")
        try:
            arguments[key] = json.loads(raw)
        except ValueError:
            arguments[key] = raw
    return arguments


def to_json(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, bytes):
        return {"$bytes": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def _cmd_call(args: argparse.Namespace) -> int:
    from .client import Client
    from .errors import SnakepitError

    arguments = parse_arguments(args.arguments)
    with Client(args.target, timeout=args.timeout, token=args.token, **_client_tls(args)) as client:
        try:
            if args.session:
                session = client.session(args.session, keep=True)
                if args.stream:
                    for item in session.stream(args.tool, args=arguments):
                        print(json.dumps(to_json(item)), flush=True)
                    return 0
                result = session.execute(args.tool, args=arguments)
            elif args.stream:
                for item in client.stream(args.tool, args=arguments):
                    print(json.dumps(to_json(item)), flush=True)
                return 0
            else:
                result = client.execute(args.tool, args=arguments)
        except SnakepitError as exc:
            print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
            if exc.remote_traceback:
                print(exc.remote_traceback.rstrip(), file=sys.stderr)
            return 1
    print(json.dumps(to_json(result), indent=None))
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .client import Client
    from .errors import SnakepitError

    with Client(args.target, timeout=10, token=args.token, **_client_tls(args)) as client:
        if args.watch is None:
            try:
                status = client.status()
            except SnakepitError as exc:
                print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
                return 1
            print(json.dumps(status, indent=2) if args.json else format_status(status))
            return 0
        # Ctrl-C ends the watch after the frame in progress: it sets a flag instead of raising
        # KeyboardInterrupt, which could land inside a gRPC call and leave the channel's close
        # (and so the exit) hanging; a status call is bounded by the client's 10 s timeout.
        stop = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            while not stop.is_set():
                try:
                    watched: dict[str, Any] | None = client.status()
                except SnakepitError as exc:
                    print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
                    watched = None
                if not stop.is_set():
                    _redraw(watched, args)
                stop.wait(args.watch)
        finally:
            signal.signal(signal.SIGINT, previous)
        return 0


def _redraw(status: dict[str, Any] | None, args: argparse.Namespace) -> None:
    """One frame of ``status --watch``: the screen cleared (on a terminal), then the table."""
    if sys.stdout.isatty():
        sys.stdout.write("\x1b[H\x1b[2J")
    stamp = time.strftime("%H:%M:%S")
    body = "(no answer)" if status is None else format_status(status)
    if args.json and status is not None:
        body = json.dumps(status)
    print(f"{args.target}  every {args.watch:g}s  {stamp}\n{body}", flush=True)


def format_status(status: dict[str, Any]) -> str:
    lines = [
        f"router {status['router_id']}  store {status['store']}  affinity {status['affinity']}  "
        f"up {float(status['uptime_seconds']):.0f}s",
        f"workers {status['workers_ready']}/{status['workers_total']} ready"
        f"{_desired(status)}  busy {status['busy']}  "
        f"in flight {status['in_flight']}  queued {status['queued']}/{status['queue_capacity']}  "
        f"sessions {status['sessions']}",
        f"calls {status['calls_total']} ({status['calls_failed']} failed)  latency p50 "
        f"{status['latency_p50_ms']:.2f} ms  p90 {status['latency_p90_ms']:.2f} ms  "
        f"p99 {status['latency_p99_ms']:.2f} ms",
        "",
        f"{'WORKER':<24} {'ADDRESS':<22} {'STATE':<12} {'IN FLIGHT':>9} {'SERVED':>8} {'FAILED':>7}"
        f"  METRICS",
    ]
    for w in status["workers"]:
        lines.append(
            f"{w['worker_id']:<24} {w['address'] or '-':<22} {w['state']:<12} "
            f"{w['in_flight']:>4}/{w['capacity']:<4} {w['served']:>8} {w['failed']:>7}"
            f"  {w.get('metrics_address') or '-'}"
        )
    if status.get("metrics_address"):
        lines.insert(3, f"metrics http://{status['metrics_address']}/metrics")
    return "\n".join(lines)


def _desired(status: dict[str, Any]) -> str:
    if not status.get("scale_reason"):
        return ""
    return f" (desired {status['workers_desired']}: {status['scale_reason']})"


def _cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeConfig, run

    config = ServeConfig(
        adapter=args.adapter,
        workers=args.workers,
        host=args.host,
        port=args.port,
        store=args.store,
        session_ttl=args.session_ttl,
        max_sessions=args.max_sessions,
        pool=_pool_config(args),
        max_message_mb=args.max_message_mb,
        limits=_store_limits(args),
        value_helpers=args.value_helpers,
        max_store_calls_per_principal=args.max_store_calls_per_principal,
        store_call_rate_per_principal=args.store_call_rate_per_principal,
        max_call_seconds=args.max_call_seconds,
        quiet=not args.verbose,
        metrics_port=args.metrics_port,
        data_path=args.data_path,
        autoscale=_autoscale_policy(args),
        scale_period=args.scale_interval,
        auth=_auth_config(args),
    )
    config.tls, config.pool_ca = _serve_tls(args)
    return asyncio.run(run(config))


def _serve_tls(args: argparse.Namespace) -> tuple[Any, Any]:
    """serve's TLS files and pool CA: --tls-generate DIR makes a CA, its files, and the pool's
    certificates with it; else the flags (and a throwaway pool CA)."""
    if not args.tls_generate:
        return _server_tls(args), None
    from .security.localca import generate_dir
    from .security.tls import TlsFiles

    if args.tls_cert or args.tls_key:
        raise SystemExit(
            "snakepit: --tls-generate makes its own certificate; drop --tls-cert/--tls-key"
        )
    files = generate_dir(args.tls_generate)
    print(
        f"snakepit: throwaway CA in {args.tls_generate}: clients pass --ca {files.ca}"
        + (f" --cert {files.client_cert} --key {files.client_key}" if args.tls_client_ca else ""),
        file=sys.stderr,
    )
    tls = TlsFiles(str(files.server_cert), str(files.server_key), args.tls_client_ca)
    return tls, files.authority


def _cmd_worker(args: argparse.Namespace) -> int:
    from .supervisor import die_with_parent
    from .worker.server import WorkerConfig, serve

    die_with_parent()
    config = WorkerConfig(
        adapter=args.adapter,
        host=args.host,
        port=args.port,
        worker_id=args.worker_id,
        concurrency=args.concurrency,
        store_url=args.store,
        router_address=args.router,
        max_message_mb=args.max_message_mb,
        max_requests=args.max_requests,
        max_age=args.max_age,
        max_rss_mb=args.max_rss_mb,
        drain_timeout=args.drain_timeout,
        drain_linger=args.drain_linger,
        drain_grace=args.drain_grace,
        backlog=args.backlog,
        backlog_timeout=args.backlog_timeout,
        session_ttl=args.session_ttl,
        metrics_port=args.metrics_port,
        max_call_seconds=args.max_call_seconds,
        pool_tls=_pool_tls(args),
        tls_client_cas=tuple(args.tls_client_ca),
        health_port=args.health_port or None,
        ticket_public_key=args.ticket_public_key,
        ticket_audience=args.ticket_audience,
    )
    return asyncio.run(serve(config))


def _cmd_router(args: argparse.Namespace) -> int:
    from .router.main import RouterConfig, serve

    config = RouterConfig(
        host=args.host,
        port=args.port,
        store_url=args.store,
        session_ttl=args.session_ttl,
        max_sessions=args.max_sessions,
        workers=[w for w in args.workers.split(",") if w],
        workers_service=args.workers_service,
        namespace=args.namespace,
        worker_port=args.worker_port or None,
        pool=_pool_config(args),
        max_message_mb=args.max_message_mb,
        max_connection_age=args.max_connection_age,
        advertise_address=args.advertise_address,
        metrics_port=args.metrics_port,
        data_path=args.data_path,
        limits=_store_limits(args),
        value_helpers=args.value_helpers,
        max_store_calls_per_principal=args.max_store_calls_per_principal,
        store_call_rate_per_principal=args.store_call_rate_per_principal,
        tls=_server_tls(args),
        pool_tls=_pool_tls(args),
        internal_port=args.internal_port,
        health_port=args.health_port or None,
        auth=_auth_config(args),
    )
    return asyncio.run(serve(config, shutdown_delay=args.shutdown_delay))


def _cmd_operator(args: argparse.Namespace) -> int:
    try:
        from .operator.main import run
    except ImportError as exc:
        if exc.name not in ("kopf", "kubernetes") and not str(exc.name).startswith(
            ("kopf.", "kubernetes.")
        ):
            raise
        # The operator's libraries are an optional extra; say how to get them, not a traceback.
        print(
            f"snakepit operator needs the `operator` extra ({exc.name} is not installed): "
            "pip install 'snakepit[operator]'",
            file=sys.stderr,
        )
        return 2
    return run(
        namespaces=args.namespace or [],
        all_namespaces=args.all_namespaces,
        liveness_port=args.liveness_port,
        metrics_port=args.metrics_port,
    )


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "serve": _cmd_serve,
    "worker": _cmd_worker,
    "router": _cmd_router,
    "operator": _cmd_operator,
    "call": _cmd_call,
    "status": _cmd_status,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
