"""gRPC channel and server options shared by every component.

Message limits are raised for tensors; SO_REUSEPORT is off so two processes can never share a
port silently; keepalive pings let a router notice a worker that stopped answering without
waiting for a call's deadline, and servers accept those pings.

Channels send no BDP probes (``grpc.http2.bdp_probe`` off). A server closes a connection it
sent GOAWAY on (connection ageing, stopping) as soon as its last call is answered; if a probe
PING the client sent while reading that answer is still unread in the server's socket then,
the kernel resets the connection instead of closing it and drops what the server had not yet
sent: the end of that answer. A call that *ran* then failed ``UNAVAILABLE: Stream removed
(recvmsg:Connection reset by peer … max_age)``, which no one may retry (1 MB answers: 2 to 7
calls in ~1,700 with a 50 ms connection age; none in 5,466 without probes). The probes only
tune the flow-control window to a link's delay; on a pool's network the fixed window is as
fast (``bench/bdp_probe.py``, docs/reliability.md).
"""

from __future__ import annotations

MB = 1024 * 1024
# 64 MiB: a message is received whole into memory (and, at the router, onto its event loop)
# before anything can refuse it, so the default bounds what one anonymous call costs;
# --max-message-mb raises it for pools that move larger tensors (docs/security.md).
DEFAULT_MAX_MESSAGE_MB = 64

Options = list[tuple[str, int | str]]

# How often a client of a router (a Client, a worker's store channel) moves to a new connection
# on its own: under the router's default --max-connection-age (5 s, jittered by up to 10 %) with
# room for a call that starts just before, so the router's ageing never closes a connection under
# a call (client/rotation.py says why that matters). A new connection every 2 s costs nothing
# measurable.
CLIENT_MAX_CONNECTION_AGE = 2.0

# Calls one client connection may have open at once on a router (HTTP/2
# SETTINGS_MAX_CONCURRENT_STREAMS); a client's further calls wait on its side for a free stream.
# grpc.aio accepts one new call per event-loop round trip, first come first served across all
# connections, so a burst of N calls from one connection puts every other caller's next call
# behind N accepts and N handler starts: 300 WatchVariables opened at once (284 of them
# refused) held another caller's small call ~90 ms; 64 streams per connection cut that 3-7x.
# Off by default: gRPC core servers count a stream as open a little longer than its client
# does, so a client keeping more calls in flight on one connection than the bound gets some
# of them refused (RST_STREAM REFUSED_STREAM, UNAVAILABLE "Stream removed"; 2-145 of 300
# concurrent unary calls at 100): safe to retry, never processed, but an error all the same
# (docs/security.md, "300 watchers"). 0: gRPC's default (no bound).
DEFAULT_MAX_STREAMS_PER_CONNECTION = 0


def server_options(
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
    *,
    max_connection_age_ms: int | None = None,
    max_streams_per_connection: int = 0,
) -> Options:
    limit = max_message_mb * MB
    options: Options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 1000),
        ("grpc.http2.max_ping_strikes", 0),
    ]
    if max_connection_age_ms:
        # GOAWAY each connection after this long (calls in flight finish): clients reconnect,
        # which spreads them over router replicas and lets a stopping router lose them gracefully.
        options.append(("grpc.max_connection_age_ms", max_connection_age_ms))
    if max_streams_per_connection > 0:
        options.append(("grpc.max_concurrent_streams", max_streams_per_connection))
    return options


def channel_options(
    max_message_mb: int = DEFAULT_MAX_MESSAGE_MB,
    *,
    keepalive_ms: int | None = None,
    max_reconnect_ms: int | None = None,
) -> Options:
    limit = max_message_mb * MB
    options: Options = [
        ("grpc.max_receive_message_length", limit),
        ("grpc.max_send_message_length", limit),
        # Each client and router replica keeps its own connections, even to the same target.
        ("grpc.use_local_subchannel_pool", 1),
        # A call that meets a server's GOAWAY (connection ageing, a stopping server) before the
        # server saw it is resent by gRPC itself ("transparent retry"), but only while the
        # request is still in the call's retry buffer (256 KiB by default): a 1 MB tensor call in
        # that race failed UNAVAILABLE "Stream removed" instead. The buffer holds references to
        # the request the call sends anyway, up to the message limit.
        ("grpc.per_rpc_retry_buffer_size", limit),
        # No probe PING may be unread when a server closes an aged-out connection (docstring).
        ("grpc.http2.bdp_probe", 0),
    ]
    if keepalive_ms:
        options += [
            ("grpc.keepalive_time_ms", keepalive_ms),
            ("grpc.keepalive_timeout_ms", keepalive_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
    if max_reconnect_ms:
        options += [
            ("grpc.initial_reconnect_backoff_ms", min(50, max_reconnect_ms)),
            ("grpc.min_reconnect_backoff_ms", min(50, max_reconnect_ms)),
            ("grpc.max_reconnect_backoff_ms", max_reconnect_ms),
        ]
    return options
