"""Prometheus metrics: scraped and parsed with prometheus-client's own parser, the
values equal ``kv.stats()``; latency histograms fed by the tier-event hook; tenant
labels bounded; multiprocess mode sums processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.core import KVLayout, KVTier
from kvtier.plugins.ops import metrics as ops_metrics
from kvtier.plugins.ops.metrics import ENGINE_COUNTERS, TIER_COUNTERS, KVTierMetrics

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16


def config(tmp_path: Path) -> dict:
    return {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": "cpu://", "capacity": "64KiB"},
            {"url": f"file://{tmp_path}/kv", "capacity": "256MiB"},
        ],
    }


def prompt(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n,), generator=gen)
    return tokens, torch.randn(LAYOUT.chunk_shape(n), generator=gen).to(LAYOUT.dtype)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape of ``registry``, parsed by prometheus-client's parser."""
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def work(kv: KVTier, seed: int) -> None:
    """Stores, lookups and retrieves that hit, miss and evict (the cpu tier is small)."""
    for i in range(6):
        tokens, data = prompt(8 * CHUNK, seed * 100 + i)
        kv.store(tokens, data)
        kv.flush()
        kv.lookup(tokens)
        kv.retrieve(tokens)
    kv.retrieve(prompt(4 * CHUNK, 999)[0])  # a miss everywhere
    first = prompt(8 * CHUNK, seed * 100)[0]  # evicted from the cpu tier since
    kv.lookup(first, prefetch=True)  # moves it back up, in the background
    kv.flush()  # prefetches done


def test_scrape_equals_stats(tmp_path):
    registry = CollectorRegistry()
    exporter = KVTierMetrics(registry)
    with KVTier.open(config(tmp_path), model="m/one", layout=LAYOUT, tenant="alice") as kv:
        work(kv, 1)
        exporter.sync([kv])
        work(kv, 2)  # counters grow by deltas: a second sync must not double count
        exporter.sync([kv])
        got = samples(registry)
        stats = kv.stats()
    for tier in stats.tiers:
        for field, (name, _) in TIER_COUNTERS.items():
            assert got[(f"{name}_total", (("tier", tier.name),))] == getattr(tier, field), name
        assert got[("kvtier_tier_available", (("tier", tier.name),))] == 1.0
    labels = (("model", "m/one"), ("tenant", "alice"))
    for field, (name, _) in ENGINE_COUNTERS.items():
        assert got[(f"{name}_total", labels)] == getattr(stats, field), name
    assert stats.tier("cpu").hits > 0 and stats.tier("cpu").evictions > 0
    assert stats.prefetched > 0 and stats.prefetch_read_bytes > 0
    assert got[("kvtier_prefetch_in_flight_bytes", ())] == stats.prefetch_in_flight_bytes == 0
    assert stats.retrieve_hit_tokens == 12 * 8 * CHUNK
    assert stats.retrieve_requested_tokens == stats.retrieve_hit_tokens + 2 * 4 * CHUNK
    used, capacity = stats.usage["cpu"]
    assert got[("kvtier_tier_used_bytes", (("tier", "cpu"),))] == used > 0
    assert got[("kvtier_tier_capacity_bytes", (("tier", "cpu"),))] == capacity == 64 << 10


def test_tenants_beyond_the_cap_are_other(tmp_path):
    registry = CollectorRegistry()
    exporter = KVTierMetrics(registry, max_tenants=2)
    for tenant in ("a", "b", "c", "d"):
        with KVTier.open(config(tmp_path), model="m", layout=LAYOUT, tenant=tenant) as kv:
            tokens, data = prompt(2 * CHUNK, 1)
            kv.store(tokens, data)
            kv.flush()
            exporter.sync([kv])
    got = samples(registry)
    tenants = {dict(k[1]).get("tenant") for k in got if k[0] == "kvtier_stored_tokens_total"}
    assert tenants == {"a", "b", "other"}
    assert got[("kvtier_stored_tokens_total", (("model", "m"), ("tenant", "other")))] == 4 * CHUNK


def test_latency_histograms_come_from_the_event_hook(tmp_path):
    pytest.importorskip("kvtier.plugins.ops.plugin")
    with KVTier.open(config(tmp_path), model="m", layout=LAYOUT) as kv:
        before = samples(ops_metrics.REGISTRY)
        work(kv, 3)
        after = samples(ops_metrics.REGISTRY)
        retrieves = kv.stats().retrieves
    for kind in ("get", "put"):
        key = (f"kvtier_tier_{kind}_seconds_count", (("tier", "file"),))
        assert after[key] > before.get(key, 0.0)
    # one observation per batch: each retrieve asks the cpu tier with one get_many
    gets = ("kvtier_tier_get_seconds_count", (("tier", "cpu"),))
    assert after[gets] - before.get(gets, 0.0) == retrieves == 7


def test_multiprocess_mode_sums_the_processes(tmp_path):
    """Two processes (as vLLM's workers) write to PROMETHEUS_MULTIPROC_DIR; one scrape
    with ``scrape()`` (as ``kvtier serve`` does) sums them."""
    shared = tmp_path / "prom"
    shared.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared)}
    worker = textwrap.dedent(f"""
        import sys, torch
        from kvtier.core import KVLayout, KVTier
        from kvtier.plugins.ops.metrics import metrics
        layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
        cfg = {{"chunk_tokens": {CHUNK}, "tiers": [{{"url": "cpu://", "capacity": "1MiB"}}]}}
        with KVTier.open(cfg, model="m", layout=layout, tenant=sys.argv[1]) as kv:
            kv.store(list(range({3 * CHUNK})), torch.zeros(layout.chunk_shape({3 * CHUNK}),
                     dtype=torch.float16))
            kv.flush()
            kv.retrieve(list(range({3 * CHUNK})))
            metrics().sync([kv])
    """)
    for tenant in ("a", "b"):
        subprocess.run([sys.executable, "-P", "-c", worker, tenant], env=env, check=True,
                       timeout=120)  # fmt: skip
    reader = textwrap.dedent("""
        from kvtier.plugins.ops.metrics import scrape
        print(scrape().decode())
    """)
    out = subprocess.run([sys.executable, "-P", "-c", reader], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout  # fmt: skip
    got = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(out)
        for s in family.samples
    }
    assert got[("kvtier_tier_hits_total", (("tier", "cpu"),))] == 6
    assert got[("kvtier_tier_stored_total", (("tier", "cpu"),))] == 6
    for tenant in ("a", "b"):
        key = ("kvtier_retrieve_hit_tokens_total", (("model", "m"), ("tenant", tenant)))
        assert got[key] == 3 * CHUNK
    # the workers exited: their live gauges left the sums, their counters stay
    assert got.get(("kvtier_tier_used_bytes", (("tier", "cpu"),)), 0) == 0
    assert not list(shared.glob("gauge_live*"))
