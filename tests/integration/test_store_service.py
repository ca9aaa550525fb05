"""StoreService seen from a raw gRPC client: status codes, messages and handler wiring."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import grpc
import pytest

from snakepit.grpc_options import channel_options
from snakepit.protocol import SERVICE_NAME, pb, pb_grpc, to_pb
from snakepit.protocol.status import ERROR_DETAIL_KEY, error_from_rpc
from snakepit.store import MemoryStore, SessionStore
from snakepit.store.service import STORE_METHODS, StoreService, method_handlers

from .test_store_contract import serve_store


@contextlib.asynccontextmanager
async def store_stub(store: SessionStore) -> AsyncIterator[pb_grpc.BridgeServiceStub]:
    """A raw gRPC stub of a loopback server hosting ``store``'s RPCs."""
    server, target = await serve_store(store)
    channel = grpc.aio.insecure_channel(target, options=channel_options())
    try:
        yield pb_grpc.BridgeServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(None)


@pytest.fixture
async def stub() -> AsyncIterator[pb_grpc.BridgeServiceStub]:
    async with store_stub(MemoryStore(max_sessions=2)) as raw:
        yield raw


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    """The error a call ends with (it must fail)."""
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    return caught.value


async def test_bad_input_is_invalid_argument_naming_the_problem(
    stub: pb_grpc.BridgeServiceStub,
) -> None:
    await stub.InitializeSession(pb.InitializeSessionRequest(session_id="s"))
    cases = [
        (stub.GetSession(pb.GetSessionRequest(session_id="")), "session id is empty"),
        (
            stub.RegisterVariable(
                pb.RegisterVariableRequest(
                    session_id="s", name="x", type="quaternion", value=to_pb(1)
                )
            ),
            "unknown type 'quaternion'",
        ),
        (
            stub.SetVariable(
                pb.SetVariableRequest(
                    session_id="s", name="x", value=pb.Value(type="integer", json=b"{oops")
                )
            ),
            "SetVariable 'x': malformed value",
        ),
        (
            stub.SetVariable(pb.SetVariableRequest(session_id="s", name="x")),
            "SetVariable 'x': no value given",
        ),
        (
            stub.SetVariables(
                pb.SetVariablesRequest(session_id="s", values={"y": pb.Value(type="tensor")})
            ),
            "SetVariables 'y'",
        ),
        (
            stub.IncrementVariable(
                pb.IncrementVariableRequest(session_id="s", name="n", by=to_pb("one"))
            ),
            "needs a number",
        ),
    ]
    for call, message in cases:
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, message
        assert message in (error.details() or ""), (message, error.details())
        detail = dict(error.trailing_metadata() or ())
        assert ERROR_DETAIL_KEY in detail


async def test_store_errors_keep_their_status_codes(stub: pb_grpc.BridgeServiceStub) -> None:
    missing = await rpc_error(stub.GetVariable(pb.GetVariableRequest(session_id="nope", name="x")))
    assert missing.code() == grpc.StatusCode.NOT_FOUND
    await stub.InitializeSession(pb.InitializeSessionRequest(session_id="a"))
    again = await rpc_error(stub.InitializeSession(pb.InitializeSessionRequest(session_id="a")))
    assert again.code() == grpc.StatusCode.ALREADY_EXISTS
    await stub.InitializeSession(pb.InitializeSessionRequest(session_id="b"))
    full = await rpc_error(stub.InitializeSession(pb.InitializeSessionRequest(session_id="c")))
    assert full.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert type(error_from_rpc(full)).__name__ == "ResourceExhausted"
    await stub.SetVariable(pb.SetVariableRequest(session_id="a", name="v", value=to_pb(1)))
    cas = await rpc_error(
        stub.SetVariable(
            pb.SetVariableRequest(session_id="a", name="v", value=to_pb(2), expected_version=7)
        )
    )
    assert cas.code() == grpc.StatusCode.FAILED_PRECONDITION
    watch = stub.WatchVariables(pb.WatchVariablesRequest(session_id="nope"))
    error = await rpc_error(watch.read())
    assert error.code() == grpc.StatusCode.NOT_FOUND


async def test_handlers_mount_next_to_other_handlers() -> None:
    assert set(STORE_METHODS) == {
        "InitializeSession", "GetSession", "CleanupSession", "Heartbeat", "ListSessions",
        "RegisterVariable", "GetVariable", "SetVariable", "GetVariables", "SetVariables",
        "ListVariables", "DeleteVariable", "IncrementVariable", "WatchVariables",
    }  # fmt: skip
    handlers = method_handlers(StoreService(MemoryStore()))
    assert set(handlers) == set(STORE_METHODS)
    assert handlers["WatchVariables"].response_streaming
    assert not handlers["GetVariable"].response_streaming

    async def ping(request: bytes, context: object) -> bytes:
        return request

    # The router's way: the store's handlers plus its own raw-bytes ones, one service name.
    handlers["Ping"] = grpc.unary_unary_rpc_method_handler(ping)
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.BridgeServiceStub(channel)
            reply = await stub.InitializeSession(pb.InitializeSessionRequest(session_id="s"))
            assert reply.created and reply.session.session_id == "s"
            raw = channel.unary_unary(f"/{SERVICE_NAME}/Ping")
            assert await raw(b"\x0a\x02hi") == b"\x0a\x02hi"
    finally:
        await server.stop(None)
