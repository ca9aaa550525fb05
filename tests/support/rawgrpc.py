"""A gRPC call made by hand over HTTP/2 (the ``h2`` package), to see an answer as it is on the
wire: what grpcio's C core forgives, other gRPC libraries may not.

grpcio reads ``grpc-status`` from any answer; grpc-go takes an answer without
``content-type: application/grpc`` for "malformed header: missing HTTP content-type" (UNKNOWN)
and one whose HTTP status is not 200 for that status's code (503: UNAVAILABLE), whatever its
``grpc-status`` says. gRPC's PROTOCOL-HTTP2 spec requires both of every answer, an error given
as "Trailers-Only" included.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events


@dataclass
class Answer:
    """What came back on the call's stream."""

    headers: dict[str, str] = field(default_factory=dict)
    trailers: dict[str, str] = field(default_factory=dict)
    reset: int | None = None  # the RST_STREAM error code, if the stream was reset

    @property
    def status(self) -> str:
        """``grpc-status``, from the trailers or (Trailers-Only) the headers."""
        return self.trailers.get("grpc-status") or self.headers.get("grpc-status", "")

    @property
    def message(self) -> str:
        return self.trailers.get("grpc-message") or self.headers.get("grpc-message", "")


def _text(pairs: list[tuple[bytes, bytes]] | list[tuple[str, str]]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in pairs
    }


def call(
    address: str,
    path: str,
    message: bytes,
    *,
    declared_length: int | None = None,
    end: bool = True,
    timeout: float = 15.0,
) -> Answer:
    """One call to ``path`` carrying ``message`` behind gRPC's 5-byte prefix, which says
    ``declared_length`` (default: the message's own). ``end=False`` leaves the request open
    after ``message`` (a caller still sending, or one that stalls): the server answers early.
    ``message`` must fit in the stream's first flow-control window (16 KiB is always safe)."""
    host, port = address.rsplit(":", 1)
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    connection.initiate_connection()
    stream = connection.get_next_available_stream_id()
    connection.send_headers(
        stream,
        [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", path),
            (":authority", address),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ],
    )
    length = len(message) if declared_length is None else declared_length
    connection.send_data(stream, b"\0" + struct.pack(">I", length) + message, end_stream=end)
    answer = Answer()
    with socket.create_connection((host, int(port)), timeout=timeout) as sock:
        sock.sendall(connection.data_to_send())
        while True:
            data = sock.recv(65536)
            if not data:
                raise ConnectionError(f"{address} closed the connection before answering {path}")
            for event in connection.receive_data(data):
                if getattr(event, "stream_id", stream) != stream:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    answer.headers = _text(event.headers)
                elif isinstance(event, h2.events.TrailersReceived):
                    answer.trailers = _text(event.headers)
                elif isinstance(event, h2.events.StreamReset):
                    answer.reset = int(event.error_code)
                    return answer
                elif isinstance(event, h2.events.StreamEnded):
                    return answer
            sock.sendall(connection.data_to_send())
