"""Store calls in flight per principal (``--max-store-calls-per-principal``), on real routers.

Issue 13's 20,000-session flood: one principal's store requests, as many as it can send at once,
filled the router's event loop ahead of everyone else's. Each router here is a real ``snakepit
router`` process (memory store, no workers: store calls need none) with two token principals;
the flooder sends hundreds of concurrent writes over one connection, as the attack did.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc
import pytest

from snakepit.protocol import pb, pb_grpc, to_pb
from tests.fixtures.processes import ProcessFactory

FLOODER = "flooder-token-0123456789abcdef"
VICTIM = "victim-token-0123456789abcdef0"
FLOOD = 300


def _bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def routers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """``waits``: 2 store calls per principal, a long line; ``full``: 1 call and a line of 1;
    ``open``: auth off, 1 call and a line of 1 (everyone is the anonymous principal);
    ``rate``: 20 store calls a second per principal, a call waiting at most 1 s for its turn."""
    tmp = tmp_path_factory.mktemp("fairness")
    tokens = tmp / "tokens"
    tokens.write_text(f"flooder:{FLOODER}\nvictim:{VICTIM}\n")
    procs = ProcessFactory(tmp)
    auth = ("--auth-tokens", str(tokens))
    try:
        yield {
            "waits": procs.router([], *auth, "--max-store-calls-per-principal", "2").address,
            "full": procs.router(
                [], *auth, "--max-store-calls-per-principal", "1", "--queue-size", "1"
            ).address,
            "open": procs.router(
                [], "--max-store-calls-per-principal", "1", "--queue-size", "1"
            ).address,
            "rate": procs.router(
                [],
                *auth,
                "--max-store-calls-per-principal",
                "0",
                "--store-call-rate-per-principal",
                "20",
                "--queue-timeout",
                "1",
            ).address,
        }
    finally:
        procs.close()


@dataclass
class Flood:
    codes: dict[str, int] = field(default_factory=dict)  # status name -> calls
    messages: dict[str, str] = field(default_factory=dict)  # status name -> a message
    acknowledged: dict[str, str] = field(default_factory=dict)  # name -> value written
    victim: list[str] = field(default_factory=list)  # how each victim round ended


async def _flood(address: str, token: str, session: str, victim_rounds: int = 0) -> Flood:
    """FLOOD concurrent SetVariables of the flooder's session ``session`` (value = name), while
    the victim writes and reads back its own variable ``victim_rounds`` times."""
    metadata = _bearer(token) if token else None
    async with (
        grpc.aio.insecure_channel(address) as flood_channel,
        grpc.aio.insecure_channel(address) as victim_channel,
    ):
        flooder = pb_grpc.BridgeServiceStub(flood_channel)
        victim = pb_grpc.BridgeServiceStub(victim_channel)
        await flooder.InitializeSession(
            pb.InitializeSessionRequest(session_id=session, get_or_create=True),
            metadata=metadata,
        )
        await victim.InitializeSession(
            pb.InitializeSessionRequest(session_id="mine", get_or_create=True),
            metadata=_bearer(VICTIM),
        )
        out = Flood()

        async def write(n: int) -> None:
            name = f"v{n}"
            request = pb.SetVariableRequest(session_id=session, name=name, value=to_pb(name))
            try:
                await flooder.SetVariable(request, metadata=metadata, timeout=60)
                out.acknowledged[name] = name
                code = "OK"
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                out.messages[code] = exc.details() or ""
            out.codes[code] = out.codes.get(code, 0) + 1

        async def victim_calls() -> list[str]:
            outcomes = []
            for n in range(victim_rounds):
                set_request = pb.SetVariableRequest(session_id="mine", name="x", value=to_pb(n))
                get_request = pb.GetVariableRequest(session_id="mine", name="x")
                try:
                    await victim.SetVariable(set_request, metadata=_bearer(VICTIM), timeout=30)
                    got = await victim.GetVariable(
                        get_request, metadata=_bearer(VICTIM), timeout=30
                    )
                    outcomes.append("OK" if got.variable.version == n + 1 else "stale")
                except grpc.aio.AioRpcError as exc:
                    outcomes.append(exc.code().name)
            return outcomes

        flood = asyncio.gather(*(write(n) for n in range(FLOOD)))
        out.victim = await victim_calls()
        await flood
        return out


async def _stored(address: str, token: str, session: str) -> dict[str, str]:
    metadata = _bearer(token) if token else None
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.BridgeServiceStub(channel)
        reply = await stub.ListVariables(
            pb.ListVariablesRequest(session_id=session), metadata=metadata, timeout=30
        )
    return {var.name: var.value.json.decode().strip('"') for var in reply.variables}


async def test_a_flooding_principal_waits_in_its_own_line_and_another_passes(
    routers: dict[str, str],
) -> None:
    """Every one of the flood's 300 concurrent writes succeeds (at most 2 run at once, so the
    rest waited), the victim's writes and reads all succeed meanwhile, and every acknowledged
    write of the flooder is there afterwards."""
    flood = await _flood(routers["waits"], FLOODER, "flood", 20)
    assert flood.codes == {"OK": FLOOD}
    assert flood.victim == ["OK"] * 20
    assert await _stored(routers["waits"], FLOODER, "flood") == flood.acknowledged


async def test_a_full_line_is_resource_exhausted_naming_the_flag(
    routers: dict[str, str],
) -> None:
    """With one call running and one waiting allowed, the same flood has calls refused at
    once with RESOURCE_EXHAUSTED naming the flag; a refused write wrote nothing and an
    acknowledged one was kept; the other principal is not refused."""
    flood = await _flood(routers["full"], FLOODER, "flood", 5)
    assert set(flood.codes) == {"OK", "RESOURCE_EXHAUSTED"}, flood.codes
    message = flood.messages["RESOURCE_EXHAUSTED"]
    assert "principal 'flooder'" in message
    assert "--max-store-calls-per-principal 1" in message
    assert flood.victim == ["OK"] * 5
    assert await _stored(routers["full"], FLOODER, "flood") == flood.acknowledged


async def test_anonymous_callers_are_not_counted(routers: dict[str, str]) -> None:
    """With auth off everyone is one principal, ``anonymous``: a bound would be a cap on the
    router's store calls as a whole, so it does not apply (docs/security.md)."""
    flood = await _flood(routers["open"], "", "flood")
    assert flood.codes == {"OK": FLOOD}
    assert await _stored(routers["open"], "", "flood") == flood.acknowledged


async def test_a_principal_over_its_rate_waits_its_turn_or_is_refused_naming_the_flag(
    routers: dict[str, str],
) -> None:
    """At 20 calls a second and a 1 s wait at most, a flood of 300 concurrent writes gets a
    second's worth at once, the next second's worth after waiting, and the rest refused at once
    with RESOURCE_EXHAUSTED naming the flag (a refused write wrote nothing); the other
    principal's calls all pass meanwhile."""
    flood = await _flood(routers["rate"], FLOODER, "flood", 5)
    assert set(flood.codes) == {"OK", "RESOURCE_EXHAUSTED"}, flood.codes
    assert 20 <= flood.codes["OK"] <= 60, flood.codes
    message = flood.messages["RESOURCE_EXHAUSTED"]
    assert "principal 'flooder' is over its 20 store calls a second" in message
    assert "--store-call-rate-per-principal" in message
    assert flood.victim == ["OK"] * 5
    assert await _stored(routers["rate"], FLOODER, "flood") == flood.acknowledged
