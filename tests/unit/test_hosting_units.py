"""Pure pieces of caller-hosted tools: reading a request's tool name, host errors, addresses."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from snakepit.errors import NotFound, PermissionDenied, ToolError
from snakepit.protocol import pb
from snakepit.protocol.messages import encode_request, request_tool_name
from snakepit.router.hosting import host_error, spec_signature
from snakepit.router.server import RouterConfig, advertised_address
from snakepit.security.gate import Gate, require_pool_tools
from snakepit.security.identity import ANONYMOUS, Principal


def test_the_tool_name_is_read_without_decoding_the_arguments() -> None:
    raw = encode_request("lookup_price", {"x": np.ones(100_000)}, "s1")
    assert request_tool_name(raw) == "lookup_price"
    assert request_tool_name(b"") == ""


def test_a_host_error_keeps_code_type_message_and_traceback() -> None:
    detail = pb.ErrorDetail(type="LookupError", message="no price", traceback="Traceback …")
    error = host_error(pb.HostError(code=grpc.StatusCode.INTERNAL.value[0], detail=detail))
    assert isinstance(error, ToolError)
    assert (error.remote_type, error.message, error.remote_traceback) == (
        "LookupError",
        "no price",
        "Traceback …",
    )
    chosen = host_error(
        pb.HostError(code=grpc.StatusCode.NOT_FOUND.value[0], detail=pb.ErrorDetail(message="x"))
    )
    assert isinstance(chosen, NotFound) and chosen.code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize(
    ("pod_ip", "flag", "expected"),
    [
        ("", "", "127.0.0.1:50051"),
        ("10.1.2.3", "", "10.1.2.3:50051"),
        ("fd00::7", "", "[fd00::7]:50051"),
        ("10.1.2.3", "router-0.example:9000", "router-0.example:9000"),
    ],
)
def test_the_address_other_routers_forward_to(
    monkeypatch: pytest.MonkeyPatch, pod_ip: str, flag: str, expected: str
) -> None:
    monkeypatch.setenv("POD_IP", pod_ip)
    assert advertised_address(RouterConfig(advertise_address=flag), 50051) == expected


def test_pool_wide_grants_follow_the_flag_admins_and_auth_off() -> None:
    gate = Gate(enabled=True, admins=frozenset({"ops"}), pool_tools=frozenset({"catalog-app"}))
    assert gate.grant(Principal("catalog-app", source="token")).pool_tools
    assert gate.grant(Principal("ops", source="token")).pool_tools  # admins always
    bob = gate.grant(Principal("bob", source="token"))
    assert not bob.pool_tools and not bob.direct  # one grant does not imply the other
    with pytest.raises(PermissionDenied, match="'bob' may not host tool 'x' for the whole pool"):
        require_pool_tools(bob, "x")
    everyone = Gate(enabled=True, pool_tools=frozenset({"*"}))
    assert everyone.grant(Principal("anyone", source="token")).pool_tools
    require_pool_tools(ANONYMOUS, "x")  # auth off: anonymous may do everything


def test_hosts_of_one_pool_wide_name_must_agree_on_parameters_not_descriptions() -> None:
    def spec(description: str, *params: str, streaming: bool = False) -> pb.ToolSpec:
        parameters = [pb.ParameterSpec(name=p) for p in params]
        return pb.ToolSpec(
            name="t", description=description, parameters=parameters, streaming=streaming
        )

    assert spec_signature(spec("one", "a")) == spec_signature(spec("two", "a"))
    assert spec_signature(spec("one", "a")) != spec_signature(spec("one", "a", "b"))
    assert spec_signature(spec("one", "a")) != spec_signature(spec("one", "a", streaming=True))
