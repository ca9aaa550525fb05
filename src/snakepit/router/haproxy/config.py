"""haproxy.cfg for the router's data path, built from a spec by pure functions.

HAProxy listens on the router's public port (HTTP/2 cleartext, gRPC's transport). Tool calls
(``ExecuteTool``, ``ExecuteStreamingTool``) go to the ``workers`` backend: consistent hashing on
the ``snakepit-session-id`` header with bounded load (``hash-balance-factor``), at most
``worker_concurrency`` calls per worker (``maxconn``), the rest in HAProxy's queue for at most
``queue_timeout``. Every other RPC (sessions, variables, status, health) goes to the Python
router on a loopback port. Worker servers are declared up front as ``SERVER_SLOTS`` idle slots
``s1``..``sN`` (id = slot number = the worker's ring id): the Python router points a slot at a
worker, drains it and takes it back through the runtime API as discovery and health change, so
scaling never reloads HAProxy. Slots rather than ``add server``: HAProxy 2.6 starts a server
added at run time with ``max-reuse 0`` (and refuses that keyword for it), so each HTTP/2
connection to it carried one call and was closed (HAProxy commit 8a31783b6, fixed in 3.0, not in
Debian's 2.6.12); declared servers inherit ``max-reuse -1`` and ``http-reuse always`` then puts
every call to a worker on one or two connections.

Errors HAProxy answers itself are real gRPC answers (``grpc-status`` and the
``snakepit-error-bin`` detail, marked ``not_started``), with the status codes and messages the
Python router uses: RESOURCE_EXHAUSTED for a full queue, DEADLINE_EXCEEDED for a call that waited
out the queue timeout, UNAVAILABLE when no worker is ready or none could be reached.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

from ...errors import DeadlineExceeded, ResourceExhausted, SnakepitError, Unavailable
from ...protocol import SERVICE_NAME
from ...protocol.status import ERROR_DETAIL_KEY, SESSION_ID_KEY, detail_of
from ..ring import SERVER_SLOTS, weight_for

WORKERS_BACKEND = "workers"
CONTROL_BACKEND = "control"
TOOL_METHODS = ("ExecuteTool", "ExecuteStreamingTool")
BUFSIZE = 65536
H2_WINDOW = 32768
# A tool call whose request body reaches this size goes through the Python router (see
# build_config): below it, a body always fits in the one buffer HAProxy 2.6 gives a stream.
LARGE_BODY = H2_WINDOW
# How long HAProxy waits for a tool call's first LARGE_BODY bytes to tell large from small; a
# small body ends well before (its END_STREAM stops the wait).
BODY_WAIT = 5.0


@dataclass(frozen=True)
class HaproxySpec:
    """Everything haproxy.cfg depends on."""

    host: str
    port: int
    control_port: int
    admin_socket: str
    worker_concurrency: int = 4
    queue_size: int = 1000
    queue_timeout: float = 30.0
    vnodes: int = 64
    balance_factor: int = 125  # percent of the mean load; 0 turns bounded load off
    threads: int = 1
    maxconn: int = 4096  # connections; each proxied one holds two file descriptors
    hard_stop_after: float = 30.0
    log_requests: bool = False  # one line per call on stderr (debugging)


def slot_name(server_id: int) -> str:
    """The HAProxy server that carries the worker with ring id ``server_id``."""
    return f"s{server_id}"


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _quote(text: str) -> str:
    """A double-quoted HAProxy argument (log-format: '%' is doubled)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%") + '"'


def error_headers(error: SnakepitError) -> str:
    """``hdr`` arguments that make an HAProxy reply a gRPC error: status, message, detail."""
    return (
        f"hdr grpc-status {error.code.value[0]} "
        f"hdr grpc-message {_quote(error.message)} hdr {ERROR_DETAIL_KEY} {_detail(error)}"
    )


def _errors(spec: HaproxySpec) -> dict[str, SnakepitError]:
    return {
        "full": ResourceExhausted(
            f"every worker is busy and the queue is full ({spec.queue_size} calls waiting)",
            not_started=True,
        ),
        "waited": DeadlineExceeded(
            f"waited {spec.queue_timeout:.3g}s in the queue and no worker became free "
            f"({spec.worker_concurrency} calls each)",
            not_started=True,
        ),
        "none": Unavailable("no worker is ready", not_started=True),
        "unreachable": Unavailable(
            "failed to connect to a worker (connection refused)", not_started=True
        ),
    }


def build_config(spec: HaproxySpec) -> str:
    """The whole haproxy.cfg for ``spec``."""
    weight_for(spec.vnodes)  # validates
    errors = _errors(spec)
    tools = " ".join(f"/{SERVICE_NAME}/{method}" for method in TOOL_METHODS)
    queue_ms = _milliseconds(spec.queue_timeout)
    host = f"[{spec.host}]" if ":" in spec.host else spec.host
    lines = [
        "global",
        f"  maxconn {spec.maxconn}",
        f"  nbthread {spec.threads}",
        f"  stats socket {spec.admin_socket} mode 600 level admin",
        f"  hard-stop-after {_milliseconds(spec.hard_stop_after)}ms",
        "  tune.h2.max-concurrent-streams 1000",
        # A call queued for a busy worker holds its request body in one buffer; a client may
        # send no more than its stream window, so the window must fit in that buffer or the
        # queued call blocks every other call on the client's connection (HAProxy demuxes an
        # HTTP/2 connection in order). 64 KB buffers, 32 KB windows.
        f"  tune.bufsize {BUFSIZE}",
        f"  tune.h2.initial-window-size {H2_WINDOW}",
        *(["  log stderr format raw local0 info"] if spec.log_requests else []),
        "",
        "defaults",
        "  mode http",
        *(["  log global", "  option httplog"] if spec.log_requests else []),
        "  timeout connect 2s",
        # gRPC deadlines belong to the caller (grpc-timeout reaches the worker); these only
        # reap connections nothing uses.
        "  timeout client 24h",
        "  timeout server 24h",
        f"  timeout queue {queue_ms}ms",
        # A call is sent elsewhere only when it never reached a worker: a failed connect.
        "  retries 2",
        "  option redispatch 1",
        "  retry-on conn-failure",
        "",
        "frontend snakepit",
        f"  bind {host}:{spec.port} proto h2",
        f"  acl tool path {tools}",
        f"  http-request return status 200 {error_headers(errors['none'])} "
        f"if tool {{ nbsrv({WORKERS_BACKEND}) eq 0 }}",
        f"  http-request return status 200 {error_headers(errors['full'])} "
        f"if tool {{ queue({WORKERS_BACKEND}) ge {spec.queue_size} }}",
        # Large request bodies go through the Python router, whose queue holds a call after
        # reading it whole. HAProxy 2.6 reads a client connection's frames in order into one
        # buffer per stream and refills a stream's window as soon as its data is in that buffer,
        # so a call waiting in HAProxy's queue whose body outgrows the buffer stops the demuxing
        # of its whole connection: the other calls' bodies and window updates behind it, often
        # those of the very call holding the slot it waits for (a deadlock until `timeout
        # queue`). Its upstream issue #352 is open; 3.1 shares rx buffers per connection
        # (tune.h2.fe.rxbuf), which raises the size, not the limit.
        f"  http-request wait-for-body time {_milliseconds(BODY_WAIT)}ms "
        f"at-least {LARGE_BODY} if tool",
        f"  use_backend {CONTROL_BACKEND} if tool {{ req.body_len ge {LARGE_BODY} }}",
        f"  use_backend {WORKERS_BACKEND} if tool",
        f"  default_backend {CONTROL_BACKEND}",
        "",
        f"backend {WORKERS_BACKEND}",
        f"  balance hdr({SESSION_ID_KEY})",
        "  hash-type consistent crc32",
        f"  hash-balance-factor {spec.balance_factor}",
        # Any call may take a free stream on an open connection to its worker: gRPC servers
        # multiplex, and a worker that stops says GOAWAY first (no new stream goes there).
        "  http-reuse always",
        # Every slot starts in maintenance, pointing nowhere (its checks paused until used).
        f"  default-server proto h2 disabled weight {weight_for(spec.vnodes)} "
        f"maxconn {spec.worker_concurrency} "
        # Passive ejection: the first failed connect marks the worker down, so the retry (and
        # every later call) goes elsewhere; a TCP check every 250 ms brings it back.
        "check inter 2s fastinter 250ms downinter 250ms rise 1 fall 2 "
        "observe layer4 error-limit 1 on-error mark-down",
        # 503 is what HAProxy answers both for a queue timeout and for workers it could not
        # reach; the time the call spent queued tells them apart.
        f"  http-error status 503 {error_headers(errors['waited'])}",
        '  http-after-response set-var-fmt(txn.queued_ms) "%Tw" if { status 503 }',
        f"  http-after-response set-header grpc-status {errors['unreachable'].code.value[0]} "
        f"if {{ status 503 }} {{ var(txn.queued_ms) -m int lt {queue_ms} }}",
        f"  http-after-response set-header grpc-message {_quote(errors['unreachable'].message)} "
        f"if {{ status 503 }} {{ var(txn.queued_ms) -m int lt {queue_ms} }}",
        f"  http-after-response set-header {ERROR_DETAIL_KEY} "
        f"{_detail(errors['unreachable'])} "
        f"if {{ status 503 }} {{ var(txn.queued_ms) -m int lt {queue_ms} }}",
        *(f"  server {slot_name(i)} 0.0.0.0:0 id {i}" for i in range(1, SERVER_SLOTS + 1)),
        "",
        f"backend {CONTROL_BACKEND}",
        f"  server router 127.0.0.1:{spec.control_port} proto h2",
        "",
    ]
    return "\n".join(lines)


def _detail(error: SnakepitError) -> str:
    return base64.b64encode(detail_of(error).SerializeToString()).decode()


def point_slot_command(server_id: int, host: str, port: int) -> str:
    """The runtime API command that points a slot at a worker (the slot stays in maintenance);
    HAProxy closes the slot's idle connections to its previous worker."""
    return f"set server {WORKERS_BACKEND}/{slot_name(server_id)} addr {host} port {port}"
