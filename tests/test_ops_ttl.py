"""TTL per tier: an expired chunk is a miss, removed when met and by a bounded
background sweep, on the cpu, file and s3 tiers (redis has its own ``ttl``)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from kvtier.backends.s3.expiry import TIMESTAMP_RESOLUTION
from kvtier.core.buffers import BufferPool
from kvtier.core.errors import ConfigError
from kvtier.core.factory import build_backend

POOL = BufferPool()


def key(n: int) -> str:
    return f"m-0123456789abcdef.{n:032x}"


def blob(n: int) -> Any:
    buf = POOL.acquire(64)
    buf.view[:] = bytes([n]) * 64
    return buf


async def put(backend: Any, numbers: list[int]) -> None:
    items = [(key(n), blob(n)) for n in numbers]
    assert await backend.put_many(items) == [True] * len(items)
    for _, buf in items:
        buf.release()


async def until(check, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.05)
    return False


@pytest.fixture(params=["cpu", "file", "s3"])
def tier(request, tmp_path) -> tuple[str, int | None, dict[str, Any]]:
    if request.param == "cpu":
        return "cpu://", 1 << 20, {}
    if request.param == "file":
        return f"file://{tmp_path}/kv", 1 << 20, {}
    s3 = request.getfixturevalue("seaweedfs")
    return s3.url(), None, s3.options()


def test_expired_chunks_are_misses_and_removed(tier):
    url, capacity, options = tier
    ttl = 1.0

    async def run() -> None:
        backend = build_backend(url, capacity=capacity, options={**options, "ttl": ttl})
        async with backend:
            await put(backend, [1, 2])
            got = await backend.get_many([key(1)])
            assert got[0] is not None and bytes(got[0].view) == bytes([1]) * 64
            got[0].release()
            resolution = TIMESTAMP_RESOLUTION if url.startswith("s3://") else 0.0
            await asyncio.sleep(ttl + resolution + 0.1)  # time passing, not a wait for work
            assert await backend.contains_many([key(1)]) == [False]
            assert await backend.get_many([key(2)]) == [None]
            assert (await backend.stats()).details["expired"] >= 1
            assert [k async for k in backend.iter_keys()] == []
            await put(backend, [1])  # stored anew
            got = await backend.get_many([key(1)])
            assert got[0] is not None and bytes(got[0].view) == bytes([1]) * 64
            got[0].release()

    asyncio.run(run())


def test_the_sweep_removes_expired_chunks_nobody_reads(tier):
    url, capacity, options = tier
    ttl = 0.5

    async def run() -> None:
        backend = build_backend(url, capacity=capacity, options={**options, "ttl": ttl})
        async with backend:
            await put(backend, list(range(10)))

            async def swept() -> bool:
                return (await backend.stats()).details["expired"] == 10

            assert await until(swept), await backend.stats()

    asyncio.run(run())


# -- shared tiers without a store-side write time: mooncake, vineyard, nixl ---------------


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Shared:
    """A shared tier under test: how to build it, set its clock, and see its store."""

    url: str
    capacity: int | None
    options: dict[str, Any]
    ttl_option: str

    def build(self, ttl: float | None) -> Any:
        options = dict(self.options)
        if ttl is not None:
            options[self.ttl_option] = ttl
        return build_backend(self.url, capacity=self.capacity, options=options)

    def set_clock(self, backend: Any, clock: Clock) -> None:
        if self.ttl_option == "chunk_ttl":  # nixl: its RamStore's own ttl
            backend.store._clock = clock
        else:
            backend.expiry.clock = clock

    async def stored(self, backend: Any, numbers: list[int]) -> list[bool]:
        """Whether the store still holds each chunk, asked past ``backend``'s expiry
        (by another backend of the store, or nixl's own store)."""
        if self.ttl_option == "chunk_ttl":
            return [key(n) in backend.store.blobs for n in numbers]
        async with self.build(None) as plain:
            return await plain.contains_many([key(n) for n in numbers])


@pytest.fixture(params=["mooncake", "vineyard", "nixl"])
def shared(request) -> Shared:
    if request.param == "mooncake":
        store = request.getfixturevalue("mooncake_server")
        return Shared(store.url, None, store.options(), "ttl")
    if request.param == "vineyard":
        server = request.getfixturevalue("vineyard_server")
        return Shared(server.url, 64 << 20, {"key_prefix": "kvtier/ttl/"}, "ttl")
    valkey = request.getfixturevalue("valkey_server")
    group = f"nixl://ttl-{uuid.uuid4().hex[:8]}"
    return Shared(group, 64 << 20, {"index": valkey.url}, "chunk_ttl")


@contextlib.asynccontextmanager
async def ticking(shared: Shared, ttl: float) -> AsyncIterator[tuple[Any, Clock]]:
    """An open backend of ``shared`` with ``ttl``, and the clock it expires chunks by."""
    clock = Clock()
    async with shared.build(ttl) as backend:
        shared.set_clock(backend, clock)
        yield backend, clock


def test_shared_tiers_expire_chunks_by_their_clock(shared: Shared) -> None:
    async def body() -> None:
        async with ticking(shared, 60.0) as (backend, clock):
            await put(backend, [1, 2, 3])
            clock.now += 59.0
            got = await backend.get_many([key(1)])
            assert got[0] is not None and bytes(got[0].view) == bytes([1]) * 64
            got[0].release()
            assert await backend.contains_many([key(2)]) == [True]
            clock.now += 1.0
            assert await backend.get_many([key(1)]) == [None]
            assert await backend.contains_many([key(2)]) == [False]
            assert [k async for k in backend.iter_keys()] == []
            assert (await backend.stats()).details["expired"] >= 2
            # CREATE over an expired chunk nobody met stores it anew
            assert await backend.put_many([(key(3), blob(3))]) == [True]
            got = await backend.get_many([key(3)])
            assert got[0] is not None and bytes(got[0].view) == bytes([3]) * 64
            got[0].release()
            assert await shared.stored(backend, [1, 2, 3]) == [False, False, True]

    asyncio.run(body())


def test_shared_tiers_sweep_expired_chunks_nobody_reads(shared: Shared) -> None:
    async def body() -> None:
        async with ticking(shared, 60.0) as (backend, clock):
            await put(backend, list(range(10)))
            assert await backend.sweep_expired() == 0
            clock.now += 30.0
            await put(backend, [10])
            clock.now += 30.0
            assert await backend.sweep_expired() == 10
            assert await shared.stored(backend, list(range(11))) == [False] * 10 + [True]
            assert await backend.contains_many([key(10)]) == [True]

    asyncio.run(body())


def test_shared_tiers_sweep_on_their_own(shared: Shared) -> None:
    """The background sweep runs every ttl/4 s; the clock says when chunks expire."""

    async def body() -> None:
        async with ticking(shared, 0.2) as (backend, clock):
            await put(backend, [1, 2])
            clock.now += 1.0

            async def swept() -> bool:
                return (await backend.stats()).details["expired"] == 2

            assert await until(swept), await backend.stats()

    asyncio.run(body())


@pytest.mark.parametrize("peer_tier", ["mooncake", "vineyard"])
def test_a_chunk_another_process_wrote_lives_ttl_after_it_is_met(request, peer_tier) -> None:
    if peer_tier == "mooncake":
        store = request.getfixturevalue("mooncake_server")
        target = Shared(store.url, None, store.options(), "ttl")
    else:
        server = request.getfixturevalue("vineyard_server")
        target = Shared(server.url, 64 << 20, {"key_prefix": "kvtier/ttl/"}, "ttl")
    clock = Clock()

    async def body() -> None:
        async with target.build(None) as writer, target.build(ttl=60.0) as reader:
            target.set_clock(reader, clock)
            await put(writer, [7])
            clock.now += 100.0  # written long ago, as far as the reader's clock goes
            assert await reader.contains_many([key(7)]) == [True]  # met now
            clock.now += 59.0
            assert await reader.contains_many([key(7)]) == [True]
            clock.now += 1.0
            assert await reader.get_many([key(7)]) == [None]
            assert await writer.contains_many([key(7)]) == [False]  # removed from the store

    asyncio.run(body())


def test_nixl_ttl_stays_the_heartbeat_and_chunk_ttl_is_separate() -> None:
    options = {"index": "redis://127.0.0.1:6379/0", "ttl": 5}
    backend = build_backend("nixl://g", capacity=1 << 20, options=options)
    assert backend.options.ttl == 5 and backend.options.chunk_ttl is None
    backend = build_backend("nixl://g", capacity=1 << 20, options={**options, "chunk_ttl": 30})
    assert backend.options.chunk_ttl == 30 and backend.store.ttl == 30
    with pytest.raises(ConfigError, match="chunk_ttl"):  # a chunk lifetime given as ttl
        build_backend("nixl://g", capacity=1 << 20, options={**options, "ttl": 0.1})
