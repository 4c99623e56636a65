"""Pinning in the cpu and file tiers: pinned chunks are never evicted nor expired, within the
pinned-bytes budget; unpinning releases them."""

from __future__ import annotations

import os
import random
import time
from functools import partial
from pathlib import Path

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


def open_tier(tier: dict) -> KVTier:
    cfg = {"chunk_tokens": CHUNK, "tiers": [tier]}
    return KVTier.open(cfg, model="m", layout=LAYOUT, tenant="alice")


def open_cpu(**options) -> KVTier:
    return open_tier({"url": "cpu://", "capacity": "64KiB", "options": options})


def test_pins_stay_within_the_budget_and_a_namespace_can_be_pinned():
    with open_cpu(pinned_bytes="10KiB") as kv:
        store(kv, prompt(1))
        assert kv.pin() == {"cpu": 2}  # two 4 KiB chunks (and headers) fit 10 KiB
        assert kv.pin(unpin=True) == {"cpu": 2}
    with open_cpu() as kv:
        store(kv, prompt(1))
        assert kv.pin() == {}  # no budget: the tier takes no part
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


# -- the file tier --------------------------------------------------------------------


def open_file(root: Path, **options) -> KVTier:
    options = {"rescan_interval": 0, **options}
    return open_tier(
        {"name": "file", "url": f"file://{root}", "capacity": "64KiB", "options": options}
    )


def backdate(root: Path, seconds: float) -> None:
    """Make every file under ``root`` look written ``seconds`` ago."""
    then = time.time() - seconds
    for path in root.rglob("*"):
        if path.is_file():
            os.utime(path, (then, then))


@pytest.mark.parametrize("tier", ["cpu", "file"])
def test_pinned_chunks_survive_a_flood_until_unpinned(tier, tmp_path):
    opened = open_cpu if tier == "cpu" else partial(open_file, tmp_path / "kv")
    with opened(pinned_bytes="24KiB") as kv:
        kept, other = prompt(1), prompt(2)
        store(kv, kept)
        store(kv, other)
        assert kv.pin(kept) == {tier: 4}
        for seed in range(10, 40):  # 30 x 16 KiB through a 64 KiB tier
            store(kv, prompt(seed))
        assert kv.retrieve(kept)[0] == len(kept)
        assert kv.retrieve(other)[0] == 0
        assert kv.pin(prompt(3)) == {tier: 0}  # not stored: nothing to pin
        assert kv.pin(kept, unpin=True) == {tier: 4}
        assert kv.pin(kept, unpin=True) == {tier: 0}  # no longer pinned
        for seed in range(40, 60):
            store(kv, prompt(seed))
        assert kv.retrieve(kept)[0] == 0


def test_file_tier_pins_stay_within_the_budget(tmp_path):
    with open_file(tmp_path / "kv", pinned_bytes="10KiB") as kv:
        store(kv, prompt(1))
        assert kv.pin() == {"file": 2}  # two 4 KiB chunks (and headers) fit 10 KiB
        assert kv.pin(unpin=True) == {"file": 2}
    with open_file(tmp_path / "kv2") as kv:
        store(kv, prompt(1))
        assert kv.pin() == {}  # no budget: the tier takes no part
    with pytest.raises(ConfigError, match="pinned_bytes"):
        open_file(tmp_path / "kv3", pinned_bytes="1MiB")


def test_file_tier_pinned_chunks_never_expire(tmp_path):
    root = tmp_path / "kv"
    with open_file(root, pinned_bytes="24KiB", ttl=60) as kv:
        kept, other = prompt(1), prompt(2)
        store(kv, kept)
        store(kv, other)
        assert kv.pin(kept) == {"file": 4}
        backdate(root, 120)  # both written two ttls ago
        assert kv.retrieve(kept)[0] == len(kept)
        assert kv.retrieve(other)[0] == 0
        assert kv.pin(kept, unpin=True) == {"file": 4}
        assert kv.retrieve(kept)[0] == len(kept)  # its ttl started again at the unpin
        backdate(root, 120)
        assert kv.retrieve(kept)[0] == 0
