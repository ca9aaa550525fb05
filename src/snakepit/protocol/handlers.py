"""gRPC method handlers that parse their own requests, so garbage gets INVALID_ARGUMENT.

grpc turns an exception in a request deserializer into a bare UNKNOWN status; parsing inside
the handler instead lets a malformed message get a status and a message that say what was wrong.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from ..bridge.v1 import bridge_pb2 as pb
from ..errors import InvalidArgument, ResourceExhausted
from .status import abort_with

Context = Any  # grpc.aio.ServicerContext


async def parse(
    raw: bytes, request_type: type[Message], context: Context, max_bytes: int | None = None
) -> Any:
    """``raw`` parsed as ``request_type``; a request above ``max_bytes`` or a malformed one
    ends the call (RESOURCE_EXHAUSTED, INVALID_ARGUMENT)."""
    if max_bytes is not None and len(raw) > max_bytes:
        # Refused before parsing: a request this large costs the loop time to parse at all.
        await abort_with(
            context,
            ResourceExhausted(
                f"{request_type.__name__} of {len(raw)} bytes is larger than this server's "
                f"limit of {max_bytes} bytes"
            ),
        )
    try:
        return request_type.FromString(raw)
    except DecodeError as exc:
        await abort_with(context, InvalidArgument(f"malformed {request_type.__name__}: {exc}"))


def unary(
    fn: Callable[[Any, Context], Awaitable[Message | bytes]],
    request_type: type[Message],
    max_bytes: int | None = None,
) -> grpc.RpcMethodHandler:
    """A unary handler; ``fn`` may return a message or bytes it serialised itself (a store
    answer that splices a stored value in without decoding it)."""

    async def handler(raw: bytes, context: Context) -> bytes:
        response = await fn(await parse(raw, request_type, context, max_bytes), context)
        return response if isinstance(response, bytes) else response.SerializeToString()

    return grpc.unary_unary_rpc_method_handler(handler)


def unary_stream(
    fn: Callable[[Any, Context], AsyncIterator[Message | bytes]],
    request_type: type[Message],
    max_bytes: int | None = None,
) -> grpc.RpcMethodHandler:
    """A server-streaming handler; ``fn`` may yield messages or bytes it serialised itself
    (one encoding shared by many streams)."""

    async def handler(raw: bytes, context: Context) -> AsyncIterator[bytes]:
        async for response in fn(await parse(raw, request_type, context, max_bytes), context):
            yield response if isinstance(response, bytes) else response.SerializeToString()

    return grpc.unary_stream_rpc_method_handler(handler)


def pong(request: pb.PingRequest, server_id: str, role: str) -> pb.PingResponse:
    """The answer to Ping, the same from a router and a worker."""
    from .. import __version__

    return pb.PingResponse(
        message=request.message or "pong",
        server_id=server_id,
        role=role,
        version=__version__,
        server_time=time.time(),
    )


async def start_server(
    handler: grpc.GenericRpcHandler,
    health: Any,
    host: str,
    port: int,
    max_message_mb: int,
    max_connection_age_ms: int | None = None,
    *,
    max_streams_per_connection: int = 0,
    credentials: grpc.ServerCredentials | None = None,
    internal: tuple[str, grpc.ServerCredentials] | None = None,
) -> tuple[grpc.aio.Server, int, int]:
    """A started grpc.aio server with BridgeService ``handler`` and ``grpc.health.v1``, and its
    bound port: TLS with ``credentials``, else plaintext.

    ``max_streams_per_connection`` bounds the calls one connection has open at once (0: no
    bound; ``grpc_options.DEFAULT_MAX_STREAMS_PER_CONNECTION`` says what it buys and costs).
    ``internal`` is a second listener (address, credentials) for the pool's own hops, mutual TLS
    with the pool CA (a router's, for its workers' calls back); its port is the third value
    (0 without one).
    """
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection

    from ..grpc_options import server_options

    server = grpc.aio.server(
        options=server_options(
            max_message_mb,
            max_connection_age_ms=max_connection_age_ms,
            max_streams_per_connection=max_streams_per_connection,
        )
    )
    server.add_generic_rpc_handlers((handler,))
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    # Server reflection, so grpcurl, Postman and Evans can list and call without the .proto.
    reflection.enable_server_reflection(
        (
            pb.DESCRIPTOR.services_by_name["BridgeService"].full_name,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ),
        server,
    )
    address = f"{host}:{port}"
    bound = _listen(server, address, credentials)
    internal_port = _listen(server, *internal) if internal is not None else 0
    await server.start()
    return server, bound, internal_port


def _listen(
    server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    bound = (
        server.add_insecure_port(address)
        if credentials is None
        else server.add_secure_port(address, credentials)
    )
    if not bound:
        raise RuntimeError(f"cannot listen on {address}")
    return int(bound)


async def start_health_server(health: Any, host: str, port: int) -> grpc.aio.Server:
    """A plaintext server of ``grpc.health.v1`` alone (the process's own servicer), for
    probes that cannot speak TLS (the kubelet's gRPC probes): it carries no data and no call."""
    from grpc_health.v1 import health_pb2_grpc

    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    _listen(server, f"{host}:{port}", None)
    await server.start()
    return server
