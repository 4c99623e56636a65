"""Pinning in the cpu tier: pinned chunks are never evicted nor expired, within the
pinned-bytes budget; unpinning releases them."""

from __future__ import annotations

import random

import pytest
import torch

from kvtier.backends.ram import RamStore
from kvtier.core import KVLayout, KVTier
from kvtier.core.backend import PutMode
from kvtier.core.buffers import BufferPool
from kvtier.core.errors import ConfigError
from kvtier.core.eviction import LRUPolicy

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16  # 4 KiB of KV per chunk


def prompt(seed: int, chunks: int = 4) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(50_000) for _ in range(chunks * CHUNK)]


def store(kv: KVTier, tokens: list[int]) -> None:
    kv.store(tokens, torch.ones(LAYOUT.chunk_shape(len(tokens)), dtype=LAYOUT.dtype))
    kv.flush()


def open_cpu(**options) -> KVTier:
    cfg = {
        "chunk_tokens": CHUNK,
        "tiers": [{"url": "cpu://", "capacity": "64KiB", "options": options}],
    }
    return KVTier.open(cfg, model="m", layout=LAYOUT, tenant="alice")


def test_pinned_chunks_survive_a_flood_until_unpinned():
    with open_cpu(pinned_bytes="24KiB") as kv:
        kept, other = prompt(1), prompt(2)
        store(kv, kept)
        store(kv, other)
        assert kv.pin(kept) == {"cpu": 4}
        for seed in range(10, 40):  # 30 x 16 KiB through a 64 KiB tier
            store(kv, prompt(seed))
        assert kv.retrieve(kept)[0] == len(kept)
        assert kv.retrieve(other)[0] == 0
        assert kv.pin(prompt(3)) == {"cpu": 0}  # not stored: nothing to pin
        assert kv.pin(kept, unpin=True) == {"cpu": 4}
        for seed in range(40, 60):
            store(kv, prompt(seed))
        assert kv.retrieve(kept)[0] == 0


def test_pins_stay_within_the_budget_and_a_namespace_can_be_pinned():
    with open_cpu(pinned_bytes="10KiB") as kv:
        store(kv, prompt(1))
        assert kv.pin() == {"cpu": 2}  # two 4 KiB chunks (and headers) fit 10 KiB
        assert kv.pin(unpin=True) == {"cpu": 2}
    with open_cpu() as kv:
        store(kv, prompt(1))
        assert kv.pin() == {"cpu": 0}  # no budget, no pins
    with pytest.raises(ConfigError, match="pinned_bytes"):
        open_cpu(pinned_bytes="1MiB")


def test_pinned_blobs_never_expire_and_are_never_victims():
    now = [0.0]
    pool = BufferPool()
    store_ = RamStore(100, LRUPolicy(), lambda keys, bufs: [b.release() for b in bufs],
                      ttl=10, pinned_bytes=60, clock=lambda: now[0])  # fmt: skip
    bufs = [pool.acquire(30) for _ in range(4)] + [pool.acquire(50)]
    assert store_.put_many([("a", bufs[0]), ("b", bufs[1])], PutMode.CREATE) == [True, True]
    assert store_.pin_many(["a", "b", "zz"]) == [True, True, False]
    now[0] = 20.0  # both past their ttl, but pinned
    assert store_.contains_many(["a", "b"]) == [True, True]
    # 60 of 100 bytes pinned: a 50-byte blob would need a pinned victim
    assert store_.put_many([("c", bufs[4])], PutMode.CREATE) == [False]
    assert store_.put_many([("c", bufs[2])], PutMode.CREATE) == [True]
    assert store_.unpin_many(["a"]) == [True]
    assert store_.put_many([("d", bufs[3])], PutMode.CREATE) == [True]  # evicts c (LRU)
    assert store_.contains_many(["a", "b", "c", "d"]) == [True, True, False, True]
    now[0] = 31.0  # a's ttl restarted when it was unpinned (at 20)
    assert store_.contains_many(["a", "b"]) == [False, True]
    for buf in bufs:
        buf.release()
