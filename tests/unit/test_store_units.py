"""Store pieces that need no server: memory expiry bookkeeping, URL handling, declarations."""

from __future__ import annotations

import pytest

from snakepit.errors import InvalidArgument, NotFound
from snakepit.protocol import Constraints, decode_value, encode_value
from snakepit.store import MemoryStore, open_store
from snakepit.store.redis import RedisStore
from snakepit.store.redis_conn import PASSWORD_ENV, parse_target
from snakepit.store.remote import RemoteStore
from snakepit.store.rules import (
    Declaration,
    check_session_id,
    load_bytes,
    parse_declaration,
    store_bytes,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_expiry_keeps_one_heap_entry_per_session() -> None:
    clock = FakeClock()
    store = MemoryStore(default_ttl=10, clock=clock)
    for i in range(100):
        await store.create_session(f"s{i}")
    for _ in range(50):  # touching moves deadlines without pushing heap entries
        clock.now += 1
        for i in range(0, 100, 2):
            await store.touch_session(f"s{i}")
        assert len(store._heap) <= 100
    assert (await store.stats()).sessions == 50  # the untouched half expired on its own
    assert len(store._heap) == 50
    clock.now += 9.5
    assert (await store.stats()).sessions == 50
    clock.now += 1
    assert (await store.stats()).sessions == 0 and store._heap == []
    with pytest.raises(NotFound):
        await store.get_session("s0")
    await store.close()


async def test_memory_values_are_stored_not_aliased() -> None:
    store = MemoryStore()
    await store.create_session("s")
    items = [1, 2]
    await store.set_variable("s", "l", items)
    items.append(3)
    got = (await store.get_variable("s", "l")).value
    got.append(4)
    assert (await store.get_variable("s", "l")).value == [1, 2]


def test_parse_target_password_precedence_and_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    t = parse_target("redis://:urlpw@db.example:6380/2?prefix=pool1&socket_timeout=3")
    assert t.password is None and ":urlpw@" in t.url  # the URL's own password stays in it
    assert t.prefix == "pool1" and "prefix" not in t.url and "socket_timeout=3" in t.url
    assert t.where == "redis://db.example:6380/2" and "urlpw" not in t.where
    monkeypatch.setenv(PASSWORD_ENV, "envpw")
    t = parse_target("rediss://user:urlpw@db.example/0")
    assert t.password == "envpw" and "urlpw" not in t.url and "user@" in t.url
    assert parse_target("redis://h", password="argpw").password == "argpw"
    assert parse_target("unix:///run/redis.sock").where == "unix:///run/redis.sock"
    # the URL handed to redis-py keeps its "//" (8.2 refuses "unix:/run/redis.sock")
    unix = parse_target("unix:///run/redis.sock?db=2&prefix=p")
    assert unix.url == "unix:///run/redis.sock?db=2" and unix.prefix == "p"
    with pytest.raises(InvalidArgument, match="not a Redis URL"):
        parse_target("http://h")


def test_open_store_dispatches_on_the_url() -> None:
    assert isinstance(open_store("memory", default_ttl=5, max_sessions=3), MemoryStore)
    assert isinstance(open_store("redis://127.0.0.1:1/0"), RedisStore)
    assert isinstance(open_store("rediss://127.0.0.1:1/0"), RedisStore)
    assert isinstance(open_store("unix:///tmp/none.sock"), RedisStore)
    assert isinstance(open_store("grpc://127.0.0.1:1"), RemoteStore)
    with pytest.raises(InvalidArgument, match="channel"):
        open_store("router")
    with pytest.raises(InvalidArgument, match="unknown session store"):
        open_store("mongodb://x")


def test_declarations_round_trip_and_differ_per_registration() -> None:
    decl = Declaration.new("float", Constraints.from_dict({"min": 0, "max": 1}), {"unit": "s"})
    again = parse_declaration(decl.encode())
    assert again == decl
    assert Declaration.new("float").encode() != Declaration.new("float").encode()
    assert decl.prepare(1, "lr")[0] == 1.0
    with pytest.raises(InvalidArgument, match="maximum"):
        decl.prepare(2, "lr")


def test_session_ids_cannot_alias_redis_keys() -> None:
    for bad in ("", "a}b", "a{b", "x\n", "y" * 257):
        with pytest.raises(InvalidArgument):
            check_session_id(bad)
    assert check_session_id("user@example.com:42") == "user@example.com:42"


def test_stored_numbers_are_the_codec_form_lua_reads() -> None:
    # lua.INCREMENT parses and writes exactly this layout: type (field 1), JSON (field 2).
    assert store_bytes(5, "integer") == b"\n\x07integer\x12\x015"
    assert store_bytes(0.5, "float") == b"\n\x05float\x12\x030.5"
    assert decode_value(b"\n\x05float\x12\x08Infinity") == float("inf")
    assert store_bytes(5, "integer") == encode_value(5, "integer")


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (0, "integer"),
        (-(2**63), "integer"),
        (10**40, "integer"),
        (0.1, "float"),
        (-0.0, "float"),
        (1e300, "float"),
        (5e-324, "float"),
        (float("nan"), "float"),
        (float("-inf"), "float"),
        (3.0, "float"),
    ],
)
def test_scalar_fast_paths_match_the_codec(value: float, type_name: str) -> None:
    data = store_bytes(value, type_name)
    assert data == encode_value(value, type_name, threshold=0)
    back = load_bytes(data)
    assert type(back) is type(decode_value(data))
    assert repr(back) == repr(decode_value(data))


async def test_an_answer_splices_the_stored_bytes_without_decoding_them() -> None:
    from snakepit.protocol import from_pb, pb
    from snakepit.store.base import Variable
    from snakepit.store.rules import UNDECODED, Encoded, check_value

    store = MemoryStore()
    await store.create_session("s")
    value = {"rows": [[1, 2.5, "x"], [None, True, "é"]]}
    await store.set_variable("s", "v", value, type_name="map")
    read = await store.get_variable("s", "v")
    assert read._value is UNDECODED  # not decoded by the store...
    wire = pb.Variable.FromString(read.wire().to_bytes())
    assert read._value is UNDECODED  # ...nor by its answer
    assert (wire.name, wire.type, wire.version) == ("v", "map", 1)
    assert from_pb(wire.value) == value == read.value
    # A variable read from the wire (no stored bytes) encodes its value.
    again = Variable.from_proto(wire)
    assert pb.Variable.FromString(again.wire().to_bytes()) == read.to_proto()
    # A value still encoded is checked to the same declaration and bytes as the decoded one.
    decl = Declaration.new("map")
    inline = await check_value(decl, value, "v")
    encoded = await check_value(decl, Encoded(encode_value(value), "SetVariable 'v'"), "v")
    assert encoded[0] is decl and encoded[1] is UNDECODED and encoded[2] == inline[2]
