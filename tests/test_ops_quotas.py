"""Per-tenant quotas: a tenant's own LRU keeps it within its quota, so a flooding
tenant does not evict another's chunks from a shared cpu -> file chain."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from kvtier.core import KVLayout, KVTier
from kvtier.core.errors import ConfigError
from kvtier.core.keys import tenant_tag
from kvtier.core.quotas import TenantLedger, tenant_of

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16  # 4 KiB of KV per chunk
PROMPT = 4 * CHUNK


def config(tmp_path: Path, quotas: dict[str, str] | None) -> dict:
    cfg: dict = {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": "cpu://", "capacity": "16KiB"},
            {"url": f"file://{tmp_path}/shared", "capacity": "512KiB",
             "options": {"rescan_interval": 0.01}},
        ],
    }  # fmt: skip
    if quotas:
        cfg["ops"] = {"tiers": {"file": {"quotas": quotas}}}
    return cfg


def prompts(seed: int, n: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(50_000) for _ in range(PROMPT)] for _ in range(n)]


def kv_of(tokens: list[int]) -> torch.Tensor:
    return torch.ones(LAYOUT.chunk_shape(len(tokens)), dtype=LAYOUT.dtype)


def alice_hit_rate(tmp_path: Path, quotas: dict[str, str] | None, *, flood: bool) -> float:
    """Alice stores 10 prompts (160 KiB) and reads them back for 6 rounds; with ``flood``,
    bob stores 20 new prompts (320 KiB) before each round."""
    cfg = config(tmp_path, quotas)
    working = prompts(1, 10)
    rng = random.Random(2)
    hit = asked = 0
    with KVTier.open(cfg, model="m", layout=LAYOUT, tenant="alice") as alice:
        for tokens in working:
            alice.store(tokens, kv_of(tokens))
        alice.flush()
        with KVTier.open(cfg, model="m", layout=LAYOUT, tenant="bob") as bob:
            for round_ in range(6):
                if flood:
                    for tokens in prompts(100 + round_, 20):
                        bob.store(tokens, kv_of(tokens))
                    bob.flush()
                for tokens in rng.sample(working, len(working)):
                    hit += alice.retrieve(tokens)[0]
                    asked += len(tokens)
            if quotas:
                assert bob.chain.quotas["file"].used(tenant_tag("bob")) <= 256 << 10
    return 100 * hit / asked


def test_a_flooding_tenant_does_not_evict_another(tmp_path):
    quotas = {"alice": "256KiB", "bob": "256KiB"}
    alone = alice_hit_rate(tmp_path / "alone", quotas, flood=False)
    flooded = alice_hit_rate(tmp_path / "flooded", quotas, flood=True)
    assert alone > 90
    assert abs(alone - flooded) <= 5, (alone, flooded)
    # the control: without quotas the same flood evicts alice's chunks
    unfair = alice_hit_rate(tmp_path / "unfair", None, flood=True)
    assert unfair < alone - 20, (alone, unfair)


def test_ledger_keeps_each_tenant_in_its_own_lru():
    a, b = tenant_tag("a"), tenant_tag("b")
    ledger = TenantLedger({a: 10})

    def key(tag: str | None, n: int) -> str:
        ns = "m-0123456789abcdef" + (f"-{tag}" if tag else "")
        return f"{ns}.{n:032x}"

    assert tenant_of(key(a, 1)) == a and tenant_of(key(None, 1)) is None
    admitted, victims = ledger.admit([(key(a, 1), 4), (key(a, 2), 4), (key(b, 3), 100)])
    assert admitted == [True, True, True] and victims == []  # b has no quota
    ledger.touch([key(a, 1)], [4])  # 2 is now the least recently used
    admitted, victims = ledger.admit([(key(a, 4), 4), (key(a, 5), 11)])
    assert admitted == [True, False] and victims == [key(a, 2)]
    assert ledger.used(a) == 8 and ledger.over_quota == 1
    ledger.settle([key(a, 4)], [False])
    assert ledger.used(a) == 4


def test_quotas_must_fit_the_tier(tmp_path):
    cfg = config(tmp_path, {"alice": "400KiB", "bob": "400KiB"})
    with pytest.raises(ConfigError, match="more than the tier's capacity"):
        KVTier.open(cfg, model="m", layout=LAYOUT, tenant="alice")
    cfg = config(tmp_path, None)
    cfg["ops"] = {"tiers": {"disk": {"quotas": {"alice": "1KiB"}}}}
    with pytest.raises(ConfigError, match="names tier 'disk'"):
        KVTier.open(cfg, model="m", layout=LAYOUT, tenant="alice")
