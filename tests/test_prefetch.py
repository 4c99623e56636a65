"""Prefetch: a lookup asked with ``prefetch`` starts copying the leading chunks it found
only in slower tiers into the ``cpu`` tier, within the ``prefetch_bytes`` budget, so
that the retrieve that follows reads RAM; over real file and redis (Valkey) tiers, and
a gated tier that holds reads until the test lets them go."""

from __future__ import annotations

import asyncio
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from kvtier.core import KVLayout, KVTier
from kvtier.core.plugins import PluginRegistry

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16
CHUNK_BYTES = CHUNK * LAYOUT.bytes_per_token()


def prompt(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n,), generator=gen)
    kv = torch.randn(LAYOUT.chunk_shape(n), generator=gen).to(LAYOUT.dtype)
    return tokens, kv


def open_kv(slow: dict, registry: PluginRegistry | None = None, **top) -> KVTier:
    cfg = {
        "chunk_tokens": CHUNK,
        "retry_after": 0.2,
        "tiers": [{"url": "cpu://", "capacity": "64MiB"}, {"name": "slow", **slow}],
        **top,
    }
    return KVTier.open(cfg, model="prefetch-model", layout=LAYOUT, registry=registry)


def in_cpu(cache: KVTier, tokens: torch.Tensor) -> list[bool]:
    """Which chunks of ``tokens`` the cpu tier holds (asked of the backend directly)."""
    keys = [str(k) for k in cache.hasher.keys(tokens)]
    return cache._io.run(cache.chain.tiers[0].backend.contains_many(keys))


@pytest.fixture(params=["file", "redis"])
def slow(request, tmp_path: Path) -> dict:
    if request.param == "file":
        return {"url": f"file://{tmp_path}/kv", "capacity": "64MiB"}
    return {"url": request.getfixturevalue("valkey_server").url}


def test_lookup_with_prefetch_moves_slow_chunks_into_cpu(slow):
    tokens, kv = prompt(4 * CHUNK)
    with open_kv(slow) as cache:
        cache.store(tokens, kv)
    with open_kv(slow) as cache:  # a new process: its cpu tier is empty
        assert cache.lookup(tokens) == 4 * CHUNK
        cache.flush()
        assert in_cpu(cache, tokens) == [False] * 4, "a plain lookup moves nothing"
        assert cache.lookup(tokens, prefetch=True) == 4 * CHUNK
        cache.flush()  # waits for the prefetch, as for promotions
        assert in_cpu(cache, tokens) == [True] * 4
        stats = cache.stats()
        assert (stats.prefetched, stats.prefetch_dropped) == (4, 0)
        assert stats.prefetch_in_flight_bytes == 0
        assert stats.prefetch_read_bytes == stats.tier("slow").bytes_out > 4 * CHUNK_BYTES
        assert stats.tier("slow").hits == 4 and stats.tier("cpu").stored == 4
        n, got = cache.retrieve(tokens)
        assert n == 4 * CHUNK and torch.equal(got, kv)
        stats = cache.stats()
        assert stats.tier("cpu").hits == 4, "the retrieve read RAM"
        assert stats.tier("slow").hits == 4, "and not the slow tier again"
        assert cache.lookup(tokens, prefetch=True) == 4 * CHUNK
        assert cache.stats().prefetched == 4, "chunks in cpu already are not prefetched"


def test_chunks_the_caller_holds_are_not_prefetched(tmp_path):
    tokens, kv = prompt(4 * CHUNK)
    slow = {"url": f"file://{tmp_path}/kv", "capacity": "64MiB"}
    with open_kv(slow) as cache:
        cache.store(tokens, kv)
    with open_kv(slow) as cache:
        held = 2 * CHUNK + 3  # an engine's own prefix cache: chunks 0 and 1 whole
        assert cache.lookup(tokens, prefetch=True, held=held) == 4 * CHUNK
        cache.flush()
        assert in_cpu(cache, tokens) == [False, False, True, True]
        assert cache.stats().prefetched == 2
        assert cache.lookup(tokens, prefetch=True, held=4 * CHUNK) == 4 * CHUNK
        cache.flush()
        assert cache.stats().prefetched == 2, "all held: nothing to prefetch"


def test_prefetch_is_off_with_a_zero_budget(tmp_path):
    slow = {"url": f"file://{tmp_path}/kv", "capacity": "64MiB"}
    tokens, kv = prompt(2 * CHUNK)
    with open_kv(slow) as cache:
        cache.store(tokens, kv)
    with open_kv(slow, prefetch_bytes=0) as cache:
        assert cache.lookup(tokens, prefetch=True) == 2 * CHUNK
        cache.flush()
        assert in_cpu(cache, tokens) == [False, False]
        assert cache.stats().prefetched == 0


def test_corrupt_blob_is_not_promoted_and_is_removed(tmp_path):
    slow = {"url": f"file://{tmp_path}/kv", "capacity": "64MiB"}
    tokens, kv = prompt(3 * CHUNK)
    with open_kv(slow) as cache:
        cache.store(tokens, kv)
        key1 = str(cache.hasher.keys(tokens)[1])
    victim = next(p for p in (tmp_path / "kv").rglob(key1) if p.is_file())
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    with open_kv(slow) as cache:
        assert cache.lookup(tokens, prefetch=True) == 3 * CHUNK  # lookups read no bytes
        cache.flush()
        assert in_cpu(cache, tokens) == [True, False, True]
        assert not victim.exists(), "the corrupt blob was deleted"
        stats = cache.stats()
        assert stats.tier("slow").corrupt == 1 and stats.prefetched == 3
        n, got = cache.retrieve(tokens)
        assert n == CHUNK and torch.equal(got, kv[:, :, :CHUNK])
        assert cache.lookup(tokens) == CHUNK


# -- a tier whose reads wait at a gate the test opens --------------------------------

GATED_PLUGIN = """
    import asyncio
    from kvtier.core import hookimpl, BackendSpec, BackendUnavailableError
    from kvtier.backends.memory import MemoryBackend, MemoryOptions

    STATE = {"hold": False, "down": False, "gate": None, "reads": 0}

    class GatedBackend(MemoryBackend):
        def __init__(self, url, options, **kw):
            super().__init__("cpu://gated", options, **kw)

        async def _open(self):
            await super()._open()
            STATE["gate"] = asyncio.Event()

        async def _get_unique(self, keys):
            STATE["reads"] += len(keys)
            if STATE["down"]:
                raise BackendUnavailableError("gated server is down")
            if STATE["hold"]:
                await STATE["gate"].wait()
            return await super()._get_unique(keys)

    @hookimpl
    def kvtier_backends():
        return [BackendSpec(name="gated", schemes=("gated",), cls=GatedBackend,
                            options=MemoryOptions)]
"""


@pytest.fixture
def gated(fake_dist):
    fake_dist("kvtier-gated", {"gated": "gated_plugin"}, {"gated_plugin": GATED_PLUGIN})
    return PluginRegistry(), sys.modules["gated_plugin"].STATE


def gated_cache(registry: PluginRegistry, tokens, kv, *, timeout: float = 10.0, **top) -> KVTier:
    """A cpu -> gated chain holding ``kv`` in the gated tier only."""
    slow = {"url": "gated://", "capacity": "64MiB", "timeout": timeout}
    cache = open_kv(slow, registry, **top)
    cache.store(tokens, kv)
    cache.flush()
    keys = [str(k) for k in cache.hasher.keys(tokens)]
    cache._io.run(cache.chain.tiers[0].backend.delete_many(keys))
    return cache


def open_gate(cache: KVTier, state: dict) -> None:
    state["hold"] = False
    cache._io.loop.call_soon_threadsafe(state["gate"].set)


def test_budget_bounds_the_bytes_in_flight(gated):
    registry, state = gated
    tokens, kv = prompt(5 * CHUNK)
    with gated_cache(registry, tokens, kv, prefetch_bytes=2 * CHUNK_BYTES) as cache:
        state["hold"] = True
        assert cache.lookup(tokens, prefetch=True) == 5 * CHUNK
        stats = cache.stats()
        assert (stats.prefetched, stats.prefetch_dropped) == (2, 3)
        assert stats.prefetch_in_flight_bytes == 2 * CHUNK_BYTES
        assert cache.lookup(tokens, prefetch=True) == 5 * CHUNK  # the budget is still full
        stats = cache.stats()
        assert (stats.prefetched, stats.prefetch_dropped) == (2, 6)
        in_flight = stats.prefetch_in_flight_bytes
        assert in_flight == 2 * CHUNK_BYTES, "chunks in flight are not read twice"
        open_gate(cache, state)
        cache.flush()
        assert in_cpu(cache, tokens) == [True, True, False, False, False]
        assert cache.stats().prefetch_in_flight_bytes == 0, "the budget is free again"
        assert cache.lookup(tokens, prefetch=True) == 5 * CHUNK
        cache.flush()
        assert in_cpu(cache, tokens) == [True, True, True, True, False]
        assert cache.stats().prefetched == 4


def test_prefetches_take_turns_reading_a_tier(gated):
    """Of a burst of lookups, two prefetches read a tier at once; the others wait in
    lookup order (so that the first requests get their chunks first)."""
    registry, state = gated
    prompts = [prompt(2 * CHUNK, seed=s) for s in range(3)]
    with gated_cache(registry, *prompts[0]) as cache:
        for tokens, kv in prompts[1:]:
            cache.store(tokens, kv)
        cache.flush()
        for tokens, _ in prompts[1:]:
            keys = [str(k) for k in cache.hasher.keys(tokens)]
            cache._io.run(cache.chain.tiers[0].backend.delete_many(keys))
        state["hold"], state["reads"] = True, 0
        for tokens, _ in prompts:
            assert cache.lookup(tokens, prefetch=True) == 2 * CHUNK
        assert cache.stats().prefetched == 6
        deadline = time.monotonic() + 30
        while state["reads"] < 4:  # the first two prompts' reads reach the gate
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for _ in range(20):  # the loop runs whatever else is ready
            cache._io.run(asyncio.sleep(0))
        assert state["reads"] == 4, "the third prompt's prefetch waits its turn"
        open_gate(cache, state)
        cache.flush()
        assert state["reads"] == 6
        assert all(in_cpu(cache, tokens) == [True, True] for tokens, _ in prompts)


def test_retrieve_of_a_chunk_in_flight_waits_for_its_prefetch(gated):
    registry, state = gated
    tokens, kv = prompt(3 * CHUNK)
    with gated_cache(registry, tokens, kv) as cache:
        state["hold"], state["reads"] = True, 0
        assert cache.lookup(tokens, prefetch=True) == 3 * CHUNK
        got: list = []
        reader = threading.Thread(target=lambda: got.append(cache.retrieve(tokens)))
        reader.start()
        deadline = time.monotonic() + 30
        while cache.stats().prefetch_joined < 3:  # the retrieve waits for the prefetch
            assert time.monotonic() < deadline and reader.is_alive()
            time.sleep(0.01)
        open_gate(cache, state)
        reader.join(30)
        n, out = got[0]
        assert n == 3 * CHUNK and torch.equal(out, kv)
        stats = cache.stats()
        assert state["reads"] == 3, "each chunk was read once from the slow tier"
        assert stats.tier("slow").hits == 3 and stats.tier("cpu").hits == 3


def test_hung_slow_tier_never_blocks_the_lookup(gated):
    registry, state = gated
    tokens, kv = prompt(3 * CHUNK)
    with gated_cache(registry, tokens, kv, timeout=2.0, retry_after=30) as cache:
        state["hold"] = True  # never opened: every read times out
        began = time.perf_counter()
        assert cache.lookup(tokens, prefetch=True) == 3 * CHUNK
        assert time.perf_counter() - began < 1.5, "the lookup did not wait for the prefetch"
        cache.flush()
        stats = cache.stats()
        assert stats.prefetched == 3 and stats.prefetch_in_flight_bytes == 0
        assert stats.tier("slow").errors >= 1 and in_cpu(cache, tokens) == [False] * 3
        assert cache.retrieve(tokens)[0] == 0, "the slow tier is skipped while it is out"
        open_gate(cache, state)


def test_failing_slow_tier_makes_prefetch_a_no_op(gated):
    registry, state = gated
    tokens, kv = prompt(3 * CHUNK)
    with gated_cache(registry, tokens, kv, retry_after=30) as cache:
        state["down"] = True
        assert cache.lookup(tokens, prefetch=True) == 3 * CHUNK
        cache.flush()
        stats = cache.stats()
        assert stats.tier("slow").errors == 1 and stats.prefetch_in_flight_bytes == 0
        assert in_cpu(cache, tokens) == [False] * 3
        assert cache.lookup(tokens, prefetch=True) == 0, "the open breaker skips the tier"
        assert cache.stats().prefetched == 3
        state["down"] = False
