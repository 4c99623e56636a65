"""TTL per tier: an expired chunk is a miss, removed when met and by a bounded
background sweep, on the cpu, file and s3 tiers (redis has its own ``ttl``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from kvtier.core.buffers import BufferPool
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
            await asyncio.sleep(ttl + 0.1)
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
