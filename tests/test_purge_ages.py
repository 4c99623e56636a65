"""``purge --older-than`` on the cpu, nixl, redis (Valkey), vineyard and mooncake tiers,
against the real servers: each removes exactly the chunks written at least that long
ago, by the store's own notion of age, and a store that cannot tell refuses and says
why (file and s3: tests/test_ops_purge.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
from test_cli import run

from kvtier.core.buffers import BufferPool
from kvtier.core.errors import ConfigError
from kvtier.core.factory import build_backend
from kvtier.core.migrate import ChunkFilter
from kvtier.core.purge import purge

POOL = BufferPool()
EVERYTHING_OLD = ChunkFilter(models=("m",))
"""A selection of every chunk the tests write (their namespace is ``m-...``)."""


def key(n: int) -> str:
    return f"m-0123456789abcdef.{n:032x}"


async def put(backend: Any, numbers: list[int]) -> None:
    items = []
    for n in numbers:
        buf = POOL.acquire(64)
        buf.view[:] = bytes([n]) * 64
        items.append((key(n), buf))
    assert await backend.put_many(items) == [True] * len(items)
    for _, buf in items:
        buf.release()


async def listed(backend: Any) -> list[str]:
    return sorted([k async for k in backend.iter_keys()])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(params=["cpu", "nixl"])
def ram_tier(request) -> tuple[str, dict[str, Any]]:
    if request.param == "cpu":
        return "cpu://", {}
    valkey = request.getfixturevalue("valkey_server")
    return f"nixl://age-{uuid.uuid4().hex[:8]}", {"index": valkey.url}


def test_ram_tiers_purge_by_their_write_times(ram_tier) -> None:
    url, options = ram_tier

    async def body() -> None:
        async with build_backend(url, capacity=1 << 20, options=options) as backend:
            clock = Clock()
            backend.store._clock = clock
            await put(backend, [1, 2, 3])
            clock.now += 100.0
            await put(backend, [4])
            assert await backend.ages([key(1), key(4), key(9)]) == [100.0, 0.0, None]
            dry = await purge(backend, EVERYTHING_OLD, older_than=50.0, dry_run=True)
            assert dry.matched == 3 and dry.deleted == 0
            report = await purge(backend, EVERYTHING_OLD, older_than=50.0)
            assert report.deleted == 3
            assert await listed(backend) == [key(4)]

    asyncio.run(body())


def test_a_pinned_chunk_is_never_purged_by_age() -> None:
    async def body() -> None:
        options = {"pinned_bytes": 1 << 10}
        async with build_backend("cpu://", capacity=1 << 20, options=options) as backend:
            clock = Clock()
            backend.store._clock = clock
            await put(backend, [1, 2])
            assert await backend.pin_many([key(1)]) == [True]
            clock.now += 100.0
            assert (await purge(backend, EVERYTHING_OLD, older_than=50.0)).deleted == 1
            assert await listed(backend) == [key(1)]
            # a purge by model is an invalidation: pins do not stop it
            assert (await purge(backend, EVERYTHING_OLD)).deleted == 1

    asyncio.run(body())


def test_redis_reads_ages_from_the_ttl(monkeypatch, capsys, valkey_server) -> None:
    import redis

    url = valkey_server.url
    raw = redis.Redis(host="127.0.0.1", port=valkey_server.port)

    async def body() -> None:
        async with build_backend(url, options={"ttl": 3600}) as backend:
            await put(backend, [1, 2, 3])
            raw.pexpire(f"kvtier:{{{key(1)}}}", 3_500_000)  # written 100 s ago
            raw.pexpire(f"kvtier:{{{key(2)}}}", 3_000_000)  # 600 s ago
            raw.persist(f"kvtier:{{{key(3)}}}")  # no expiry: no age
            ages = await backend.ages([key(1), key(2), key(3), key(9)])
            assert ages[0] == pytest.approx(100, abs=2)
            assert ages[1] == pytest.approx(600, abs=2)
            assert ages[2:] == [None, None]
            assert (await purge(backend, EVERYTHING_OLD, older_than=300)).deleted == 1
            nothing = ChunkFilter(models=("other",))  # no chunk: still answered, nothing done
            assert (await purge(backend, nothing, older_than=300)).matched == 0
            assert await listed(backend) == [key(1), key(3)]

    asyncio.run(body())
    # the CLI, given the writers' ttl
    raw.pexpire(f"kvtier:{{{key(1)}}}", 3_000_000)
    code, out, err = run(monkeypatch, capsys, "purge", url, "--older-than", "5m", "-ottl=3600")
    assert code == 0, err
    assert "deleted 1 chunks" in out
    assert raw.exists(f"kvtier:{{{key(1)}}}") == 0 and raw.exists(f"kvtier:{{{key(3)}}}") == 1


@pytest.mark.parametrize(
    ("options", "why"),
    [({}, "it has no ttl"), ({"ttl": 60, "refresh_ttl": True}, "refresh_ttl restarts it")],
)
def test_redis_refuses_ages_it_cannot_tell(valkey_server, options, why) -> None:
    async def body() -> None:
        async with build_backend(valkey_server.url, options=options) as backend:
            await put(backend, [1])
            with pytest.raises(ConfigError, match=why):
                await purge(backend, EVERYTHING_OLD, older_than=1.0)
            assert await listed(backend) == [key(1)]

    asyncio.run(body())


def test_redis_refuses_ages_of_chunks_written_with_a_longer_ttl(valkey_server) -> None:
    async def body() -> None:
        async with build_backend(valkey_server.url, options={"ttl": 7200}) as writer:
            await put(writer, [1])
        async with build_backend(valkey_server.url, options={"ttl": 60}) as backend:
            with pytest.raises(ConfigError, match="writers use a longer ttl"):
                await purge(backend, EVERYTHING_OLD, older_than=1.0)
            assert await listed(backend) == [key(1)]

    asyncio.run(body())


def test_vineyard_ages_are_the_objects_creation_times(vineyard_server) -> None:
    options = {"key_prefix": f"kvtier/age{uuid.uuid4().hex[:6]}/"}

    async def body() -> None:
        async with build_backend(vineyard_server.url, capacity=64 << 20, options=options) as b:
            await put(b, [1, 2])
            time.sleep(1.2)  # time passing (creation times are wall clock), not a wait
            await put(b, [3])
            ages = await b.ages([key(1), key(3), key(9)])
            assert ages[0] is not None and 1.1 <= ages[0] < 30
            assert ages[1] is not None and ages[1] < 1.0
            assert ages[2] is None
            assert (await purge(b, EVERYTHING_OLD, older_than=1.0)).deleted == 2
            assert await listed(b) == [key(3)]
        async with build_backend(vineyard_server.url, capacity=64 << 20, options=options) as b:
            assert await b.ages([key(3)]) != [None]  # any process reads them

    asyncio.run(body())


def test_mooncake_refuses_and_says_why(mooncake_server) -> None:
    async def body() -> None:
        async with build_backend(mooncake_server.url, options=mooncake_server.options()) as b:
            await put(b, [1])
            with pytest.raises(ConfigError, match="Mooncake master keeps no write time"):
                await purge(b, EVERYTHING_OLD, older_than=1.0)
            assert await b.contains_many([key(1)]) == [True]
            await b.delete_many([key(1)])

    asyncio.run(body())
