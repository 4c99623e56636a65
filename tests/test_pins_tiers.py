"""Pins in the nixl and redis (Valkey) tiers, against the real servers: a pinned chunk
survives what evicts or expires the others, within the pinned-bytes budget; unpinning
releases it; a store that could not keep a pin refuses (cpu and file:
tests/test_ops_pins.py)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import pytest
import torch
from test_nixl_backend import chunk_key, make_blob

from kvtier.core import KVLayout, KVTier
from kvtier.core.buffers import BufferPool
from kvtier.core.errors import ConfigError
from kvtier.core.factory import build_backend

POOL = BufferPool()
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16  # 4 KiB of KV per chunk


def key(n: int) -> str:
    return f"m-0123456789abcdef.{n:032x}"


async def put(backend: Any, numbers: list[int], size: int = 64) -> list[bool]:
    items = []
    for n in numbers:
        buf = POOL.acquire(size)
        buf.view[:] = bytes([n % 256]) * size
        items.append((key(n), buf))
    try:
        return await backend.put_many(items)
    finally:
        for _, buf in items:
            buf.release()


# -- nixl: this process's store, read by peers -------------------------------------------


@pytest.fixture
def nixl_group(valkey_server) -> tuple[str, dict[str, Any]]:
    return f"nixl://pins-{uuid.uuid4().hex[:8]}", {"index": valkey_server.url}


def test_nixl_pins_are_never_evicted_and_stay_readable_by_peers(nixl_group) -> None:
    url, options = nixl_group
    keys = [chunk_key() for _ in range(60)]
    size = make_blob(keys[0], 1, POOL).nbytes  # one 1-token chunk (leaked: a test)

    async def fill(backend: Any, chosen: list[str]) -> None:
        items = [(k, make_blob(k, 1, POOL)) for k in chosen]
        assert await backend.put_many(items) == [True] * len(items)
        for _, buf in items:
            buf.release()

    async def body() -> None:
        pinned = {**options, "pinned_bytes": 3 * size + 10}
        owner = build_backend(url, capacity=10 * size, options=pinned)
        async with owner, build_backend(url, capacity=10 * size, options=options) as peer:
            await fill(owner, keys[:4])
            assert await owner.pin_many([*keys[:3], keys[59]]) == [True, True, True, False]
            assert await owner.pin_many([keys[3]]) == [False]  # past the budget
            assert (await owner.stats()).details["pinned_bytes"] == 3 * size
            await fill(owner, keys[10:30])  # evicts every unpinned chunk
            assert await owner.contains_many(keys[:4]) == [True, True, True, False]
            got = await peer.get_many([keys[0]])  # read from the owner through NIXL
            assert got[0] is not None and got[0].nbytes == size
            got[0].release()
            assert await owner.unpin_many([keys[0], keys[3]]) == [True, False]
            await fill(owner, keys[30:50])
            assert await owner.contains_many(keys[:2]) == [False, True]

    asyncio.run(body())


def test_nixl_pinned_bytes_must_fit_the_capacity(nixl_group) -> None:
    url, options = nixl_group
    with pytest.raises(ConfigError, match="pinned_bytes"):
        build_backend(url, capacity=1024, options={**options, "pinned_bytes": 4096})


# -- redis: a pin is the chunk's expiry removed --------------------------------------------


def raw_client(server: Any) -> Any:
    import redis

    return redis.Redis(host="127.0.0.1", port=server.port)


def name(n: int) -> str:
    return f"kvtier:{{{key(n)}}}"


def test_redis_pins_remove_the_expiry_within_the_budget(valkey_server) -> None:
    raw = raw_client(valkey_server)
    raw.config_set("maxmemory-policy", "volatile-lru")
    options = {"ttl": 3600, "pinned_bytes": 150}

    async def body() -> None:
        async with build_backend(valkey_server.url, options=options) as backend:
            assert await put(backend, [1, 2, 3]) == [True] * 3
            assert await backend.pin_many([key(1), key(2), key(3), key(9)]) == [
                True, True, False, False,
            ]  # fmt: skip  # 2 x 64 bytes fit 150; key 9 is not stored
            assert [raw.pttl(name(n)) for n in (1, 2)] == [-1, -1]
            assert raw.pttl(name(3)) > 3_500_000
            assert await backend.ages([key(1), key(3)]) == [None, pytest.approx(0, abs=2)]
            assert (await backend.stats()).details["pinned_bytes"] == 128
            assert await backend.unpin_many([key(1), key(3)]) == [True, False]
            assert raw.pttl(name(1)) > 3_500_000  # its ttl again, from now
            assert await backend.pin_many([key(3)]) == [True]  # room again
            raw.pexpire(name(2), 3_600_000)  # another process unpinned it
            assert await backend.pin_many([key(2)]) == [True]
            assert raw.pttl(name(2)) == -1  # pinned again, not just remembered

    try:
        asyncio.run(body())
    finally:
        raw.config_set("maxmemory-policy", "noeviction")


def test_redis_pinned_chunks_survive_eviction(valkey_factory) -> None:
    server = valkey_factory("--maxmemory", "4mb", "--maxmemory-policy", "volatile-lru")
    raw = raw_client(server)
    options = {"ttl": 3600, "pinned_bytes": "64KiB"}

    async def body() -> None:
        async with build_backend(server.url, options=options) as backend:
            assert await put(backend, [1, 2], size=16 << 10) == [True, True]
            assert await backend.pin_many([key(1), key(2)]) == [True, True]
            for start in range(10, 1010, 50):  # 16 MiB through a 4 MB server
                await put(backend, list(range(start, start + 50)), size=16 << 10)
            assert int(raw.info("stats")["evicted_keys"]) > 0
            assert await backend.contains_many([key(1), key(2)]) == [True, True]
            assert await backend.contains_many([key(10)]) == [False]  # evicted

    asyncio.run(body())


def test_redis_refuses_pins_under_an_allkeys_policy(valkey_server) -> None:
    raw = raw_client(valkey_server)
    raw.config_set("maxmemory-policy", "allkeys-lru")
    tier = {
        "name": "redis",
        "url": valkey_server.url,
        "options": {"ttl": 3600, "pinned_bytes": "1MiB"},
    }
    cpu = {"url": "cpu://", "capacity": "1MiB", "options": {"pinned_bytes": "64KiB"}}
    cfg = {"chunk_tokens": CHUNK, "tiers": [cpu, tier]}
    tokens = list(range(2 * CHUNK))
    try:
        with KVTier.open(cfg, model="m", layout=LAYOUT, tenant="alice") as kv:
            kv.store(tokens, torch.ones(LAYOUT.chunk_shape(len(tokens)), dtype=LAYOUT.dtype))
            kv.flush()
            with pytest.raises(ConfigError, match=r"tier redis.*allkeys-lru.*volatile-"):
                kv.pin(tokens)
            redis_stats = next(t for t in kv.stats().tiers if t.name == "redis")
            assert redis_stats.errors == 0  # a refusal is no outage
            raw.config_set("maxmemory-policy", "volatile-lru")
            assert kv.pin(tokens) == {"cpu": 2, "redis": 2}
            assert kv.pin(unpin=True) == {"cpu": 2, "redis": 2}
    finally:
        raw.config_set("maxmemory-policy", "noeviction")


@pytest.mark.parametrize(
    "options", [{"pinned_bytes": 100}, {"pinned_bytes": 100, "ttl": 60, "refresh_ttl": True}]
)
def test_redis_pins_need_a_ttl_without_refresh(options) -> None:
    with pytest.raises(ConfigError, match="pinned_bytes needs a ttl without refresh_ttl"):
        build_backend("redis://127.0.0.1:6379/0", options=options)


# -- mooncake: a pin is the object rewritten hard pinned --------------------------------


def test_mooncake_pinned_chunks_survive_eviction_and_expiry(mooncake_factory) -> None:
    store = mooncake_factory()
    options = store.options(global_segment_size="64MiB", pinned_bytes="3MiB", ttl=60)
    mib = 1 << 20

    async def body() -> None:
        async with build_backend(store.url, options=options) as backend:
            clock = [1000.0]
            backend.expiry.clock = lambda: clock[0]
            assert await put(backend, [1, 2, 3], size=mib) == [True] * 3
            assert await backend.pin_many([key(1), key(2), key(3), key(9)]) == [
                True, True, True, False,
            ]  # fmt: skip  # key 9 is not stored
            assert (await backend.stats()).details["pinned_bytes"] == 3 * mib
            assert await put(backend, [4], size=mib) == [True]
            assert await backend.pin_many([key(4)]) == [False]  # past the budget
            deadline, start = time.monotonic() + 60, 10
            while (await backend.stats()).details["store"]["evicted_keys"] == 0:
                # 20 MiB at a time through a 64 MiB store, until the master evicted (it
                # evicts from a thread of its own: on a busy host, writes may be refused
                # as full before it ran)
                assert time.monotonic() < deadline, "the master never evicted"
                await put(backend, list(range(start, start + 20)), size=mib)  # some may fail
                start += 20
                await asyncio.sleep(0.1)
            assert await backend.contains_many([key(1), key(2), key(3)]) == [True] * 3
            got = await backend.get_many([key(2)])
            assert got[0] is not None and bytes(got[0].view) == bytes([2]) * mib
            got[0].release()
            clock[0] += 61.0  # past the ttl: pinned chunks do not expire
            assert await backend.contains_many([key(1), key(2)]) == [True, True]
            assert await backend.unpin_many([key(1), key(9)]) == [True, False]
            clock[0] += 61.0  # key 1's ttl started again when it was unpinned
            assert await backend.contains_many([key(1), key(2)]) == [False, True]

    asyncio.run(body())


# -- vineyard: a pin is a keep name in vineyardd, seen by every process -----------------


def test_vineyard_pins_are_shared_never_evicted_nor_expired(vineyard_server) -> None:
    prefix = f"kvtier/pins{uuid.uuid4().hex[:6]}/"
    options = {"key_prefix": prefix, "pinned_bytes": 200, "ttl": 60}

    async def body() -> None:
        a = build_backend(vineyard_server.url, capacity=1024, options=options)
        b = build_backend(vineyard_server.url, capacity=1024, options=options)
        async with a, b:
            clock = [1000.0]
            b.expiry.clock = lambda: clock[0]
            assert await put(a, [1, 2, 3, 4]) == [True] * 4
            assert await a.pin_many([key(1), key(2), key(3), key(9)]) == [
                True, True, True, False,
            ]  # fmt: skip  # 3 x 64 bytes fit 200; key 9 is not stored
            assert await b.pin_many([key(4)]) == [False]  # the budget is the tier's
            assert await b.pin_many([key(1)]) == [True]  # already pinned, by a
            for start in range(10, 60, 5):  # b's writes evict every unpinned chunk
                assert await put(b, list(range(start, start + 5))) == [True] * 5
            assert (await b.stats()).evictions > 0
            assert await b.contains_many([key(n) for n in (1, 2, 3, 4)]) == [
                True, True, True, False,
            ]  # fmt: skip
            clock[0] += 61.0  # past b's ttl: pinned chunks stay, others expire
            assert await b.contains_many([key(1), key(55)]) == [True, False]
            assert await b.ages([key(1)]) == [None]  # pinned: never purged by age
            assert await b.unpin_many([key(1), key(4)]) == [True, False]  # a's pin
            assert await a.delete_many([key(2)]) == [True]  # a delete drops the pin
            assert await put(a, [2]) == [True]
            assert await a.pin_many([key(2)]) == [True]  # room: key 1 is unpinned
            assert await a.unpin_many([key(2), key(3)]) == [True, True]
            assert await put(a, list(range(60, 80))) == [True] * 20
            assert await a.contains_many([key(1), key(2), key(3)]) == [False] * 3

    asyncio.run(body())


# -- s3: a pin exempts a chunk from kvtier's ttl and purge by age ------------------------


def test_s3_pins_exempt_chunks_from_the_ttl_and_purge_by_age(seaweedfs) -> None:
    from kvtier.backends.s3.expiry import TIMESTAMP_RESOLUTION
    from kvtier.core.migrate import ChunkFilter
    from kvtier.core.purge import purge

    url = seaweedfs.url()
    options = {**seaweedfs.options(), "ttl": 1.0, "pinned_bytes": 150}
    every = ChunkFilter(models=("m",))

    async def body() -> None:
        async with build_backend(url, options=options) as backend:
            assert await put(backend, [1, 2, 3, 4, 5]) == [True] * 5
            assert await backend.pin_many([key(1), key(2), key(3), key(9)]) == [
                True, True, False, False,
            ]  # fmt: skip  # 2 x 64 bytes fit 150; key 9 is not stored
            assert (await backend.stats()).details["pinned_bytes"] == 128
            assert [k async for k in backend.iter_keys()] == [key(n) for n in range(1, 6)]
            await asyncio.sleep(1.0 + TIMESTAMP_RESOLUTION + 0.2)  # time passing: the ttl
            deadline = time.monotonic() + 10
            while (await backend.stats()).details["expired"] < 3:  # the background sweep
                assert time.monotonic() < deadline, await backend.stats()
                await asyncio.sleep(0.05)
            assert await backend._blocking(backend._io().expiry.sweep) == 0  # pinned stay
            got = await backend.get_many([key(1), key(3)])
            assert got[0] is not None and bytes(got[0].view) == bytes([1]) * 64
            got[0].release()
            assert got[1] is None  # expired, and deleted
            assert await backend.contains_many([key(2), key(4), key(5)]) == [True, False, False]
            assert await backend.ages([key(1)]) == [None]
            assert (await purge(backend, every, older_than=0.5)).deleted == 0
            assert await backend.unpin_many([key(1), key(9)]) == [True, False]
            assert await backend.contains_many([key(1)]) == [False]  # old: expires at once
            assert await backend.delete_many([key(2)]) == [True]  # drops its marker
            assert (
                await backend._blocking(
                    lambda: backend.client.list_objects_v2(
                        Bucket=backend.bucket, Prefix=backend.prefix + "pins/"
                    ).get("KeyCount")
                )
                == 0
            )

    asyncio.run(body())
