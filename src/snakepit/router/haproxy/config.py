"""haproxy.cfg for the router's data path, built from a spec by pure functions.

HAProxy listens on the router's public port (HTTP/2 cleartext, gRPC's transport). Unary tool
calls (``ExecuteTool``) go to the ``workers`` backend: consistent hashing on
the ``snakepit-session-id`` header with bounded load (``hash-balance-factor``), at most
``worker_concurrency`` calls per worker (``maxconn``), the rest in HAProxy's queue for at most
``queue_timeout``. Every other RPC (streaming tool calls, sessions, variables, status, health)
goes to the Python router on a loopback port. Worker servers are declared up front as ``SERVER_SLOTS`` idle slots
``s1``..``sN`` (id = slot number = the worker's ring id): the Python router points a slot at a
worker, drains it and takes it back through the runtime API as discovery and health change, so
scaling never reloads HAProxy. Slots rather than ``add server``: HAProxy 2.6 starts a server
added at run time with ``max-reuse 0`` (and refuses that keyword for it), so each HTTP/2
connection to it carried one call and was closed (HAProxy commit 8a31783b6, fixed in 3.0, not in
Debian's 2.6.12); declared servers inherit ``max-reuse -1`` and ``http-reuse always`` then puts
every call to a worker on one or two connections.

With TLS (``HaproxyTls``) HAProxy terminates the callers' TLS on the public port and talks
mutual TLS with the pool CA to the workers and to the Python router's internal port, checking
their certificates for the pool name, as the Python router does. With authentication
(``auth_map``) HAProxy verifies nothing itself: a tool call goes to a worker only when the
SHA-256 of its ``authorization`` header is in the map the Python router keeps (the header of a
caller it verified, mapped to a pool ticket for that caller, ``authmap``); HAProxy then replaces
the credential with that ticket. Every other call, and every call that carries a ticket of its
own, goes to the Python router, which verifies it as on the Python data path.

With ``--max-calls-per-principal`` (``calls_per_principal``) HAProxy keeps each principal's
share of the tool calls it sends to workers, in one count with the Python router's
(``principal_shares``, ``share_sync``).

With metrics on (``call_log``), the frontend logs one line per call into a ring that HAProxy
forwards over a unix stream socket to the Python router (``calllog``): the router's call
metrics for the calls HAProxy carries.

Errors HAProxy answers itself are real gRPC answers (``grpc-status`` and the
``snakepit-error-bin`` detail, marked ``not_started``), with the status codes and messages the
Python router uses: RESOURCE_EXHAUSTED for a full queue, DEADLINE_EXCEEDED for a call that waited
out the queue timeout, UNAVAILABLE when no worker could be reached. A tool call that finds no
worker ready goes to the Python router, which holds it until one is (scale from zero).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...errors import DeadlineExceeded, ResourceExhausted, SnakepitError, Unavailable
from ...protocol import SERVICE_NAME, pb
from ...protocol.status import ERROR_DETAIL_KEY, SESSION_ID_KEY
from ...security.gate import AUTHORIZATION_KEY
from ...security.tickets import TICKET_KEY
from ...security.tls import POOL_NAME
from ...tracing import TRACEPARENT
from ..ring import SERVER_SLOTS, weight_for
from . import message_size, principal_shares
from .message_size import PREFIX as GRPC_PREFIX
from .message_size import oversize_lines
from .replies import detail, error_headers, quote, whole_answer_lines

WORKERS_BACKEND = "workers"
CONTROL_BACKEND = "control"
# Streaming RPCs reach the Python router each on a connection of its own (``build_config``).
STREAMS_BACKEND = "streams"
# The tool calls HAProxy forwards to the workers itself. Streaming calls go through the Python
# router: a worker lost after its answer began must end the call UNAVAILABLE, and HAProxy 2.6
# cannot say that. It ends a response its server dropped midway with an empty DATA frame that
# carries END_STREAM (``h2_do_shutw``; no trailers, no RST_STREAM), which gRPC clients report as
# UNKNOWN "Stream removed (Data frame with END_STREAM flag received)". A streaming call's answer
# begins at its first item, so a worker killed mid-stream hit this every time. A unary answer
# is written at the end, headers, message and status together, so its worker's death almost
# always comes before the headers (HAProxy's 503, UNAVAILABLE); only one larger than the flow
# control windows can be cut, which snakepit's clients report as UNAVAILABLE (error_from_rpc).
FAST_METHODS = ("ExecuteTool",)
BUFSIZE = 65536
H2_WINDOW = 32768
# A tool call whose request body reaches this size goes through the Python router (see
# build_config): below it, a body always fits in the one buffer HAProxy 2.6 gives a stream.
LARGE_BODY = H2_WINDOW
# How long HAProxy waits for a tool call's first LARGE_BODY bytes to tell large from small; a
# small body ends well before (its END_STREAM stops the wait).
BODY_WAIT = 5.0
# The key of the divert map (``HaproxySpec.divert_map``) that sends every tool call to Python.
DIVERT = "divert"
# The call log (``calllog`` reads it): one line per call, these fields separated by spaces.
# ``txn.tool`` is the tool name in hex (a caller's tool name may hold spaces or any byte), last
# so that a line HAProxy truncates (``CALL_LOG_LINE``) loses only part of a name that is too
# long to label anyway. Time fields are HAProxy's, in milliseconds, -1 for a step never reached.
CALL_LOG_FIELDS = (
    "%b",  # backend: workers, control (the Python router counts those itself), or the frontend
    "%s",  # server (slot) of the last attempt, <NOSRV> when none was chosen
    "%ts",  # termination state: sQ queue timeout, C? the caller went away, -- a clean end
    "%Tw",  # time queued
    "%Ta",  # the call's active time, first request byte to end
    "%TR",  # time to receive the request (its body included, awaited for ``fast`` calls)
    "%Tc",  # time to connect to the worker (-1: never sent to one)
    "%rc",  # connection retries ("+N": redispatched to another worker)
    "%sq",  # calls ahead of this one in its server's queue (0: it never queued there)
    "%bq",  # ... in the backend's queue
    "%[var(txn.grpc)]",  # grpc-status of the response headers; "-" when it came in trailers
    "%[var(txn.body)]",  # request body length, gRPC framing included
    "%[var(txn.sent)]",  # the answer's message length in hex, from its gRPC prefix; "-": none
    "%HPO",  # the path: which RPC
    "%[var(txn.parent)]",  # the caller's traceparent, with tracing on (``trace_lines``)
    "%[var(txn.span)]",  # the span id HAProxy gave the router's span of the call, 16 hex
    "%[var(txn.attempt)]",  # ... and the span of its attempt on a worker, the worker's parent
    "%[var(txn.t0)]",  # when HAProxy had the request's headers, microseconds since the epoch
    "%[date(0,us)]",  # when the call ended, the same (%Ta and the rest are milliseconds)
    "%[var(txn.tool)]",
)
CALL_LOG_LINE = 2048
CALL_LOG_RING = "calllog"
# The ring's bytes: lines wait here while the router's event loop is busy (~130 bytes a line:
# about 16,000 calls); what does not fit is dropped and counted (``load.dropped_logs``).
CALL_LOG_RING_SIZE = 2 << 20


@dataclass(frozen=True)
class HaproxyTls:
    """The TLS files HAProxy reads (written by ``tlsfiles`` from the router's own files)."""

    pool_pem: str  # the router's pool certificate and key: presented to workers and the router
    pool_ca: str  # the pool CA: workers' and the internal port's certificates must chain to it
    public_pem: str = ""  # certificate and key of the pool port; "": the pool port is plaintext
    client_ca: str = ""  # the pool port then requires client certificates this CA signed


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
    tls: HaproxyTls | None = None  # None: plaintext everywhere
    # The map file of verified callers (sha256 of the authorization header -> pool ticket);
    # "": auth is off and every tool call goes to the workers as it is.
    auth_map: str = ""
    control_host: str = "127.0.0.1"  # where HAProxy reaches the Python router's control port
    # A second runtime API socket (a path) that hands the listening sockets to a new HAProxy
    # (``haproxy -x``), and the map whose ``divert`` key sends every tool call to the Python
    # router while a new HAProxy is made ready (``tlsfiles``). "": none.
    handover_socket: str = ""
    divert_map: str = ""
    # Where HAProxy sends one line per call for the router's metrics (``call_log_lines``): the
    # unix stream address the Python router listens on (``abns@NAME``); "": no call log.
    call_log: str = ""
    # Tracing on in the router: a traced tool call's worker gets the router's span (made from
    # the call log) as its parent (``trace_lines``). Needs the call log.
    trace: bool = False
    # The store's --max-watchers-per-session: HAProxy refuses a session's watchers beyond it
    # before they reach Python (``watch_gate_lines``). 0: no gate.
    watchers_per_session: int = 0
    # --max-calls-per-principal: each principal's tool calls beyond it wait in its own line in
    # HAProxy (``principal_shares``). 0: no share.
    calls_per_principal: int = 0
    # The router's --max-message-mb in bytes: HAProxy refuses a longer request message itself
    # (``message_size``). 0: no check.
    max_message_bytes: int = 0
    # Strict affinity: HAProxy sends no tool call to the workers itself; every one goes to the
    # Python router, which binds a session to its worker (``dataplane``). HAProxy still stands
    # in front for its refusals (message size, watchers per session).
    tools_via_router: bool = False


def slot_name(server_id: int) -> str:
    """The HAProxy server that carries the worker with ring id ``server_id``."""
    return f"s{server_id}"


def _milliseconds(seconds: float) -> int:
    return max(1, round(seconds * 1000))


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
        "unreachable": Unavailable(
            "failed to connect to a worker (connection refused)", not_started=True
        ),
        "stalled": Unavailable(
            f"the call's message did not arrive within {BODY_WAIT:g}s of its headers; "
            "it was not sent to a worker",
            not_started=True,
        ),
        "unplaced": Unavailable(
            "no worker was up to take the call (each one was down or leaving as it arrived)",
            not_started=True,
        ),
    }


# An anonymous ACL true when HAProxy picked a server for the call (in ``http-after-response``).
PICKED = "{ srv_id -m found }"


def _answer_503(error: SnakepitError, condition: str) -> list[str]:
    """``http-after-response`` lines that turn HAProxy's 503 into ``error`` when ``condition``
    holds: its status, message and detail (the ``http-error`` answer has the queue timeout's)."""
    when = f"if {{ status 503 }} {condition}"
    return [
        f"  http-after-response set-header grpc-status {error.code.value[0]} {when}",
        f"  http-after-response set-header grpc-message {quote(error.message)} {when}",
        f"  http-after-response set-header {ERROR_DETAIL_KEY} {detail(error)} {when}",
    ]


def build_config(spec: HaproxySpec) -> str:
    """The whole haproxy.cfg for ``spec``."""
    weight_for(spec.vnodes)  # validates
    errors = _errors(spec)
    tools = " ".join(f"/{SERVICE_NAME}/{method}" for method in FAST_METHODS)
    queue_ms = _milliseconds(spec.queue_timeout)
    traced = spec.trace and bool(spec.call_log)  # the span ids travel in the call log
    host = _address(spec.host, None)
    # The tool calls the use_backend rules below send to the workers, but for the worker count.
    to_workers = f"fast !{{ req.body_len ge {LARGE_BODY} }}"
    lines = [
        "global",
        f"  maxconn {spec.maxconn}",
        f"  nbthread {spec.threads}",
        f"  stats socket {spec.admin_socket} mode 600 level admin",
        *(
            [f"  stats socket {spec.handover_socket} mode 600 level admin expose-fd listeners"]
            if spec.handover_socket
            else []
        ),
        f"  hard-stop-after {_milliseconds(spec.hard_stop_after)}ms",
        *principal_shares.global_lines(spec.calls_per_principal),
        *message_size.global_lines(spec.max_message_bytes),
        "  tune.h2.max-concurrent-streams 1000",
        # A call queued for a busy worker holds its request body in one buffer; a client may
        # send no more than its stream window, so the window must fit in that buffer or the
        # queued call blocks every other call on the client's connection (HAProxy demuxes an
        # HTTP/2 connection in order). 64 KB buffers, 32 KB windows.
        f"  tune.bufsize {BUFSIZE}",
        f"  tune.h2.initial-window-size {H2_WINDOW}",
        *(["  log stderr format raw local0 info"] if spec.log_requests else []),
        "",
        *call_log_ring(spec.call_log),
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
        f"  bind {host}:{spec.port} proto h2{_bind_tls(spec.tls)}",
        *call_log_target(spec.call_log),
        *whole_answer_lines(),
        # A tool call whose first LARGE_BODY bytes do not come within BODY_WAIT (a caller
        # that stalls mid-message): HAProxy's 408 page would be UNKNOWN to a gRPC client.
        f"  http-error status 408 {error_headers(errors['stalled'])}",
        f"  acl tool path {tools}",
        # ``fast``: a tool call HAProxy sends to the workers itself (with auth: of a caller
        # the Python router vouched for).
        *_fast(spec, tools),
        # Large request bodies go through the Python router, whose queue holds a call after
        # reading it whole. HAProxy 2.6 reads a client connection's frames in order into one
        # buffer per stream and refills a stream's window as soon as its data is in that buffer,
        # so a call waiting in HAProxy's queue whose body outgrows the buffer stops the demuxing
        # of its whole connection: the other calls' bodies and window updates behind it, often
        # those of the very call holding the slot it waits for (a deadlock until `timeout
        # queue`). Its upstream issue #352 is open; 3.1 shares rx buffers per connection
        # (tune.h2.fe.rxbuf), which raises the size, not the limit.
        f"  http-request wait-for-body time {_milliseconds(BODY_WAIT)}ms "
        f"at-least {LARGE_BODY} if fast",
        # The body is awaited before the refusals below so that a refused call's log line
        # names its tool too (a gRPC client sends the body right after the headers).
        *call_log_lines(spec.call_log),
        *trace_lines(traced),
        *oversize_lines(spec.max_message_bytes, _milliseconds(BODY_WAIT)),
        f"  http-request return status 200 {error_headers(errors['full'])} "
        f"if fast {{ queue({WORKERS_BACKEND}) ge {spec.queue_size} }}",
        *_vouch(spec.auth_map),
        *principal_shares.share_lines(
            spec.calls_per_principal,
            to_workers=f"{to_workers} !{{ stopping }} !{{ nbsrv({WORKERS_BACKEND}) eq 0 }} "
            f"|| {to_workers} {{ stopping }}",
            queue_size=spec.queue_size,
            queue_timeout_ms=queue_ms,
            auth=bool(spec.auth_map),
        ),
        # A call that finds no worker ready waits in the Python router's queue, as on the Python
        # data path: a worker starting (a pool scaled to zero wakes on it, the autoscaler hearing
        # of the held call from the Python router) or coming back takes it. Not while stopping: a
        # soft-stopped HAProxy (SIGUSR1: a handover to a new one for a CA change, or the
        # router's own shutdown) counts no usable server in its stopped backends, though it
        # still forwards the calls that reach it on open connections.
        *watch_gate_lines(spec),
        f"  use_backend {CONTROL_BACKEND} if fast !{{ stopping }} "
        f"{{ nbsrv({WORKERS_BACKEND}) eq 0 }}",
        f"  use_backend {CONTROL_BACKEND} if fast {{ req.body_len ge {LARGE_BODY} }}",
        f"  use_backend {WORKERS_BACKEND} if fast",
        f"  use_backend {STREAMS_BACKEND} if {{ path {_streaming_paths()} }}",
        f"  default_backend {CONTROL_BACKEND}",
        "",
        f"backend {WORKERS_BACKEND}",
        *trace_parent_lines(traced),
        *call_log_answer_lines(spec.call_log),
        f"  balance hdr({SESSION_ID_KEY})",
        "  hash-type consistent crc32",
        f"  hash-balance-factor {spec.balance_factor}",
        # Any call may take a free stream on an open connection to its worker: gRPC servers
        # multiplex, and a worker that stops says GOAWAY first (no new stream goes there).
        "  http-reuse always",
        # Every slot starts in maintenance, pointing nowhere (its checks paused until used).
        f"  default-server proto h2{_server_tls(spec.tls)} disabled "
        f"weight {weight_for(spec.vnodes)} "
        f"maxconn {spec.worker_concurrency} "
        # Passive ejection: the first failed connect marks the worker down, so the retry (and
        # every later call) goes elsewhere; a TCP check every 250 ms brings it back.
        "check inter 2s fastinter 250ms downinter 250ms rise 1 fall 2 "
        "observe layer4 error-limit 1 on-error mark-down",
        # 503 is what HAProxy answers for a queue timeout, for workers it could not connect
        # to, and for a call it found no worker up for (one went down between the frontend's
        # ``nbsrv`` test and the pick); the time the call spent queued and whether a server
        # was picked (``srv_id``) tell them apart.
        f"  http-error status 503 {error_headers(errors['waited'])}",
        '  http-after-response set-var-fmt(txn.queued_ms) "%Tw" if { status 503 }',
        *_answer_503(
            errors["unreachable"], f"{{ var(txn.queued_ms) -m int lt {queue_ms} }} {PICKED}"
        ),
        *_answer_503(
            errors["unplaced"], f"{{ var(txn.queued_ms) -m int lt {queue_ms} }} !{PICKED}"
        ),
        *(f"  server {slot_name(i)} 0.0.0.0:0 id {i}" for i in range(1, SERVER_SLOTS + 1)),
        "",
        f"backend {CONTROL_BACKEND}",
        f"  server router {_address(spec.control_host, spec.control_port)} "
        f"proto h2{_server_tls(spec.tls)}",
        "",
        # HAProxy 2.6 demultiplexes a server connection in order into one 64 KB buffer per
        # stream (see LARGE_BODY): a stream whose caller does not read its answer (a watcher
        # behind on 1 MB updates) fills its buffer and stops every other stream on that
        # connection, the same caller's store writes among them, until it reads. So each
        # streaming call gets a connection to the Python router of its own (``max-reuse 0``),
        # and a slow reader holds only its own stream, as on the Python data path.
        f"backend {STREAMS_BACKEND}",
        f"  server router {_address(spec.control_host, spec.control_port)} "
        f"proto h2{_server_tls(spec.tls)} max-reuse 0",
        "",
        *watch_table_lines(spec.watchers_per_session),
        *principal_shares.share_table_lines(spec.calls_per_principal),
    ]
    return "\n".join(lines)


def _streaming_paths() -> str:
    """The paths of BridgeService's streaming RPCs (either direction), from the protocol."""
    service = pb.DESCRIPTOR.services_by_name["BridgeService"]
    return " ".join(
        f"/{SERVICE_NAME}/{m.name}"
        for m in service.methods
        if m.server_streaming or m.client_streaming
    )


def _address(host: str, port: int | None) -> str:
    bracketed = f"[{host}]" if ":" in host else host
    return bracketed if port is None else f"{bracketed}:{port}"


def _bind_tls(tls: HaproxyTls | None) -> str:
    """The pool port's TLS (gRPC clients negotiate HTTP/2 with ALPN)."""
    if tls is None or not tls.public_pem:
        return ""
    verify = f" ca-file {tls.client_ca} verify required" if tls.client_ca else ""
    return f" ssl crt {tls.public_pem} alpn h2{verify}"


def _server_tls(tls: HaproxyTls | None) -> str:
    """Mutual TLS with the pool CA to a pool member, checked for the pool's name (not for the
    address dialled: pod IPs change, membership does not). Health checks inherit it, so a
    server without a pool certificate never passes one."""
    if tls is None:
        return ""
    return (
        f" ssl verify required ca-file {tls.pool_ca} crt {tls.pool_pem} "
        f"sni str({POOL_NAME}) verifyhost {POOL_NAME} alpn h2"
    )


def _fast(spec: HaproxySpec, tools: str) -> list[str]:
    """The ``fast`` ACL: the tool calls HAProxy forwards to the workers.

    With auth on: those whose ``txn.ticket`` is the pool ticket of a caller the Python router
    verified, looked up by the SHA-256 of the call's one ``authorization`` header. A call with
    several such headers, or a ticket of its own (a worker's callback, a direct-mode client),
    finds none: those the Python router checks. None while the divert map says so, and none
    with ``tools_via_router`` (strict affinity): the Python router then verifies every caller,
    as on its own data path."""
    if spec.tools_via_router:
        return ["  acl fast always_false"]
    divert = f"{{ str({DIVERT}),map({spec.divert_map}) -m found }}" if spec.divert_map else ""
    if spec.auth_map:
        lines = [
            f"  http-request set-var(txn.ticket) req.fhdr({AUTHORIZATION_KEY}),sha2(256),hex,"
            f"map({spec.auth_map}) if tool {{ req.fhdr_cnt({AUTHORIZATION_KEY}) eq 1 }} "
            f"{{ req.hdr_cnt({TICKET_KEY}) eq 0 }}",
        ]
        if divert:
            lines.append(f"  http-request unset-var(txn.ticket) if {divert}")
        return [*lines, "  acl fast var(txn.ticket) -m found"]
    if divert:
        return [
            f"  http-request set-var(txn.fast) bool(true) if tool !{divert}",
            "  acl fast var(txn.fast) -m bool",
        ]
    return [f"  acl fast path {tools}"]


def _vouch(auth_map: str) -> list[str]:
    """The credential never goes on: a vouched call carries its ticket instead (also to the
    Python router, for large bodies, which then verifies the ticket)."""
    if not auth_map:
        return []
    return [
        f"  http-request del-header {AUTHORIZATION_KEY} if fast",
        f"  http-request set-header {TICKET_KEY} %[var(txn.ticket)] if fast",
    ]


def call_log_ring(address: str) -> list[str]:
    """The ring that carries the call log to the Python router at ``address`` (a unix stream
    socket; HAProxy connects, and connects again if the connection is lost).

    A ring forwarded over a stream, not log lines sent as datagrams: a unix datagram socket
    queues at most ``net.unix.max_dgram_qlen`` datagrams (10 by default, per network namespace,
    and not a sysctl a pod may set), so under load HAProxy found the queue full and dropped
    lines (one run under ghz at ~2,500 calls/s lost 24,630 of ~32,000, docs/observability.md
    "Losses"), and each line it did send woke the router's event loop alone. The ring's
    forwarder writes every line waiting in one go, newline-terminated (``log-proto legacy``),
    so a busy router reads many per wake-up.
    HAProxy stops forwarding when it is told to stop (``sink_forward_io_handler``): the lines
    of calls that end while a soft-stopped HAProxy drains are not counted."""
    if not address:
        return []
    return [
        f"ring {CALL_LOG_RING}",
        "  format raw",
        f"  maxlen {CALL_LOG_LINE}",
        f"  size {CALL_LOG_RING_SIZE}",
        "  timeout connect 1s",
        "  timeout server 24h",
        f"  server router {address}",
        "",
    ]


def call_log_target(address: str) -> list[str]:
    """Frontend lines that log one line per call into the call log's ring (``call_log_ring``),
    placed before every other ``http-request`` rule.

    The frontend's log: in HTTP mode the frontend logs every stream at its end, whichever
    backend served it. With ``log_requests`` the stderr log takes this format too (HAProxy 2.6
    has one ``log-format`` per proxy)."""
    if not address:
        return []
    return [
        f"  log ring@{CALL_LOG_RING} len {CALL_LOG_LINE} format raw local0 info",
        '  log-format "' + " ".join(CALL_LOG_FIELDS) + '"',
        # First of the frontend's rules: the call's start, in microseconds (``txn.t0``).
        "  http-request set-var(txn.t0) date(0,us)",
    ]


# An anonymous ACL true when the request body's gRPC message is not compressed (its first byte,
# gRPC's flag, is 0): a compressed one is no protobuf to read with ``ungrpc``, and a field read
# from it would be garbage, so rules that read one leave such a call alone.
UNCOMPRESSED_BODY = "{ req.body,bytes(0,1),hex -m str 00 }"


def call_log_lines(address: str) -> list[str]:
    """The variables the call log prints, set while the call passes.

    The tool name is field 1 of ``ExecuteToolRequest``, read from the buffered body with
    ``ungrpc`` (a body under ``LARGE_BODY`` is whole by now; larger ones go to the Python
    router, which counts them itself). ``grpc-status`` is read from the response headers in
    ``http-after-response``, which also sees HAProxy's own answers (after the backend's rules
    set their status): HAProxy 2.6 has no sample fetch for trailers (haproxy/haproxy#112), so
    the status of an answer that sent a message is not there (``calllog`` says what it
    concludes)."""
    if not address:
        return []
    return [
        f"  http-request set-var(txn.tool) req.body,ungrpc(1),hex if fast {UNCOMPRESSED_BODY}",
        "  http-request set-var(txn.body) req.body_len if fast",
        "  http-after-response set-var(txn.grpc) res.hdr(grpc-status)",
    ]


def call_log_answer_lines(address: str) -> list[str]:
    """Backend lines that read a worker's answer for the call log: the length of its message.

    ``sent_bytes_total`` counts the answer's message bytes, as the Python router counts them
    and as ``received_bytes_total`` counts the request's. HAProxy's own byte count (``%B``)
    takes the headers and trailers in with the data, but a unary answer's message starts with
    gRPC's 5-byte prefix, whose last 4 bytes are the message's length: HAProxy waits for those
    5 bytes (they come in the answer's first DATA frame, with its headers) and logs them in
    hex. An answer without a message (an error, trailers only) has none to wait for, and logs
    "-". The wait has no time limit of its own that could end a call (``time 24h``, as
    ``timeout server``): the call's own deadline and ``--max-call-seconds`` end it first."""
    if not address:
        return []
    return [
        f"  http-response wait-for-body time 24h at-least {GRPC_PREFIX}",
        f"  http-response set-var(txn.sent) res.body,bytes(1,4),hex "
        f"if {{ res.body_len ge {GRPC_PREFIX} }}",
    ]


WATCHERS_TABLE = "watchers"
# How many sessions' watcher counts HAProxy keeps (an entry goes 60 s after its last watcher).
WATCHERS_TABLE_SIZE = 65536
WATCH_PATH = f"/{SERVICE_NAME}/WatchVariables"


def watch_gate_lines(spec: HaproxySpec) -> list[str]:
    """Frontend lines that refuse a session's watchers beyond ``watchers_per_session`` in
    HAProxy, before they reach Python.

    The Python router refuses them too (``WatcherSlots``, which stays the rule), but refusing a
    call in grpc.aio costs ~150-450 us of the one event loop (``bench/refusals.py``): 300
    watchers opened at once on one session held everybody's next call 130-260 ms behind 284
    refusals. HAProxy reads the session id from the request (field 1 of
    ``WatchVariablesRequest``, ``ungrpc`` on the body, whole by then: a watch request is a few
    bytes and ends the stream) and counts the open streams that name it in a stick table (an
    entry's ``trackers``: streams tracking it, dropped when each ends). With authentication a
    session belongs to its caller (the store scopes ids by principal), so the count is per
    credentials (token and ticket) and session id, and a caller sees no count but its own (one
    principal's several credentials get a count each: looser, never stricter, than the
    store); without, one count per session id, as the store keeps it. A call HAProxy cannot
    read (compressed, or a body that did not come) is not counted and goes on to Python."""
    limit = spec.watchers_per_session
    if limit <= 0:
        return []
    # Either credential names the caller: a token, or a pool ticket of its own (direct-mode
    # clients, workers' calls back). Both go into the key, so callers who send no token are
    # not all counted as one.
    who = (
        f"%[req.fhdr({AUTHORIZATION_KEY}),sha2(256),hex]/%[req.fhdr({TICKET_KEY}),sha2(256),hex]/"
        if spec.auth_map
        else ""
    )
    refusal = ResourceExhausted(
        f"this session already has {limit} watchers, its limit (--max-watchers-per-session)"
    )
    return [
        f"  acl watch path {WATCH_PATH}",
        f"  http-request wait-for-body time {_milliseconds(BODY_WAIT)}ms at-least 1024 if watch",
        f"  http-request set-var(txn.watched) req.body,ungrpc(1),hex if watch {UNCOMPRESSED_BODY}",
        f'  http-request set-var-fmt(txn.watch_key) "{who}%[var(txn.watched)]" '
        "if watch { var(txn.watched) -m found }",
        f"  http-request track-sc1 var(txn.watch_key),sha2(256) table {WATCHERS_TABLE} "
        "if watch { var(txn.watch_key) -m found }",
        "  http-request return status 200 "
        f"{error_headers(refusal)} "
        f"if watch {{ var(txn.watch_key) -m found }} {{ sc1_trackers({WATCHERS_TABLE}) gt {limit} }}",
    ]


def watch_table_lines(limit: int) -> list[str]:
    """The stick table ``watch_gate_lines`` counts open watchers in."""
    if limit <= 0:
        return []
    return [
        f"backend {WATCHERS_TABLE}",
        f"  stick-table type binary len 32 size {WATCHERS_TABLE_SIZE} expire 60s",
        "",
    ]


# A W3C traceparent of version 00: trace id, parent span id, flags.
TRACEPARENT_PATTERN = "^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$"


def trace_lines(on: bool) -> list[str]:
    """Frontend lines that give a traced tool call the ids of the router's spans for it.

    HAProxy makes no spans. It keeps the caller's ``traceparent`` and picks two span ids (each
    the first 16 hex digits of a random UUID, 60 of them random), the router's span of the call
    and that of its attempt on a worker, for the call log; the Python router records the spans
    under those ids when the call's line arrives (``calllog``, ``spans``), and
    ``trace_parent_lines`` hands the attempt's to the worker as its parent. A call without a
    valid traceparent gets neither, as on the Python path (no trace is started for it)."""
    if not on:
        return []
    return [
        f"  acl traced req.hdr({TRACEPARENT}) -m reg {TRACEPARENT_PATTERN}",
        f"  http-request set-var(txn.parent) req.hdr({TRACEPARENT}) if fast traced",
        "  http-request set-var(txn.span) uuid,regsub(-,,g),bytes(0,16) if fast traced",
        "  http-request set-var(txn.attempt) uuid,regsub(-,,g),bytes(0,16) if fast traced",
    ]


def trace_parent_lines(on: bool) -> list[str]:
    """Backend lines: a call HAProxy sends to a worker carries the router's attempt span as
    parent (only there: a call handed to the Python router gets that router's own spans). A
    call HAProxy redispatches after a failed connect carries the same id to the next worker:
    one attempt span, naming the last worker."""
    if not on:
        return []
    return [
        f'  http-request set-header {TRACEPARENT} "00-%[var(txn.parent),field(2,-)]-'
        f'%[var(txn.attempt)]-%[var(txn.parent),field(4,-)]" if {{ var(txn.attempt) -m found }}',
    ]


def point_slot_command(server_id: int, host: str, port: int) -> str:
    """The runtime API command that points a slot at a worker (the slot stays in maintenance);
    HAProxy closes the slot's idle connections to its previous worker."""
    return f"set server {WORKERS_BACKEND}/{slot_name(server_id)} addr {host} port {port}"
