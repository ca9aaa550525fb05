"""The session store contract, one suite over every backend, each made of real components.

- memory: a MemoryStore in this process;
- redis: a RedisStore on a real redis-server (a key prefix of its own per test);
- remote: a RemoteStore talking gRPC to a real grpc.aio server on loopback that hosts
  StoreService over a MemoryStore.

``share(store)`` gives a URL another OS process can open the same store with: the Redis URL
(with the test's prefix), or a gRPC server hosting the store.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
import numpy as np
import pytest

from snakepit.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from snakepit.grpc_options import server_options
from snakepit.protocol import Constraints
from snakepit.store import ChangeFeed, MemoryStore, SessionStore, VariableChange
from snakepit.store.limits import DEFAULT_LIMITS, StoreLimits
from snakepit.store.redis import RedisStore
from snakepit.store.remote import RemoteStore
from snakepit.store.service import StoreService, generic_handler

# redis-acl: Redis as the pool's ACL user (store/acl.py), which may send only the store's commands.
BACKENDS = ("memory", "redis", "redis-acl", "remote")


async def serve_store(store: SessionStore) -> tuple[grpc.aio.Server, str]:
    """A loopback gRPC server hosting ``store``'s RPCs; (server, "host:port")."""
    server = grpc.aio.server(options=server_options())
    server.add_generic_rpc_handlers((generic_handler(StoreService(store)),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


@dataclass
class Backend:
    name: str
    redis_url: str = ""
    stores: list[SessionStore] = field(default_factory=list)
    servers: list[grpc.aio.Server] = field(default_factory=list)
    targets: dict[int, str] = field(default_factory=dict)

    async def make(
        self,
        *,
        default_ttl: float = 60.0,
        max_sessions: int = 1000,
        limits: StoreLimits = DEFAULT_LIMITS,
    ) -> SessionStore:
        store: SessionStore
        if self.name == "memory":
            store = MemoryStore(default_ttl=default_ttl, max_sessions=max_sessions, limits=limits)
        elif self.name.startswith("redis"):
            store = RedisStore(
                self.redis_url,
                default_ttl=default_ttl,
                max_sessions=max_sessions,
                retry_timeout=2.0,
                limits=limits,
            )
        else:
            hosted = MemoryStore(default_ttl=default_ttl, max_sessions=max_sessions, limits=limits)
            self.stores.append(hosted)
            server, target = await serve_store(hosted)
            self.servers.append(server)
            store = RemoteStore(target, default_ttl=default_ttl, max_sessions=max_sessions)
            self.targets[id(store)] = f"grpc://{target}"
        self.stores.append(store)
        return store

    async def share(self, store: SessionStore) -> str:
        if self.name.startswith("redis"):
            return self.redis_url
        if id(store) not in self.targets:
            server, target = await serve_store(store)
            self.servers.append(server)
            self.targets[id(store)] = f"grpc://{target}"
        return self.targets[id(store)]

    async def close(self) -> None:
        for store in reversed(self.stores):
            await store.close()
        for server in self.servers:
            await server.stop(None)


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    chosen = Backend(request.param)
    if request.param == "redis":
        server = request.getfixturevalue("redis_server")
        prefix = request.getfixturevalue("redis_prefix")
        chosen.redis_url = f"{server.url}?prefix={prefix}"
    elif request.param == "redis-acl":
        chosen.redis_url = request.getfixturevalue("redis_acl_url")
    try:
        yield chosen
    finally:
        await chosen.close()


@pytest.fixture
async def store(backend: Backend) -> SessionStore:
    return await backend.make()


def C(**spec: Any) -> Constraints:
    return Constraints.from_dict(spec)


async def next_change(feed: ChangeFeed, timeout: float = 5.0) -> VariableChange:
    return await asyncio.wait_for(feed.__anext__(), timeout)


# Sessions -----------------------------------------------------------------------------------
async def test_session_lifecycle(store: SessionStore) -> None:
    info, created = await store.create_session("s1", ttl=30, metadata={"user": "ada"})
    assert created and info.session_id == "s1" and info.ttl_seconds == 30
    assert info.metadata == {"user": "ada"} and info.variable_count == 0
    assert info.expires_at == pytest.approx(info.last_accessed_at + 30)
    await store.set_variable("s1", "x", 1)
    got = await store.get_session("s1")
    assert got.variable_count == 1 and got.created_at == info.created_at
    touched = await store.touch_session("s1")
    assert touched.last_accessed_at >= got.last_accessed_at
    assert [s.session_id for s in await store.list_sessions()] == ["s1"]
    assert await store.delete_session("s1") is True
    assert await store.delete_session("s1") is False
    with pytest.raises(NotFound, match="s1"):
        await store.get_session("s1")
    assert await store.list_sessions() == []


async def test_create_conflicts_random_ids_and_get_or_create(store: SessionStore) -> None:
    a, _ = await store.create_session()
    b, _ = await store.create_session()
    assert a.session_id and b.session_id and a.session_id != b.session_id
    with pytest.raises(AlreadyExists):
        await store.create_session(a.session_id)
    again, created = await store.create_session(a.session_id, get_or_create=True)
    assert not created and again.created_at == a.created_at


async def test_bad_ids_are_invalid_arguments(store: SessionStore) -> None:
    with pytest.raises(InvalidArgument, match="session id is empty"):
        await store.get_session("")
    with pytest.raises(InvalidArgument):
        await store.create_session("a}b")
    await store.create_session("s")
    with pytest.raises(InvalidArgument, match="variable name is empty"):
        await store.set_variable("s", "", 1)
    with pytest.raises(InvalidArgument, match="TTL"):
        await store.create_session("t", ttl=-1)


async def test_ttl_expiry_takes_the_variables_with_it(backend: Backend) -> None:
    store = await backend.make(default_ttl=0.3)
    await store.create_session("short")
    await store.create_session("long", ttl=30)
    await store.set_variable("short", "x", 1)
    await asyncio.sleep(0.45)
    with pytest.raises(NotFound):
        await store.get_session("short")
    with pytest.raises(NotFound):
        await store.get_variable("short", "x")
    assert [s.session_id for s in await store.list_sessions()] == ["long"]
    # A new session with the same id starts empty.
    await store.create_session("short")
    assert await store.list_variables("short") == []


async def test_sliding_ttl_every_operation_refreshes(backend: Backend) -> None:
    store = await backend.make(default_ttl=0.4)
    await store.create_session("s")
    await store.set_variable("s", "x", 1)
    for _ in range(4):  # 0.8 s in all: twice the TTL, kept alive by reads
        await asyncio.sleep(0.2)
        assert (await store.get_variable("s", "x")).value == 1
    info = await store.touch_session("s", worker_id="w1")
    assert info.last_worker_id == "w1" or backend.name == "remote"
    await asyncio.sleep(0.55)
    with pytest.raises(NotFound):
        await store.get_variable("s", "x")


async def test_existing_answers_without_keeping_sessions_alive(backend: Backend) -> None:
    """The router's sweep of hosted-tool sessions asks this every few seconds: if asking slid
    the expiry, every session a tool host serves would live for ever."""
    store = await backend.make(default_ttl=1.0)
    await store.create_session("kept", ttl=30)
    await store.create_session("deleted")
    await store.create_session("short")
    await store.delete_session("deleted")
    assert await store.existing(["kept", "deleted", "short", "never"]) == {"kept", "short"}
    for _ in range(6):  # 1.8 s in all, asked every 0.3 s
        await asyncio.sleep(0.3)
        await store.existing(["short"])
    assert await store.existing(["kept", "short"]) == {"kept"}
    assert await store.existing([]) == set()


async def test_quota_counts_live_sessions_only(backend: Backend) -> None:
    store = await backend.make(max_sessions=3)
    for i in range(3):
        await store.create_session(f"s{i}", ttl=0.3 if i == 0 else 30)
    with pytest.raises(ResourceExhausted, match="3"):
        await store.create_session("s3")
    assert (await store.stats()).sessions == 3
    await store.delete_session("s1")
    await store.create_session("s3")
    await asyncio.sleep(0.4)  # s0 expires: its slot frees without any cleanup call
    await store.create_session("s4")
    with pytest.raises(ResourceExhausted):
        await store.create_session("s5")
    assert sorted(s.session_id for s in await store.list_sessions()) == ["s2", "s3", "s4"]


async def test_each_principal_holds_at_most_its_share_of_sessions(backend: Backend) -> None:
    """Keys ``PRINCIPAL/ID`` count against that principal's limit only; bare (anonymous) ids
    against none but the total; a deleted or expired session frees its principal's slot."""
    store = await backend.make(
        max_sessions=10, limits=replace(DEFAULT_LIMITS, max_sessions_per_principal=2)
    )
    await store.create_session("alice/a", ttl=0.3)
    await store.create_session("alice/b")
    with pytest.raises(
        ResourceExhausted, match=r"principal 'alice' holds 2 sessions.*per-principal"
    ):
        await store.create_session("alice/c")
    with pytest.raises(ResourceExhausted):
        await store.create_session("alice/d", get_or_create=True)
    await store.create_session("bob/a")  # another principal is not affected
    await store.create_session("bob/b")
    for i in range(3):  # nor the anonymous caller's bare ids
        await store.create_session(f"bare{i}")
    # Refused creates left nothing behind; an existing session is still got, not created.
    assert not await store.existing(["alice/c", "alice/d"])
    info, created = await store.create_session("alice/b", get_or_create=True)
    assert not created and info.session_id == "alice/b"
    await store.delete_session("alice/b")
    await store.create_session("alice/c")
    await asyncio.sleep(0.4)  # alice/a expires: its slot frees without any cleanup call
    await store.create_session("alice/d")
    with pytest.raises(ResourceExhausted, match="alice"):
        await store.create_session("alice/e")
    assert sorted(s.session_id for s in await store.list_sessions() if "/" in s.session_id) == [
        "alice/c",
        "alice/d",
        "bob/a",
        "bob/b",
    ]


# Types, constraints, versions ----------------------------------------------------------------
async def test_types_are_inferred_declared_and_enforced(store: SessionStore) -> None:
    await store.create_session("s")
    assert (await store.set_variable("s", "i", 3)).type == "integer"
    assert (await store.set_variable("s", "f", 2.5)).type == "float"
    assert (await store.set_variable("s", "txt", "hi")).type == "string"
    assert (await store.set_variable("s", "m", {"a": [1, None]})).value == {"a": [1, None]}
    assert (await store.set_variable("s", "b", b"\x00\xff")).value == b"\x00\xff"
    declared = await store.set_variable("s", "d", 1, type_name="float")
    assert declared.type == "float" and declared.value == 1.0
    assert (await store.set_variable("s", "f", 7)).value == 7.0  # ints widen to a float var
    with pytest.raises(InvalidArgument, match="float"):
        await store.set_variable("s", "f", "seven")
    with pytest.raises(InvalidArgument, match="integer"):
        await store.set_variable("s", "i", 1.5)
    f = await store.get_variable("s", "f")
    assert f.value == 7.0 and f.version == 2
    with pytest.raises(InvalidArgument, match="unknown type"):
        await store.register_variable("s", "z", "quaternion", 1)
    with pytest.raises(InvalidArgument, match="does not apply"):
        await store.register_variable("s", "z", "string", "x", constraints=C(min=0))


async def test_constraint_refusal_leaves_the_old_value(store: SessionStore) -> None:
    await store.create_session("s")
    lr = await store.register_variable("s", "lr", "float", 0.1, constraints=C(min=0, max=1))
    assert lr.constraints == C(min=0, max=1) and lr.version == 1
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(InvalidArgument, match="lr"):
            await store.set_variable("s", "lr", bad)
    with pytest.raises(InvalidArgument, match="maximum"):
        await store.set_variables("s", {"lr": 2.0})
    kept = await store.get_variable("s", "lr")
    assert (kept.value, kept.version) == (0.1, 1)
    await store.register_variable(
        "s", "mode", "string", "fast", constraints=C(choices=["fast", "slow"])
    )
    with pytest.raises(InvalidArgument, match="choices"):
        await store.set_variable("s", "mode", "medium")
    await store.register_variable("s", "code", "string", "ab1", constraints=C(pattern="[a-z]+\\d"))
    with pytest.raises(InvalidArgument, match="pattern"):
        await store.set_variable("s", "code", "1ab")
    await store.register_variable(
        "s", "w", "tensor", np.zeros((2, 3), np.float32), constraints=C(shape=[-1, 3])
    )
    await store.set_variable("s", "w", np.ones((5, 3), np.float32))
    with pytest.raises(InvalidArgument, match="shape"):
        await store.set_variable("s", "w", np.ones((3, 2), np.float32))
    assert (await store.get_variable("s", "w")).value.shape == (5, 3)
    assert (await store.get_variable("s", "mode")).value == "fast"
    assert (await store.get_variable("s", "code")).value == "ab1"


async def test_versions_and_compare_and_set(store: SessionStore) -> None:
    await store.create_session("s")
    v = await store.set_variable("s", "x", "a", expected_version=0)  # create-only
    assert v.version == 1
    with pytest.raises(FailedPrecondition):
        await store.set_variable("s", "x", "b", expected_version=0)
    assert (await store.set_variable("s", "x", "b")).version == 2
    assert (await store.set_variable("s", "x", "c", expected_version=2)).version == 3
    with pytest.raises(FailedPrecondition, match="version 3"):
        await store.set_variable("s", "x", "d", expected_version=2)
    x = await store.get_variable("s", "x")
    assert (x.value, x.version) == ("c", 3) and x.updated_at >= x.created_at
    with pytest.raises(NotFound):
        await store.set_variable("s", "nope", 1, expected_version=4)
    # Re-declaring is a write too: the version moves on.
    again = await store.register_variable("s", "x", "string", "e", metadata={"unit": "none"})
    assert again.version == 4 and again.metadata == {"unit": "none"}


async def test_compare_and_set_lets_exactly_one_racer_win(store: SessionStore) -> None:
    await store.create_session("s")
    await store.set_variable("s", "owner", "nobody")

    async def claim(who: str) -> bool:
        try:
            await store.set_variable("s", "owner", who, expected_version=1)
            return True
        except FailedPrecondition:
            return False

    wins = await asyncio.gather(*(claim(f"w{i}") for i in range(10)))
    assert sum(wins) == 1
    assert (await store.get_variable("s", "owner")).version == 2


async def test_increment_semantics(store: SessionStore) -> None:
    await store.create_session("s")
    created = await store.increment("s", "n")
    assert (created.type, created.value, created.version) == ("integer", 1, 1)
    assert (await store.increment("s", "n", 41)).value == 42
    assert (await store.increment("s", "n", -2)).value == 40
    with pytest.raises(InvalidArgument, match="integer"):
        await store.increment("s", "n", 0.5)
    f = await store.increment("s", "f", 0.1)
    assert f.type == "float"
    assert (await store.increment("s", "f", 0.2)).value == 0.1 + 0.2
    assert (await store.increment("s", "f", 2)).value == 0.1 + 0.2 + 2
    await store.register_variable("s", "b", "integer", 8, constraints=C(min=0, max=10))
    assert (await store.increment("s", "b", 2)).value == 10
    with pytest.raises(InvalidArgument, match="maximum"):
        await store.increment("s", "b", 1)
    with pytest.raises(InvalidArgument, match="minimum"):
        await store.increment("s", "b", -11)
    assert (await store.get_variable("s", "b")).value == 10
    await store.set_variable("s", "t", "text")
    with pytest.raises(InvalidArgument, match="string"):
        await store.increment("s", "t")
    with pytest.raises(InvalidArgument, match="number"):
        await store.increment("s", "n", True)
    big = await store.set_variable("s", "big", 2**62)
    assert (await store.increment("s", "big", 5)).value == 2**62 + 5
    assert (await store.increment("s", "big", 2**62)).value == 2**63 + 5
    assert big.type == "integer"
    inf = await store.register_variable("s", "inf", "float", float("inf"))
    assert (await store.increment("s", "inf", 1)).value == inf.value


async def test_concurrent_increments_from_many_tasks_lose_nothing(store: SessionStore) -> None:
    await store.create_session("s")
    await store.register_variable("s", "n", "integer", 0)
    await store.increment("s", "f", 0.0)

    async def bump(times: int) -> None:
        for _ in range(times):
            await store.increment("s", "n")
            await store.increment("s", "f", 0.5)

    await asyncio.gather(*(bump(10) for _ in range(40)))
    n = await store.get_variable("s", "n")
    assert (n.value, n.version) == (400, 401)
    assert (await store.get_variable("s", "f")).value == 200.0


CHILD = r"""
import asyncio, sys
from snakepit.store import open_store

async def main(url, sid, times):
    store = open_store(url)
    try:
        for _ in range(times):
            await store.increment(sid, "n")
    finally:
        await store.close()

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


async def test_concurrent_increments_from_several_processes(backend: Backend) -> None:
    store = await backend.make()
    await store.create_session("s")
    await store.increment("s", "n", 0)
    url = await backend.share(store)
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", CHILD, url, "s", "60", stderr=asyncio.subprocess.PIPE
        )
        for _ in range(3)
    ]
    results = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 60)
    for proc, (_, err) in zip(procs, results, strict=True):
        assert proc.returncode == 0, err.decode()
    assert (await store.get_variable("s", "n")).value == 180


# Batches ------------------------------------------------------------------------------------
async def test_batch_writes_are_all_or_nothing(store: SessionStore) -> None:
    await store.create_session("s")
    await store.register_variable("s", "lr", "float", 0.1, constraints=C(max=1))
    await store.set_variable("s", "name", "a")
    written = await store.set_variables("s", {"lr": 0.2, "name": "b", "fresh": [1, 2]})
    assert {k: v.version for k, v in written.items()} == {"lr": 2, "name": 2, "fresh": 1}
    for bad in ({"lr": 0.3, "name": 5}, {"name": "c", "lr": 9.0}, {"other": 1, "lr": "x"}):
        with pytest.raises(InvalidArgument):
            await store.set_variables("s", bad)
    got = await store.get_variables("s", ["lr", "name", "fresh"])
    assert {k: (v.value, v.version) for k, v in got.items()} == {
        "lr": (0.2, 2),
        "name": ("b", 2),
        "fresh": ([1, 2], 1),
    }
    with pytest.raises(NotFound):
        await store.get_variable("s", "other")
    with pytest.raises(NotFound, match="missing"):
        await store.get_variables("s", ["lr", "missing"])
    assert sorted(v.name for v in await store.list_variables("s")) == ["fresh", "lr", "name"]
    assert await store.delete_variable("s", "fresh") is True
    assert await store.delete_variable("s", "fresh") is False
    with pytest.raises(NotFound):
        await store.get_variable("s", "fresh")


async def test_variables_disappear_with_their_session(store: SessionStore) -> None:
    await store.create_session("s")
    await store.set_variables("s", {f"v{i}": i for i in range(20)})
    assert (await store.get_session("s")).variable_count == 20
    await store.delete_session("s")
    with pytest.raises(NotFound):
        await store.get_variable("s", "v1")
    with pytest.raises(NotFound):
        await store.set_variable("s", "v1", 1)
    await store.create_session("s")
    assert await store.list_variables("s") == []
    with pytest.raises(NotFound):
        await store.get_variable("s", "v1")


# Watch --------------------------------------------------------------------------------------
async def test_watch_delivers_every_change_in_order(store: SessionStore) -> None:
    await store.create_session("s")
    await store.set_variable("s", "before", 0)
    feed = store.watch("s")
    await feed.ready()
    await store.set_variable("s", "a", 1)
    await store.increment("s", "a", 2)
    await store.set_variables("s", {"b": "x", "c": 2.5})
    await store.delete_variable("s", "b")

    async def writer(k: int) -> None:
        for i in range(15):
            await store.set_variable("s", "a", k * 100 + i)

    await asyncio.gather(*(writer(k) for k in range(3)))
    head = [await next_change(feed) for _ in range(5)]
    assert [(c.kind, c.name) for c in head[:2]] == [("set", "a"), ("set", "a")]
    # One atomic batch: its changes are adjacent (their order inside it is the store's).
    assert sorted((c.kind, c.name) for c in head[2:4]) == [("set", "b"), ("set", "c")]
    assert (head[4].kind, head[4].name) == ("deleted", "b")
    assert head[1].variable is not None and head[1].variable.value == 3
    rest = [await next_change(feed) for _ in range(45)]
    versions = [c.variable.version for c in rest if c.variable is not None]
    assert versions == list(range(3, 48))  # every write, in the order the store applied them
    last = await store.get_variable("s", "a")
    assert rest[-1].variable is not None and rest[-1].variable.value == last.value
    await feed.aclose()


async def test_watch_filters_names_and_ends_when_the_session_goes(backend: Backend) -> None:
    store = await backend.make(default_ttl=0.5)
    await store.create_session("s")
    feed = store.watch("s", ["b"])
    await feed.ready()
    await store.set_variable("s", "a", 1)
    await store.set_variable("s", "b", 2)
    change = await next_change(feed)
    assert (change.name, change.variable and change.variable.value) == ("b", 2)
    await store.delete_session("s")
    assert (await next_change(feed)).kind == "expired"
    with pytest.raises(StopAsyncIteration):
        await next_change(feed)
    # Expiry (no operation at all) ends a feed too.
    await store.create_session("e")
    expiring = store.watch("e")
    await expiring.ready()
    assert (await next_change(expiring, timeout=3)).kind == "expired"
    with pytest.raises(NotFound):
        await store.watch("nope").ready()


# Tensors ------------------------------------------------------------------------------------
def _specials(dtype: str) -> np.ndarray:
    values = [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-310 if dtype == "float64" else 1e-40, 3.5]
    return np.array(values, dtype=dtype)


TENSORS = {
    "float32-specials": _specials("float32").reshape(7, 1),
    "float64-specials": _specials("float64"),
    "float16": np.array([[np.nan, -0.0], [65504, 6e-8]], dtype=np.float16),
    "int64-extremes": np.array([np.iinfo(np.int64).min, np.iinfo(np.int64).max, 0]),
    "uint8-3d": np.arange(60, dtype=np.uint8).reshape(3, 4, 5),
    "bool": np.array([True, False, True]),
    "complex128": np.array([1 + 2j, complex(np.nan, -np.inf)]),
    "scalar": np.array(2.5),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "big-endian": np.arange(6, dtype=">f8").reshape(2, 3),
    "strided": np.arange(40, dtype=np.int32).reshape(4, 10)[:, ::3],
    "big": np.random.default_rng(7).standard_normal((2048, 1024)).astype(np.float32),
}


def _wire_bytes(array: np.ndarray) -> bytes:
    return np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()


@pytest.mark.parametrize("label", list(TENSORS))
async def test_tensors_round_trip_bit_exact(store: SessionStore, label: str) -> None:
    want = TENSORS[label]
    await store.create_session("s")
    written = await store.set_variable("s", "t", want)
    for got in (written.value, (await store.get_variable("s", "t")).value):
        assert isinstance(got, np.ndarray)
        assert got.dtype.name == want.dtype.name and got.shape == want.shape
        assert _wire_bytes(got) == _wire_bytes(want)
    many = await store.get_variables("s", ["t"])
    assert _wire_bytes(many["t"].value) == _wire_bytes(want)


async def test_embeddings_keep_their_type(store: SessionStore) -> None:
    await store.create_session("s")
    vec = np.array([0.25, np.nan, -np.inf], dtype=np.float32)
    await store.register_variable("s", "e", "embedding", vec, constraints=C(dimensions=3))
    got = await store.get_variable("s", "e")
    assert got.type == "embedding" and _wire_bytes(got.value) == _wire_bytes(vec)
    with pytest.raises(InvalidArgument, match="dimensions"):
        await store.set_variable("s", "e", np.zeros(4, dtype=np.float32))


async def test_stats(store: SessionStore) -> None:
    await store.create_session("a")
    await store.create_session("b")
    stats = await store.stats()
    assert stats.sessions == 2 and stats.max_sessions == 1000 and stats.default_ttl == 60
    assert stats.backend == store.backend
    await store.ping()


# Limits (docs/security.md) ------------------------------------------------------------------
async def test_variable_and_byte_limits_refuse_whole_writes(backend: Backend) -> None:
    limits = StoreLimits(max_variables=3, max_session_bytes=1000, max_value_bytes=600)
    store = await backend.make(limits=limits)
    await store.create_session("s")
    for name in ("a", "b", "c"):
        await store.set_variable("s", name, "")
    with pytest.raises(ResourceExhausted, match="4 variables, above the limit of 3"):
        await store.set_variable("s", "d", "")
    with pytest.raises(ResourceExhausted, match="variables"):
        await store.register_variable("s", "d", "integer", 1)
    with pytest.raises(ResourceExhausted, match="variables"):
        await store.increment("s", "d")
    with pytest.raises(ResourceExhausted, match="variables"):
        await store.set_variables("s", {"a": "x", "d": ""})
    assert {v.name: v.value for v in await store.list_variables("s")} == {"a": "", "b": "", "c": ""}
    with pytest.raises(ResourceExhausted, match="per value"):
        await store.set_variable("s", "a", "x" * 700)
    await store.set_variable("s", "a", "x" * 500)
    with pytest.raises(ResourceExhausted, match="bytes of values, above the limit of 1000"):
        await store.set_variable("s", "b", "y" * 500)
    with pytest.raises(ResourceExhausted, match="bytes of values"):
        await store.set_variables("s", {"b": "y" * 300, "c": "z" * 300})
    assert [(await store.get_variable("s", n)).value for n in "bc"] == ["", ""]
    await store.set_variable("s", "a", "x")  # shrinking frees room...
    await store.set_variable("s", "b", "y" * 500)  # ...that the next write may use
    await store.delete_variable("s", "b")  # and so does deleting
    await store.set_variables("s", {"b": "z" * 400, "c": "w" * 400})


async def test_parsed_values_have_a_lower_limit_than_copied_ones(backend: Backend) -> None:
    store = await backend.make(limits=StoreLimits(max_parsed_value_bytes=1000))
    await store.create_session("s")
    for big in ("x" * 2000, list(range(500)), {"k": "v" * 2000}):
        with pytest.raises(ResourceExhausted, match="bytes or a tensor"):
            await store.set_variable("s", "v", big)
    await store.set_variable("s", "b", b"x" * 5000)  # copied, not parsed: the larger limit
    await store.set_variable("s", "t", np.zeros(1000))
    assert {v.name for v in await store.list_variables("s")} == {"b", "t"}


async def test_out_of_range_ttls_and_large_metadata_are_refused_leaving_nothing(
    backend: Backend, request: pytest.FixtureRequest
) -> None:
    store = await backend.make(limits=StoreLimits(max_ttl=3600, max_metadata_bytes=1024))
    for ttl in (1e300, 1e12, 3601.0, float("nan")):
        with pytest.raises(InvalidArgument, match="TTL"):
            await store.create_session(ttl=ttl, metadata={"k": "v" * 1000})
    with pytest.raises(InvalidArgument, match="larger than 1024 bytes"):
        await store.create_session(metadata={"k": "v" * 2000})
    await store.create_session("s", ttl=3600)
    with pytest.raises(InvalidArgument, match="larger than 1024 bytes"):
        await store.register_variable("s", "x", "integer", 1, metadata={"k": "v" * 2000})
    assert [s.session_id for s in await store.list_sessions()] == ["s"]
    if backend.name.startswith("redis"):  # every key the store wrote expires (the review's leak)
        import redis.asyncio as aioredis

        client = aioredis.Redis.from_url(request.getfixturevalue("redis_server").url)
        prefix = request.getfixturevalue("redis_prefix")
        keys = [k async for k in client.scan_iter(f"{prefix}:{{*")]
        assert keys and all([await client.pttl(k) > 0 for k in keys])
        await client.aclose()


async def test_watchers_are_limited_per_session_and_in_total(backend: Backend) -> None:
    store = await backend.make(limits=StoreLimits(max_watchers_per_session=2, max_watchers=3))
    for sid in ("s", "t"):
        await store.create_session(sid)
    feeds = [store.watch("s"), store.watch("s")]
    for feed in feeds:
        await feed.ready()
    with pytest.raises(ResourceExhausted, match="watchers"):
        await store.watch("s").ready()
    feeds.append(store.watch("t"))
    await feeds[-1].ready()
    with pytest.raises(ResourceExhausted, match="watchers"):
        await store.watch("t").ready()
    await feeds[0].aclose()
    again = store.watch("t")
    await again.ready()  # a closed feed gives its slot back
    await store.set_variable("t", "x", 1)
    assert (await next_change(again)).name == "x"
    for feed in [*feeds, again]:
        await feed.aclose()
