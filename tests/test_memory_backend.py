"""The ``cpu://`` tier: the conformance suite plus zero-copy and eviction specifics."""

from __future__ import annotations

import asyncio
import ctypes
import os
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import pytest

from kvtier.backends.memory import MemoryBackend, MemoryOptions
from kvtier.backends.ram import RamStore
from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.errors import ConfigError
from kvtier.core.eviction import LRUPolicy
from kvtier.core.factory import build_backend
from kvtier.core.keys import ChunkKey
from kvtier.core.plugins import get_registry
from kvtier.core.testing import BackendConformance

T = TypeVar("T")


class RamStoreAccess:
    """Out-of-band access for the conformance suite to an in-process tier's blobs:
    ``backend.store`` (a :class:`~kvtier.backends.ram.RamStore`), whose ``blobs`` is
    the mapping key -> buffer. Also used by the ``nixl`` tier's tests."""

    def raw_write(self, backend: Backend, key: str, data: bytes) -> None:
        store = ram_store(backend)
        with backend.pool.copy_of(data) as buf:  # the store keeps its own reference
            assert store.put_many([(key, buf)], PutMode.OVERWRITE) == [True]

    def raw_read(self, backend: Backend, key: str) -> bytes | None:
        store = ram_store(backend)
        with store.lock:
            buf = store.blobs.get(key)
            return None if buf is None else bytes(buf.view)


def ram_store(backend: Backend) -> RamStore:
    store = getattr(backend, "store", None)
    assert isinstance(store, RamStore), f"{type(backend).__name__} keeps no RamStore in .store"
    return store


class TestMemoryBackend(RamStoreAccess, BackendConformance):
    url = "cpu://conformance"
    capacity = 96 << 20


class TestMemoryBackendLFU(RamStoreAccess, BackendConformance):
    url = "cpu://"
    capacity = 16 << 20
    options = {"eviction": "lfu"}


def key(i: int) -> str:
    return str(ChunkKey("memory-test", i.to_bytes(16, "big")))


def blob(pool: BufferPool, nbytes: int) -> Buffer:
    return pool.copy_of(os.urandom(nbytes))


def address(buf: Buffer) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf.view))


def run(
    body: Callable[[MemoryBackend], Awaitable[T]], capacity: int = 1 << 20, **options: Any
) -> T:
    async def main() -> T:
        backend = MemoryBackend("cpu://test", MemoryOptions(**options), capacity=capacity)
        async with backend:
            return await body(backend)

    return asyncio.run(main())


def test_registered_as_cpu_plugin() -> None:
    spec = get_registry().backend_for_url("cpu://")
    assert (spec.name, spec.load(), spec.options) == ("cpu", MemoryBackend, MemoryOptions)


def test_put_and_get_are_zero_copy() -> None:
    pool = BufferPool()
    buf = blob(pool, 10_000)

    async def body(backend: MemoryBackend) -> None:
        assert await backend.put_many([(key(1), buf)]) == [True]
        assert buf.refcount == 2
        got, again = await backend.get_many([key(1), key(1)])
        assert got is not None and again is not None
        assert address(got) == address(again) == address(buf)
        assert buf.refcount == 4
        got.release()
        again.release()

    run(body)
    assert buf.refcount == 1


def test_ranged_reads_copy_from_the_stored_buffer_and_count_as_reads() -> None:
    """``read_into_many`` copies the ranges out of the buffer stored, holds no
    reference after, and a ranged read is a use for the eviction policy, as a get is."""
    pool = BufferPool()
    bufs = [blob(pool, 1000) for _ in range(4)]
    evicted: list[tuple[str, int]] = []

    async def body(backend: MemoryBackend) -> None:
        assert backend.capabilities.ranged_reads
        backend.eviction_listener = evicted.extend
        assert await backend.put_many([(key(i), b) for i, b in enumerate(bufs)]) == [True] * 4
        out = memoryview(bytearray(300))
        assert await backend.read_into_many([(key(0), 900, out), (key(0), 0, out[100:])]) == [
            100,
            200,
        ]
        assert out[:100] == bufs[0].view[900:] and out[100:] == bufs[0].view[:200]
        assert [b.refcount for b in bufs] == [2] * 4, "the read kept a reference"
        assert await backend.put_many([(key(4), blob(pool, 1000))]) == [True]

    run(body, capacity=4000, eviction="lru")
    assert evicted == [(key(1), 1000)], "the ranged read of key 0 did not count as a use"


@pytest.mark.parametrize(("eviction", "victim"), [("lru", 1), ("lfu", 2)])
def test_eviction_order_follows_policy(eviction: str, victim: int) -> None:
    """Keys 1-4 fill the tier; key 1 is read 3 times, then 2, 3, 4 once each.

    LRU evicts key 1 (least recently read), LFU key 2 (fewest reads, oldest of those).
    """
    pool = BufferPool()
    evicted: list[tuple[str, int]] = []

    async def body(backend: MemoryBackend) -> None:
        backend.eviction_listener = evicted.extend
        assert (
            await backend.put_many([(key(i), blob(pool, 1000)) for i in range(1, 5)]) == [True] * 4
        )
        for k in [1, 1, 1, 2, 3, 4]:
            await backend.get_many([key(k)])
        assert await backend.put_many([(key(5), blob(pool, 1000))]) == [True]
        present = await backend.contains_many([key(i) for i in range(1, 6)])
        assert present == [i != victim for i in range(1, 6)]

    run(body, capacity=4000, eviction=eviction)
    assert evicted == [(key(victim), 1000)]


def test_evicted_buffer_stays_valid_for_reader() -> None:
    pool = BufferPool()
    buf = blob(pool, 3000)
    want = bytes(buf.view)

    async def body(backend: MemoryBackend) -> None:
        await backend.put_many([(key(1), buf)])
        [got] = await backend.get_many([key(1)])
        buf.release()
        assert await backend.put_many([(key(2), blob(pool, 3000))]) == [True]
        assert await backend.contains_many([key(1)]) == [False]
        assert got is not None and bytes(got.view) == want
        assert got.refcount == 1
        got.release()

    run(body, capacity=4000)


def test_oversize_blob_counted_as_rejected() -> None:
    pool = BufferPool()

    async def body(backend: MemoryBackend) -> None:
        assert await backend.put_many([(key(1), pool.acquire(4001))]) == [False]
        assert await backend.put_many([(key(2), pool.acquire(4000))]) == [True]
        assert await backend.get_many([key(1), key(2)]) != [None, None]
        stats = await backend.stats()
        assert (stats.keys, stats.bytes_used, stats.capacity_bytes) == (1, 4000, 4000)
        assert stats.details == {"eviction": "lru", "hits": 1, "misses": 1, "rejected": 1}

    run(body, capacity=4000)


def test_overwrite_with_oversize_blob_keeps_old_value() -> None:
    pool = BufferPool()
    old = blob(pool, 100)

    async def body(backend: MemoryBackend) -> None:
        await backend.put_many([(key(1), old)])
        assert await backend.put_many([(key(1), pool.acquire(5000))]) == [False]
        [got] = await backend.get_many([key(1)])
        assert got is not None and address(got) == address(old)

    run(body, capacity=4000)


def test_capacity_is_required() -> None:
    with pytest.raises(ConfigError, match=r"capacity: 2GiB"):
        build_backend("cpu://")
    with pytest.raises(ConfigError, match="positive"):
        build_backend("cpu://", capacity=0)


@pytest.mark.parametrize("url", ["cpu://a/b", "cpu://x?y=1", "cpu://user@host", "cpu://h:1"])
def test_bad_url_rejected(url: str) -> None:
    with pytest.raises(ConfigError, match="cpu://<name>"):
        build_backend(url, capacity=1 << 20)


def test_bad_options_rejected() -> None:
    with pytest.raises(ConfigError, match="evicton"):
        build_backend("cpu://", capacity=1 << 20, options={"evicton": "lru"})
    with pytest.raises(ConfigError, match="did you mean 'lfu'"):
        build_backend("cpu://", capacity=1 << 20, options={"eviction": "lfx"})


def test_raw_hooks_bypass_the_backend() -> None:
    """What raw_write stores, get_many returns; what put_many stores, raw_read sees."""
    raw = RamStoreAccess()
    pool = BufferPool()

    async def body(backend: MemoryBackend) -> None:
        raw.raw_write(backend, key(1), b"written out of band")
        [got] = await backend.get_many([key(1)])
        assert got is not None and bytes(got.view) == b"written out of band"
        got.release()
        with blob(pool, 5000) as buf:
            assert await backend.put_many([(key(2), buf)]) == [True]
            assert raw.raw_read(backend, key(2)) == bytes(buf.view)
        assert raw.raw_read(backend, key(3)) is None
        assert (await backend.stats()).keys == 2

    run(body)


def test_ram_store_reports_every_change() -> None:
    """``changed`` (the nixl tier's index bookkeeping) sees each store and each drop:
    overwrite, eviction, delete and clear; evicted blobs are handed over, not released."""
    pool = BufferPool()
    changes: list[tuple[str, int | None]] = []
    handed: list[tuple[str, Buffer]] = []

    def evicted(items: Sequence[tuple[str, int]], blobs: Sequence[Buffer]) -> None:
        handed.extend(zip([k for k, _ in items], blobs, strict=True))

    def changed(k: str, buf: Buffer | None) -> None:
        changes.append((k, None if buf is None else buf.nbytes))

    store = RamStore(4000, LRUPolicy(), evicted, changed=changed)
    first, second, third = blob(pool, 1000), blob(pool, 3000), blob(pool, 2000)
    assert store.put_many([(key(1), first), (key(2), second)], PutMode.CREATE) == [True, True]
    assert store.put_many([(key(1), third)], PutMode.CREATE) == [False]
    assert store.put_many([(key(1), third)], PutMode.OVERWRITE) == [True]  # evicts key 2
    assert store.delete_many([key(1), key(3)]) == [True, False]
    assert store.put_many([(key(4), first)], PutMode.OVERWRITE) == [True]
    store.clear()
    assert changes == [
        (key(1), 1000),
        (key(2), 3000),
        (key(1), None),
        (key(2), None),
        (key(1), 2000),
        (key(1), None),
        (key(4), 1000),
        (key(4), None),
    ]
    assert [(k, buf is second) for k, buf in handed] == [(key(2), True)]
    assert (first.refcount, second.refcount, third.refcount) == (1, 2, 1)
    assert store.blobs == {} and store.stats().bytes_used == 0
