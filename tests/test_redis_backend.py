"""The ``redis`` tier against real Valkey servers (a single node and a 3-node cluster):
the conformance suite, URLs and options, the key layout, TTLs, split values, ACLs,
Unix sockets, a full server, the pooled read path, and faults through the engine."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest
import redis
import torch
from servers._process import free_port
from servers.valkey import TLSProxy, ValkeyCluster, ValkeyServer

from kvtier.backends.redis import resp, transport
from kvtier.backends.redis.backend import RedisBackend
from kvtier.backends.redis.url import Target, parse_url
from kvtier.core import KVLayout, KVTier
from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    MissingExtraError,
)
from kvtier.core.factory import build_backend
from kvtier.core.plugins import PluginRegistry
from kvtier.core.testing import BackendConformance

T = TypeVar("T")
KiB, MiB = 1 << 10, 1 << 20


def key(i: int, ns: str = "test") -> str:
    return f"{ns}.{i:032x}"


def data(i: int, nbytes: int) -> bytes:
    return random.Random(i).randbytes(nbytes)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.1)


def make(url: str, pool: BufferPool | None = None, **options: Any) -> RedisBackend:
    backend = build_backend(url, options=options, pool=pool)
    assert isinstance(backend, RedisBackend)
    return backend


async def put(backend: RedisBackend, items: dict[str, bytes], mode=PutMode.OVERWRITE) -> list:
    bufs = [backend.pool.copy_of(v) for v in items.values()]
    try:
        return await backend.put_many(list(zip(items, bufs, strict=True)), mode)
    finally:
        for b in bufs:
            b.release()


async def get(backend: RedisBackend, keys: list[str]) -> list[bytes | None]:
    out = []
    for b in await backend.get_many(keys):
        out.append(None if b is None else bytes(b.view))
        if b is not None:
            b.release()
    return out


def raw(server: ValkeyServer, db: int = 0) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=server.port, db=db)


def session(url: str, body: Callable[[RedisBackend], Coroutine[Any, Any, T]], **options) -> T:
    """Open a backend on ``url``, run ``body`` with it, close it."""

    async def main() -> T:
        async with make(url, **options) as backend:
            return await body(backend)

    return asyncio.run(main())


# -- the conformance suite -------------------------------------------------------------


def stored_name(backend: Backend, key: str) -> str:
    """The server key under which ``backend`` stores chunk ``key``."""
    return f"{backend.options.key_prefix}{{{key}}}"


class RawRedis(BackendConformance):
    """Out-of-band reads and writes of what the backend stores, with a plain redis-py
    client: a chunk is one string value, or a split hash whose parts are joined."""

    def raw_client(self) -> Any:
        raise NotImplementedError

    def raw_write(self, backend: Backend, key: str, data: bytes) -> None:
        client = self.raw_client()
        try:
            client.set(stored_name(backend, key), data)
        finally:
            client.close()

    def raw_read(self, backend: Backend, key: str) -> bytes | None:
        name = stored_name(backend, key)
        client = self.raw_client()
        try:
            if client.type(name) != b"hash":
                return client.get(name)
            fields = client.hgetall(name)
        finally:
            client.close()
        return b"".join(fields[b"p%d" % i] for i in range(int(fields[b"n"])))


class TestRedisConformance(RawRedis):
    @pytest.fixture
    def backend_url(self, valkey_server: ValkeyServer) -> str:
        self.server = valkey_server
        return valkey_server.url

    def raw_client(self) -> Any:
        return raw(self.server)

    def stop_server(self, url: str) -> None:
        self.server.stop()  # the fixture restarts it for the next test


class TestRedisSplitConformance(TestRedisConformance):
    """Every blob over 64 KiB goes through the split (hash + RENAME) path."""

    options = {"max_value_bytes": 64 * KiB, "parallel": 2}


class TestRedisClusterConformance(RawRedis):
    @pytest.fixture
    def backend_url(self, valkey_cluster: ValkeyCluster) -> str:
        self.cluster = valkey_cluster
        return valkey_cluster.url

    def raw_client(self) -> Any:
        return redis.RedisCluster(host="127.0.0.1", port=self.cluster.nodes[0].port)

    def stop_server(self, url: str) -> None:
        self.cluster.stop()  # the fixture restarts it for the next test


@pytest.fixture
def unknown_redis_py(monkeypatch: pytest.MonkeyPatch) -> None:
    """A redis-py release the fast path does not know: batches must take the stock
    path, and never touch the fast one."""
    monkeypatch.setattr(redis, "__version__", "99.0.0")

    async def fast_path(*args: Any) -> None:
        raise AssertionError("the fast path ran with an unknown redis-py release")

    monkeypatch.setattr(transport, "exchange", fast_path)


@pytest.mark.usefixtures("unknown_redis_py")
class TestRedisStockConformance(TestRedisConformance):
    """The suite through redis-py's public pipeline API, split blobs included."""

    options = {"max_value_bytes": 64 * KiB}


@pytest.mark.usefixtures("unknown_redis_py")
class TestRedisClusterStockConformance(TestRedisClusterConformance):
    """The suite through redis-py's cluster pipeline."""


# -- URLs and options ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "want"),
    [
        ("redis://h", Target("redis", nodes=(("h", 6379),))),
        ("redis://h:7000/3", Target("redis", nodes=(("h", 7000),), db=3)),
        (
            "rediss://al%40ice:p%3Aw@h:1/0",
            Target("rediss", nodes=(("h", 1),), db=0, username="al@ice", password="p:w"),
        ),
        ("redis://:pw@[::1]:6380", Target("redis", nodes=(("::1", 6380),), password="pw")),
        ("unix:///run/valkey.sock", Target("unix", path="/run/valkey.sock")),
        ("unix://u:p@/run/v.sock", Target("unix", path="/run/v.sock", username="u", password="p")),
        (
            "redis+cluster://a:1,b:2",
            Target("redis+cluster", nodes=(("a", 1), ("b", 2))),
        ),
    ],
)
def test_urls_name_the_server(url: str, want: Target) -> None:
    assert parse_url(url) == want


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("redis://h:abc", "port 'abc' is not a number"),
        ("redis://h:0", "port '0' is not a number"),
        ("redis://h?db=2", "query"),
        ("redis://", "names no host"),
        ("redis://h/x", "not a database number"),
        ("redis://a:1,b:2", "use redis\\+cluster://"),
        ("unix://run/valkey.sock", "must be absolute"),
        ("redis+cluster://a", "needs a port"),
        ("redis+cluster://a:1/2", "only database 0"),
    ],
)
def test_bad_urls_say_what_is_wrong_and_the_form(url: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem) as err:
        make(url)
    assert "write it as" in str(err.value)


def test_urls_in_errors_hide_the_password() -> None:
    with pytest.raises(ConfigError) as err:
        make("redis://kv:hunter2@h:notaport")
    assert "hunter2" not in str(err.value) and "kv:***@" in str(err.value)


@pytest.mark.parametrize(
    ("url", "options", "problem"),
    [
        ("redis://h", {"key_prefix": "kv{x}:"}, "must not contain"),
        ("redis://h", {"parallel": 8, "max_connections": 4}, "raise max_connections"),
        ("redis://h", {"key_prefx": "kv:"}, "did you mean 'key_prefix'"),
        ("redis://h", {"ttl": 0}, "ttl"),
        ("redis://h", {"refresh_ttl": True}, "refresh_ttl needs a ttl"),
        ("redis://h", {"ssl_ca_certs": "/ca.pem"}, "write rediss://"),
        ("redis://:pw@h", {"password": "pw2"}, "password once"),
        ("redis://u@h", {"username": "v"}, "username once"),
        ("redis://h/1", {"db": 2}, "URL says db 1, options say db 2"),
        ("redis+cluster://h:1", {"db": 2}, "only database 0"),
        ("unix:///s.sock", {"tls": True}, "Unix socket"),
    ],
)
def test_bad_options_say_what_is_wrong(url: str, options: dict, problem: str) -> None:
    with pytest.raises(ConfigError, match=problem):
        make(url, **options)


def test_without_redis_the_plugin_registers_and_names_the_extra(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)  # import redis fails
    monkeypatch.delitem(sys.modules, "kvtier.backends.redis")
    monkeypatch.delitem(sys.modules, "kvtier.backends.redis.backend")
    monkeypatch.delitem(sys.modules, "kvtier.backends.redis.url")
    registry = PluginRegistry(entry_points=False)  # imports the plugin module again
    assert registry.backend_for_url("redis+cluster://h:1").name == "redis"
    with pytest.raises(ConfigError, match="port 'x' is not a number"):
        build_backend("redis://127.0.0.1:x", registry=registry)  # checked without redis-py
    with pytest.raises(MissingExtraError, match=r"pip install 'kvtier\[redis\]'"):
        build_backend("redis://127.0.0.1:6379", registry=registry)


# -- layout, TTL, databases ------------------------------------------------------------


def test_one_value_per_chunk_under_the_prefix(valkey_server: ValkeyServer) -> None:
    value = data(1, 300 * KiB)

    async def body(backend: RedisBackend) -> None:
        assert await put(backend, {key(1): value}) == [True]

    session(valkey_server.url, body, key_prefix="kv:test:")
    with raw(valkey_server) as client:
        assert client.keys("*") == [f"kv:test:{{{key(1)}}}".encode()]
        assert client.type(f"kv:test:{{{key(1)}}}") == b"string"
        assert client.get(f"kv:test:{{{key(1)}}}") == value
        assert client.ttl(f"kv:test:{{{key(1)}}}") == -1, "no ttl configured: no expiry"


def test_database_from_the_url(valkey_server: ValkeyServer) -> None:
    session(f"{valkey_server.url[:-2]}/3", lambda b: put(b, {key(1): b"x"}))
    with raw(valkey_server, db=3) as db3, raw(valkey_server) as db0:
        assert db3.dbsize() == 1 and db0.dbsize() == 0


def test_ttl_is_set_on_write_and_refreshed_on_hit_if_asked(valkey_server: ValkeyServer) -> None:
    small, big = key(1), key(2)
    names = [f"kvtier:{{{k}}}" for k in (small, big)]

    def write_then_read(refresh: bool) -> list[int]:
        async def body(backend: RedisBackend) -> list[int]:
            assert await put(backend, {small: b"s" * 100, big: data(2, 200 * KiB)}) == [True] * 2
            with raw(valkey_server) as client:
                ttls = [client.pttl(name) for name in names]
                assert all(50_000 < t <= 60_000 for t in ttls), ttls
                for name in names:
                    client.pexpire(name, 5_000)
            assert await get(backend, [small, big]) == [b"s" * 100, data(2, 200 * KiB)]
            with raw(valkey_server) as client:
                return [client.pttl(name) for name in names]

        # 64 KiB parts: the big value is a split hash, whose TTL works the same
        return session(
            valkey_server.url, body, ttl=60, refresh_ttl=refresh, max_value_bytes=64 * KiB
        )

    assert all(t <= 5_000 for t in write_then_read(refresh=False))
    assert all(t > 50_000 for t in write_then_read(refresh=True))


# -- split values ----------------------------------------------------------------------


def test_large_values_are_split_into_one_hash(valkey_server: ValkeyServer) -> None:
    value, newer = data(1, MiB + 3), data(2, 700 * KiB)
    name = f"kvtier:{{{key(1)}}}"

    async def body(backend: RedisBackend) -> None:
        assert await put(backend, {key(1): value}) == [True]
        with raw(valkey_server) as client:
            assert client.keys("*") == [name.encode()], "one key, no temp key left"
            assert client.type(name) == b"hash" and client.hlen(name) == 16 + 1 + 2
        assert await get(backend, [key(1)]) == [value]
        assert await put(backend, {key(1): newer}, PutMode.CREATE) == [False]
        assert await put(backend, {key(1): newer}) == [True]
        assert await get(backend, [key(1)]) == [newer]
        assert [k async for k in backend.iter_keys()] == [key(1)]
        stats = await backend.stats()
        assert (stats.keys, stats.bytes_used) == (1, len(newer))
        assert stats.details["split_writes"] == 2
        assert await put(backend, {key(1): b"small"}) == [True]
        with raw(valkey_server) as client:
            assert client.type(name) == b"string", "a small overwrite replaces the hash"
        assert await backend.delete_many([key(1)]) == [True]

    session(valkey_server.url, body, max_value_bytes=64 * KiB)


def test_a_split_value_with_a_missing_part_is_a_miss(valkey_server: ValkeyServer) -> None:
    async def body(backend: RedisBackend) -> None:
        assert await put(backend, {key(1): data(1, 300 * KiB), key(2): data(2, 300 * KiB)})
        with raw(valkey_server) as client:
            client.hdel(f"kvtier:{{{key(1)}}}", "p2")
            client.hset(f"kvtier:{{{key(2)}}}", "p0", b"short")
        assert await get(backend, [key(1), key(2)]) == [None, None]

    session(valkey_server.url, body, max_value_bytes=64 * KiB)


@pytest.mark.parametrize("release", ["installed", "unknown"])
def test_ranged_reads_are_getrange_in_one_pipeline(
    request: pytest.FixtureRequest,
    valkey_server: ValkeyServer,
    monkeypatch: pytest.MonkeyPatch,
    release: str,
) -> None:
    """String values are read with GETRANGE (one pipeline, only the ranges); a split
    value takes a second trip and is read whole; a malformed value is a miss, removed;
    with ``refresh_ttl`` a ranged read refreshes the TTL as a get does."""
    if release == "unknown":
        request.getfixturevalue("unknown_redis_py")
    sent: list[list[str]] = []
    run_slice = transport.Transport._slice

    async def recorded(self: Any, node: Any, jobs: list) -> Any:
        sent.append(sorted({command[0] for _, commands in jobs for command in commands}))
        return await run_slice(self, node, jobs)

    small, large = data(1, 20 * KiB), data(2, 300 * KiB)
    names = [f"kvtier:{{{key(i)}}}" for i in range(4)]

    async def body(backend: RedisBackend) -> None:
        assert await put(backend, {key(1): small, key(2): large}) == [True, True]
        with raw(valkey_server) as client:
            client.rpush(names[3], b"not a chunk")
            client.pexpire(names[1], 5_000)
        outs = [memoryview(bytearray(n)) for n in (100, 1000, 100, 5, 10)]
        offsets = [(key(1), 7), (key(2), 100 * KiB), (key(1), 20 * KiB - 50), (key(3), 0)]
        reads = [(k, offset, out) for (k, offset), out in zip(offsets, outs, strict=False)]
        reads.append((key(4), 0, outs[4]))  # never stored
        with monkeypatch.context() as patch:
            patch.setattr(transport.Transport, "_slice", recorded)
            got = await backend.read_into_many(reads)
        assert got == [100, 1000, 50, None, None]
        assert outs[0] == small[7:107] and outs[1] == large[100 * KiB : 100 * KiB + 1000]
        assert outs[2][:50] == small[-50:]
        assert sent == [["EXISTS", "GETRANGE", "PEXPIRE"], ["HGETALL", "PEXPIRE"], ["EVAL"]]
        assert (await backend.stats()).details["malformed_removed"] == 1
        with raw(valkey_server) as client:
            assert client.pttl(names[1]) > 50_000, "the ranged read refreshed the TTL"
            assert not client.exists(names[3]), "the malformed value was not removed"

    session(valkey_server.url, body, max_value_bytes=64 * KiB, parallel=1, ttl=60, refresh_ttl=True)


def test_split_size_comes_from_the_server(valkey_factory) -> None:
    server = valkey_factory("--proto-max-bulk-len", "1mb")
    with raw(server) as client, pytest.raises(redis.ResponseError):
        client.set("too-big", b"x" * (3 * MiB))  # what an unsplit write would meet
    value = data(1, 3 * MiB)

    async def body(backend: RedisBackend) -> None:
        assert (await backend.stats()).details["max_value_bytes"] == MiB
        assert await put(backend, {key(1): value}) == [True]
        assert await get(backend, [key(1)]) == [value]

    session(server.url, body)


def test_readers_never_see_a_mix_of_two_split_values(valkey_server: ValkeyServer) -> None:
    versions = [data(v, 512 * KiB + v) for v in range(4)]

    async def body(backend: RedisBackend) -> None:
        async def write(v: int) -> None:
            for _ in range(4):
                assert await put(backend, {key(1): versions[v]}) == [True]

        async def read() -> None:
            for _ in range(12):
                [got] = await get(backend, [key(1)])
                assert got is None or got in versions, "a read mixed two versions"

        await asyncio.gather(*(write(v) for v in range(4)), *(read() for _ in range(3)))
        assert (await get(backend, [key(1)]))[0] in versions

    session(valkey_server.url, body, max_value_bytes=64 * KiB)


# -- listing ---------------------------------------------------------------------------


def test_listing_escapes_glob_characters_and_skips_foreign_keys(
    valkey_server: ValkeyServer,
) -> None:
    async def body(star: RedisBackend) -> None:
        async with make(valkey_server.url, key_prefix="ab:") as other:
            assert await put(other, {key(2): b"other"}) == [True]
        assert await put(star, {key(1): b"mine"}) == [True]
        with raw(valkey_server) as client:
            client.set("a*:{not-a-key}", b"foreign")
            client.set(f"a*:{{{key(3)}}}:tmp:0123", b"a temp key")
        assert [k async for k in star.iter_keys()] == [key(1)]
        assert [k async for k in star.iter_keys("test.0")] == [key(1)]
        assert [k async for k in star.iter_keys("test.1")] == []
        assert (await star.stats()).keys == 1

    session(valkey_server.url, body, key_prefix="a*:")


# -- connections: ACL, Unix socket, modes ----------------------------------------------


ACL_ARGS = ("--requirepass", "defaultpw", "--user", "kv", "on", ">s3cret", "~kvtier:*", "+@all")


def test_acl_user_and_password(valkey_factory) -> None:
    server = valkey_factory(*ACL_ARGS)
    base = f"127.0.0.1:{server.port}"
    for url, options in [
        (f"redis://kv:s3cret@{base}", {}),
        (f"redis://{base}", {"username": "kv", "password": "s3cret"}),
    ]:
        assert session(url, lambda b: put(b, {key(1): b"v"}), **options) == [True]
    for url, options in [
        (f"redis://kv:wrong@{base}", {}),
        (f"redis://{base}", {}),
    ]:
        with pytest.raises(ConfigError, match="credentials"):
            session(url, lambda b: put(b, {key(1): b"v"}), **options)


def test_acl_denials_are_backend_errors_and_config_denial_is_tolerated(valkey_factory) -> None:
    server = valkey_factory(*ACL_ARGS[:-1], "+@all", "-config")
    url = f"redis://kv:s3cret@127.0.0.1:{server.port}"

    async def body(backend: RedisBackend) -> None:
        assert (await backend.stats()).details["max_value_bytes"] == 512 * MiB
        with pytest.raises(BackendError, match="ACL"):
            await put(backend, {key(1): b"v"})

    session(url, body, key_prefix="other:")


def test_connections_are_pooled_and_bounded(valkey_server: ValkeyServer) -> None:
    values = {key(i): data(i, 100 * KiB) for i in range(16)}

    async def body(backend: RedisBackend) -> None:
        writes = [put(backend, {k: v}) for k, v in values.items()]
        reads = [backend.contains_many(list(values)) for _ in range(8)]
        await asyncio.gather(*writes, *reads)
        assert await get(backend, list(values)) == list(values.values())
        with raw(valkey_server) as client:
            ours = [c for c in client.client_list() if c["name"] == "kvtier"]
        assert 1 <= len(ours) <= 2, f"{len(ours)} connections with max_connections=2"

    session(valkey_server.url, body, max_connections=2, parallel=2)


def test_unix_socket(valkey_factory, tmp_path) -> None:
    sock = tmp_path / "v.sock"
    valkey_factory("--unixsocket", str(sock), "--unixsocketperm", "700")
    value = data(1, 200 * KiB)

    async def body(backend: RedisBackend) -> list:
        assert await put(backend, {key(1): value}) == [True]
        return await get(backend, [key(1)])

    assert session(f"unix://{sock}", body) == [value]


def test_tls_verifies_the_server_with_the_given_ca(valkey_tls: TLSProxy) -> None:
    value = data(1, 3 * MiB)

    async def body(backend: RedisBackend) -> list:
        assert await put(backend, {key(1): value}) == [True]
        return await get(backend, [key(1)])

    assert session(valkey_tls.url, body, ssl_ca_certs=str(valkey_tls.ca_file)) == [value]
    with pytest.raises(BackendUnavailableError, match="certificate verify failed"):
        session(valkey_tls.url, body)  # the system CAs do not know the test CA


def test_scheme_must_match_the_server_mode(valkey_server, valkey_cluster) -> None:
    node = valkey_cluster.nodes[0]
    with pytest.raises(ConfigError, match=r"cluster node: write the tier URL as redis\+cluster"):
        session(f"redis://127.0.0.1:{node.port}", lambda b: b.stats())
    with pytest.raises(ConfigError, match="not a cluster"):
        session(f"redis+cluster://127.0.0.1:{valkey_server.port}", lambda b: b.stats())


def test_unreachable_server_is_unavailable_at_open() -> None:
    with pytest.raises(BackendUnavailableError, match="unavailable"):
        session(f"redis://127.0.0.1:{free_port()}", lambda b: b.stats())


# -- a full server ---------------------------------------------------------------------


def test_full_server_rejects_writes_and_keeps_serving(valkey_factory) -> None:
    # 4 MiB: the server counts each connection's query buffer (up to a value's size,
    # kept a while after a large write) against maxmemory, so "room again" needs slack.
    server = valkey_factory("--maxmemory", "4mb", "--maxmemory-policy", "noeviction")
    values = {key(i): data(i, 256 * KiB) for i in range(24)}

    async def body(backend: RedisBackend) -> None:
        stored = []
        for k, v in values.items():
            stored += await put(backend, {k: v})
        assert False in stored, "4 MiB of maxmemory took 6 MiB of writes"
        assert True in stored
        assert (await backend.stats()).details["rejected_oom"] == stored.count(False)
        kept = [k for k, ok in zip(values, stored, strict=True) if ok]
        assert await get(backend, kept) == [values[k] for k in kept]
        # The split path is refused the same way and leaves no temp key behind.
        assert await put(backend, {key(99): data(99, 512 * KiB)}) == [False]
        assert await backend.delete_many(kept) == [True] * len(kept)
        assert await put(backend, {key(0): values[key(0)]}) == [True], "room again"
        with raw(server) as client:
            assert not [n for n in client.keys("*") if b":tmp:" in n]

    session(server.url, body, max_value_bytes=384 * KiB)


# -- the data path ---------------------------------------------------------------------


@pytest.mark.parametrize("server", ["valkey_server", "valkey_cluster"])
def test_reads_land_in_buffers_of_the_tier_pool(request: pytest.FixtureRequest, server) -> None:
    url = request.getfixturevalue(server).url
    pool = BufferPool()
    value = data(1, 3 * MiB)

    async def main() -> None:
        async with make(url, pool=pool) as backend:
            assert await put(backend, {key(1): value}) == [True]
            [blob] = await backend.get_many([key(1)])
            assert blob is not None and bytes(blob.view) == value
            blob.release()
            reuses = pool.reuses
            [again] = await backend.get_many([key(1)])
            assert again is not None and bytes(again.view) == value
            assert pool.reuses == reuses + 1, "the value was not read into a pool buffer"
            again.release()

    asyncio.run(main())


def test_cancelled_large_reads_leave_the_connections_usable(valkey_server: ValkeyServer) -> None:
    values = {key(i): data(i, 4 * MiB + i) for i in range(4)}

    async def body(backend: RedisBackend) -> None:
        assert await put(backend, values) == [True] * 4
        for steps in (1, 2, 5, 20, 80):
            task = asyncio.create_task(backend.get_many(list(values)))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                for blob in await task:
                    blob.release()
            assert await get(backend, list(values)) == list(values.values())

    session(valkey_server.url, body, parallel=2)


def test_cancelled_large_writes_never_complete_with_reused_memory(
    valkey_server: ValkeyServer,
) -> None:
    """A write cancelled mid-value leaves the key absent or whole even when the
    caller's buffer is overwritten right after the cancellation."""
    size = 8 * MiB

    async def body(backend: RedisBackend) -> None:
        for steps in (1, 3, 10, 40):
            buf = backend.pool.copy_of(data(steps, size))
            want = bytes(buf.view)
            task = asyncio.create_task(backend.put_many([(key(steps), buf)]))
            for _ in range(steps):
                await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            buf.view[:] = b"\xa5" * size  # the pool hands the memory to someone else
            buf.release()
            await asyncio.sleep(0.05)
            [got] = await get(backend, [key(steps)])
            assert got is None or got == want, f"cancelled at step {steps}: mixed bytes"
        assert await put(backend, {key(0): b"after"}) == [True]

    session(valkey_server.url, body)


def test_the_fast_path_is_used_only_with_known_redis_py_releases() -> None:
    for release in ("7.4.1", "8.1.0", "8.2.0", "8.2.13"):
        assert transport.fast_path_works(release), release
    for release in ("5.0.1", "7.3.0", "8.0.1", "8.3.0", "9.0.0", "99.0.0"):
        assert not transport.fast_path_works(release), release


@pytest.mark.parametrize("release", ["installed", "unknown"])
def test_each_redis_py_release_takes_its_data_path(
    request: pytest.FixtureRequest, valkey_server: ValkeyServer, release: str
) -> None:
    if release == "unknown":
        request.getfixturevalue("unknown_redis_py")
    values = {key(i): data(i, n) for i, n in enumerate([0, 10, 64 * KiB, 3 * MiB + 1])}

    async def body(backend: RedisBackend) -> str:
        assert await put(backend, values) == [True] * 4
        assert await put(backend, values, PutMode.CREATE) == [False] * 4
        assert await get(backend, [*values, key(9)]) == [*values.values(), None]
        assert await backend.delete_many(list(values)) == [True] * 4
        return str((await backend.stats()).details["data_path"])

    fast = release == "installed" and transport.fast_path_works()
    assert session(valkey_server.url, body, max_value_bytes=MiB) == (
        "direct" if fast else "redis-py"
    )


@pytest.mark.parametrize("release", ["installed", "unknown"])
def test_create_is_one_round_trip_per_batch_split_values_included(
    request: pytest.FixtureRequest,
    valkey_server: ValkeyServer,
    monkeypatch: pytest.MonkeyPatch,
    release: str,
) -> None:
    if release == "unknown":
        request.getfixturevalue("unknown_redis_py")
    pipelines = []
    run_slice = transport.Transport._slice

    async def counted(self: Any, node: Any, jobs: list) -> Any:
        pipelines.append(len(jobs))
        return await run_slice(self, node, jobs)

    monkeypatch.setattr(transport.Transport, "_slice", counted)
    first = {key(1): data(1, 100), key(2): data(2, 300 * KiB), key(3): data(3, 5)}
    second = {key(2): data(4, 200 * KiB), key(4): data(5, 150 * KiB), key(5): b"new"}

    async def body(backend: RedisBackend) -> None:
        assert await put(backend, first, PutMode.CREATE) == [True] * 3
        assert pipelines == [3], "the parts and the publish script went in one pipeline"
        assert await put(backend, second, PutMode.CREATE) == [False, True, True]
        assert pipelines == [3, 3]
        assert await get(backend, [*first, key(4)]) == [*first.values(), second[key(4)]]
        stats = await backend.stats()
        assert stats.details["split_writes"] == 2

    session(valkey_server.url, body, max_value_bytes=64 * KiB, parallel=1)
    with raw(valkey_server) as client:
        assert not [n for n in client.keys("*") if b":tmp:" in n], "a refused split left parts"


@pytest.mark.parametrize("release", ["installed", "unknown"])
def test_a_stalled_server_fails_after_the_socket_timeout(
    request: pytest.FixtureRequest, valkey_factory, release: str
) -> None:
    if release == "unknown":
        request.getfixturevalue("unknown_redis_py")
    server = valkey_factory()
    value = data(1, MiB)

    async def body(backend: RedisBackend) -> None:
        assert await put(backend, {key(1): value}) == [True]
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            start = time.perf_counter()
            with pytest.raises(BackendUnavailableError, match="unavailable"):
                await backend.get_many([key(1)])
            assert 0.4 < time.perf_counter() - start < 5
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        assert await get(backend, [key(1)]) == [value], "a fresh connection serves again"

    session(server.url, body, socket_timeout=0.5)


def test_a_server_that_went_away_is_noticed_at_once(valkey_factory) -> None:
    """A pooled connection whose server closed it fails fast (then the next one is
    tried), never waiting out the socket timeout."""
    server = valkey_factory()

    async def body(backend: RedisBackend) -> None:
        assert await put(backend, {key(1): b"v"}) == [True]
        server.stop()
        for settle in (0, 0.1):
            await asyncio.sleep(settle)  # the event loop may or may not have seen the EOF
            start = time.perf_counter()
            with pytest.raises(BackendUnavailableError, match="unavailable"):
                await backend.get_many([key(1)])
            assert time.perf_counter() - start < 2

    session(server.url, body, socket_timeout=10)


# -- RESP on the fast path -------------------------------------------------------------


def feed(parser: resp.ReplyParser, stream: bytes, piece: int) -> None:
    """Deliver ``stream`` to ``parser`` at most ``piece`` bytes at a time, as a socket
    might; it must be complete exactly at the end."""
    done = 0
    while done < len(stream):
        into = parser.buffer()
        count = min(into.nbytes, piece, len(stream) - done)
        assert count > 0, "the parser offered no room"
        into[:count] = stream[done : done + count]
        done += count
        assert parser.received(count) == (done == len(stream)), f"at byte {done}"


@pytest.mark.parametrize("piece", [1, 3, 4096, 100_000, 1 << 30])
def test_replies_parse_whatever_pieces_the_socket_delivers(piece: int) -> None:
    pool = BufferPool()
    padded = data(1, resp.POOLED_MIN + 5)  # its CRLF fits in its pool block
    exact = data(2, 2 * resp.POOLED_MIN)  # fills its block: the CRLF comes separately
    stream = b"".join(
        [
            b"+OK\r\n:-42\r\n$-1\r\n$3\r\nabc\r\n$0\r\n\r\n",
            b"-OOM command not allowed\r\n-WRONGTYPE Operation against a key\r\n",
            b"*-1\r\n*0\r\n*2\r\n*2\r\n$1\r\nn\r\n:3\r\n",
            b"$%d\r\n%s\r\n" % (len(padded), padded),
            b"$%d\r\n%s\r\n" % (len(exact), exact),
        ]
    )
    parser = resp.ReplyParser(pool)
    for _ in range(2):  # a parser serves one pipeline after another
        parser.start(11)
        feed(parser, stream, piece)
        got = parser.take()
        assert got[:5] == [b"OK", -42, None, b"abc", b""]
        assert isinstance(got[5], redis.exceptions.OutOfMemoryError)
        assert isinstance(got[6], redis.ResponseError) and str(got[6]).startswith("WRONGTYPE")
        assert got[7:9] == [None, []]
        nested, big = got[9], got[10]
        assert nested[0] == [b"n", 3] and isinstance(nested[1], Buffer)
        assert bytes(nested[1].view) == padded and bytes(big.view) == exact
        nested[1].release()
        big.release()
    assert pool.allocations == 2 and pool.reuses == 2, "pooled replies came from the pool"


@pytest.mark.parametrize(
    ("stream", "problem"),
    [
        (b"+OK\r\n+OK\r\n", "more replies than commands"),
        (b"?what\r\n", "unknown reply type"),
        (b"$3\r\nabcXY", "does not end with CRLF"),
        (b"$%d\r\n%sXY" % (resp.POOLED_MIN, b"x" * resp.POOLED_MIN), "does not end with CRLF"),
    ],
)
def test_bytes_that_are_not_resp_are_refused(stream: bytes, problem: str) -> None:
    parser = resp.ReplyParser(BufferPool())
    parser.start(1)
    with pytest.raises(redis.exceptions.InvalidResponse, match=problem):
        feed(parser, stream, 1 << 30)


def test_an_abandoned_pipeline_returns_its_buffers() -> None:
    pool = BufferPool()
    parser = resp.ReplyParser(pool)
    parser.start(2)
    whole = b"$%d\r\n%s\r\n" % (resp.POOLED_MIN, b"a" * resp.POOLED_MIN)
    half = b"*2\r\n" + whole + b"$%d\r\n" % (2 * resp.POOLED_MIN) + b"b" * 1000
    into = parser.buffer()
    into[: len(half)] = half
    assert not parser.received(len(half))
    parser.abandon()
    assert pool.idle_bytes == 3 * resp.POOLED_MIN, "both leases went back to the pool"


def test_errors_are_redis_py_exceptions_and_values_are_sent_in_place() -> None:
    moved = resp.error_reply("MOVED 3999 127.0.0.1:6381")
    assert isinstance(moved, redis.exceptions.MovedError) and moved.slot_id == 3999
    assert type(resp.error_reply("ERR unknown command")) is redis.ResponseError
    value = memoryview(data(1, resp.INLINE_MAX))
    pieces = resp.pack([("SET", "k", value, "PX", 5), ("GET", b"k")])
    assert pieces[1] is value, "a large value is sent from the caller's memory"
    assert b"".join(pieces) == (
        b"*5\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n%s\r\n$2\r\nPX\r\n$1\r\n5\r\n"
        b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n" % (value.nbytes, value)
    )


# -- the cluster -----------------------------------------------------------------------


def test_cluster_spreads_keys_over_every_node(valkey_cluster: ValkeyCluster) -> None:
    values = {key(i): data(i, 100 * KiB) for i in range(30)}

    async def body(backend: RedisBackend) -> None:
        assert await put(backend, values) == [True] * 30
        assert sorted([k async for k in backend.iter_keys()]) == sorted(values)
        assert (await backend.stats()).keys == 30
        assert await get(backend, list(values)) == list(values.values())

    session(valkey_cluster.url, body, max_value_bytes=64 * KiB)
    for node in valkey_cluster.nodes:
        with raw(node) as client:
            assert client.dbsize() > 0, f"node {node.port} holds no chunk"


def test_a_stale_slot_table_is_corrected_by_the_cluster(valkey_cluster: ValkeyCluster) -> None:
    """A command the fast path sends to the wrong node (MOVED) runs again through
    redis-py's cluster pipeline, which also corrects the slot table."""
    value = data(1, 300 * KiB)

    async def body(backend: RedisBackend) -> None:
        client: Any = backend._transport.client  # type: ignore[union-attr]
        slot = client.keyslot(stored_name(backend, key(1)))
        right = client.nodes_manager.slots_cache[slot][0]
        wrong = next(n for n in client.get_primaries() if n.name != right.name)
        client.nodes_manager.slots_cache[slot] = [wrong]
        assert await put(backend, {key(1): value}) == [True]
        client.nodes_manager.slots_cache[slot] = [wrong]
        assert await get(backend, [key(1)]) == [value]
        assert client.nodes_manager.slots_cache[slot][0].name == right.name

    session(valkey_cluster.url, body)


# -- faults through the engine ---------------------------------------------------------


LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16


def prompt(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n,), generator=gen)
    return tokens, torch.randn(LAYOUT.chunk_shape(n), generator=gen).to(LAYOUT.dtype)


def open_kv(url: str, **tier: Any) -> KVTier:
    config = {
        "chunk_tokens": CHUNK,
        "retry_after": 0.2,
        "tiers": [{"url": url, "timeout": 1.0, **tier}],
    }
    return KVTier.open(config, model="test-model", layout=LAYOUT)


def test_stopped_server_is_skipped_and_used_again_when_back(valkey_factory) -> None:
    server = valkey_factory()
    tokens, kv = prompt(4 * CHUNK)
    with open_kv(server.url) as cache:
        cache.store(tokens, kv)
        cache.flush()
        assert cache.retrieve(tokens)[0] == 4 * CHUNK
        server.stop()
        later, kv2 = prompt(3 * CHUNK, seed=1)
        cache.store(later, kv2)
        cache.flush()
        assert cache.lookup(tokens) == 0
        assert cache.retrieve(tokens)[0] == 0
        stats = cache.stats().tier("redis")
        assert stats.errors >= 1 and not stats.available
        server.start()  # same port, empty (no persistence)

        def stored_again() -> bool:
            cache.store(later, kv2)
            cache.flush()
            return cache.lookup(later) == 3 * CHUNK

        wait_until(stored_again, "a store into the restarted server")
        n, got = cache.retrieve(later)
        assert n == 3 * CHUNK and torch.equal(got, kv2)
        assert cache.stats().tier("redis").available


def test_a_stalled_server_is_bounded_by_the_tier_timeout(valkey_factory) -> None:
    server = valkey_factory()
    tokens, kv = prompt(2 * CHUNK)
    with open_kv(server.url, timeout=0.5) as cache:
        cache.store(tokens, kv)
        cache.flush()
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            start = time.perf_counter()
            assert cache.lookup(tokens) == 0
            assert cache.retrieve(tokens)[0] == 0
            cache.store(*prompt(CHUNK, seed=2))
            cache.flush()
            assert time.perf_counter() - start < 5, "the tier timeout did not bound the stall"
            assert cache.stats().tier("redis").errors >= 1
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        wait_until(lambda: cache.lookup(tokens) == 2 * CHUNK, "the tier serving again")
        n, got = cache.retrieve(tokens)
        assert n == 2 * CHUNK and torch.equal(got, kv)
