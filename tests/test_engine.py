"""KVTier end to end over real cpu and file tiers: store, lookup, retrieve, promotion,
codecs per tier, corruption, dropped stores, failing tiers, hooks."""

from __future__ import annotations

import gc
import sys
import time
import weakref
from pathlib import Path

import pytest
import torch

from kvtier.core import KVLayout, KVTier, load_config
from kvtier.core.errors import ConfigError
from kvtier.core.plugins import PluginRegistry

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16


def config(tmp_path: Path, **top) -> dict:
    return {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": "cpu://", "capacity": "64MiB"},
            {"url": f"file://{tmp_path}/kv", "capacity": "256MiB"},
        ],
        **top,
    }


def prompt(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n,), generator=gen)
    kv = torch.randn(LAYOUT.chunk_shape(n), generator=gen).to(LAYOUT.dtype)
    return tokens, kv


def open_kv(cfg, **kw) -> KVTier:
    return KVTier.open(cfg, model="test-model", layout=LAYOUT, **kw)


def test_round_trip_through_the_chain(tmp_path):
    tokens, kv = prompt(5 * CHUNK + 7)
    with open_kv(config(tmp_path)) as cache:
        assert cache.lookup(tokens) == 0
        assert cache.store(tokens, kv) == 5 * CHUNK, "the trailing partial chunk is not stored"
        cache.flush()
        assert cache.lookup(tokens) == 5 * CHUNK
        n, got = cache.retrieve(tokens)
        assert n == 5 * CHUNK and torch.equal(got, kv[:, :, :n])
        stats = cache.stats()
        assert stats.tier("cpu").stored == 5 and stats.tier("file").stored == 5
        assert stats.tier("cpu").hits == 5 and stats.tier("file").hits == 0
        assert stats.tier("cpu").bytes_out == stats.tier("cpu").bytes_in > 5 * CHUNK * 256


def test_prefix_sharing_and_divergence(tmp_path):
    tokens, kv = prompt(4 * CHUNK)
    with open_kv(config(tmp_path)) as cache:
        cache.store(tokens, kv)
        cache.flush()
        other = tokens.clone()
        other[2 * CHUNK + 3] += 1
        assert cache.lookup(other) == 2 * CHUNK
        n, got = cache.retrieve(other)
        assert n == 2 * CHUNK and torch.equal(got, kv[:, :, :n])
        longer = torch.cat([tokens, tokens[:CHUNK]])
        assert cache.lookup(longer) == 4 * CHUNK


def test_restart_serves_from_disk_and_promotes(tmp_path):
    tokens, kv = prompt(3 * CHUNK)
    with open_kv(config(tmp_path)) as cache:
        cache.store(tokens, kv)
    with open_kv(config(tmp_path)) as cache:
        n, got = cache.retrieve(tokens)
        assert n == 3 * CHUNK and torch.equal(got, kv)
        stats = cache.stats()
        assert (stats.tier("cpu").misses, stats.tier("file").hits) == (3, 3)
        cache.flush()  # waits for the promotion
        n, got = cache.retrieve(tokens)
        assert torch.equal(got, kv)
        assert cache.stats().tier("cpu").hits == 3, "promoted chunks are served from RAM"


def test_lookup_is_side_effect_free(tmp_path):
    tokens, kv = prompt(2 * CHUNK)
    with open_kv(config(tmp_path)) as cache:
        cache.store(tokens, kv)
        cache.flush()
        before = cache.stats().as_dict()
        assert cache.lookup(tokens) == 2 * CHUNK
        after = cache.stats().as_dict()
        for b, a in zip(before["tiers"], after["tiers"], strict=True):
            assert (a["hits"], a["misses"], a["stored"]) == (b["hits"], b["misses"], b["stored"])


def test_per_tier_codecs(tmp_path):
    cfg = config(tmp_path)
    cfg["tiers"][1]["codec"] = "int8+zstd"
    tokens, kv = prompt(2 * CHUNK)
    with open_kv(cfg) as cache:
        cache.store(tokens, kv)
        cache.flush()
        stats = cache.stats()
        assert (
            stats.tier("file").bytes_in < 0.7 * stats.tier("cpu").bytes_in
        )  # int8: 20 of 32 B per head
    with open_kv(cfg) as cache:
        n, got = cache.retrieve(tokens)
        assert n == 2 * CHUNK
        err = (got.float() - kv.float()).pow(2).mean().sqrt() / kv.float().pow(2).mean().sqrt()
        assert err < 0.01, f"int8 relative RMSE {err:.4f}"


def test_corrupt_file_is_a_miss_and_is_removed(tmp_path):
    tokens, kv = prompt(3 * CHUNK)
    with open_kv(config(tmp_path)) as cache:
        cache.store(tokens, kv)
    files = sorted(p for p in (tmp_path / "kv").rglob("*") if p.is_file() and ".tmp" not in p.parts)
    assert len(files) == 3
    # Flip one byte in the middle of chunk 1's file (found by its key).
    with open_kv(config(tmp_path)) as cache:
        key1 = str(cache.hasher.keys(tokens)[1])
    victim = next(p for p in files if p.name == key1)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40
    victim.write_bytes(bytes(data))
    with open_kv(config(tmp_path)) as cache:
        n, got = cache.retrieve(tokens)
        assert n == CHUNK and torch.equal(got, kv[:, :, :CHUNK])
        assert cache.stats().tier("file").corrupt == 1
    assert not victim.exists(), "the corrupt blob was deleted"


def test_truncated_and_foreign_blobs_are_misses(tmp_path):
    tokens, kv = prompt(2 * CHUNK)
    other_tokens, other_kv = prompt(2 * CHUNK, seed=1)
    with open_kv(config(tmp_path)) as cache:
        cache.store(tokens, kv)
        cache.store(other_tokens, other_kv)
        keys = [str(k) for k in cache.hasher.keys(tokens)]
        other_keys = [str(k) for k in cache.hasher.keys(other_tokens)]
    root = tmp_path / "kv"
    path = {p.name: p for p in root.rglob("*") if p.is_file()}
    path[keys[0]].write_bytes(path[keys[0]].read_bytes()[:-100])  # truncated
    path[keys[1]].write_bytes(path[other_keys[1]].read_bytes())  # a valid blob of another key
    with open_kv(config(tmp_path)) as cache:
        assert cache.retrieve(tokens)[0] == 0
        assert cache.stats().tier("file").corrupt == 2  # both are checked and removed
        n, got = cache.retrieve(other_tokens)
        assert n == 2 * CHUNK and torch.equal(got, other_kv)
    with open_kv(config(tmp_path)) as cache:
        assert cache.lookup(tokens) == 0


def test_full_store_queue_drops_instead_of_blocking(tmp_path):
    tokens, kv = prompt(8 * CHUNK)
    chunk_bytes = CHUNK * LAYOUT.bytes_per_token()
    with open_kv(config(tmp_path, store_queue_bytes=3 * chunk_bytes)) as cache:
        accepted = cache.store(tokens, kv)
        assert CHUNK * 3 <= accepted < 8 * CHUNK or accepted == 8 * CHUNK
        stats = cache.stats()
        assert stats.stores_dropped == (8 * CHUNK - accepted) // CHUNK
        cache.flush()
        assert cache.lookup(tokens) == accepted


def test_tenants_and_models_never_share(tmp_path):
    tokens, kv = prompt(2 * CHUNK)
    with open_kv(config(tmp_path), tenant="alice") as cache:
        cache.store(tokens, kv)
    with open_kv(config(tmp_path), tenant="bob") as cache:
        assert cache.lookup(tokens) == 0
    with open_kv(config(tmp_path)) as cache:
        assert cache.lookup(tokens) == 0
    with KVTier.open(config(tmp_path), model="other", layout=LAYOUT, tenant="alice") as cache:
        assert cache.lookup(tokens) == 0
    with open_kv(config(tmp_path), tenant="alice") as cache:
        assert cache.lookup(tokens) == 2 * CHUNK


def test_bad_input_is_a_clear_error(tmp_path):
    tokens, kv = prompt(2 * CHUNK)
    with open_kv(config(tmp_path)) as cache:
        with pytest.raises(ConfigError, match="expects"):
            cache.store(tokens[:-1], kv)
        with pytest.raises(ConfigError, match="expects"):
            cache.store(tokens, kv.float())
    with pytest.raises(ConfigError, match="capacity"):
        open_kv({"tiers": [{"url": "cpu://"}]})
    with pytest.raises(ConfigError, match="did you mean 'cpu'"):
        open_kv({"tiers": [{"url": "cpv://", "capacity": 1}]})
    with pytest.raises(ConfigError, match="unknown codec"):
        open_kv({"tiers": [{"url": "cpu://", "capacity": 1, "codec": "int9"}]})
    cache = open_kv(config(tmp_path))
    cache.close()
    with pytest.raises(ConfigError, match="closed"):
        cache.lookup(tokens)


def test_retrieve_into_a_caller_buffer(tmp_path):
    tokens, kv = prompt(2 * CHUNK)
    out = torch.zeros(LAYOUT.chunk_shape(3 * CHUNK), dtype=LAYOUT.dtype)
    with open_kv(config(tmp_path)) as cache:
        cache.store(tokens, kv)
        cache.flush()
        n, got = cache.retrieve(tokens, out=out)
        assert n == 2 * CHUNK and got.data_ptr() == out.data_ptr()
        assert torch.equal(out[:, :, :n], kv)


def test_sha256_cbor_keys_and_partial_chunks(tmp_path):
    tokens, kv = prompt(2 * CHUNK + 5)
    cfg = config(tmp_path, hash="sha256_cbor", store_partial_chunks=True)
    with open_kv(cfg) as cache:
        assert cache.store(tokens, kv) == 2 * CHUNK + 5
        cache.flush()
        n, got = cache.retrieve(tokens)
        assert n == 2 * CHUNK + 5 and torch.equal(got, kv)


# -- plugins: hooks, failing and slow tiers -------------------------------------------

FLAKY_PLUGIN = """
    import asyncio
    from kvtier.core import hookimpl, BackendSpec, BackendUnavailableError, PutMode
    from kvtier.backends.memory import MemoryBackend, MemoryOptions

    STATE = {"down": False, "delay": 0.0, "configured": [], "events": []}

    class FlakyBackend(MemoryBackend):
        def __init__(self, url, options, **kw):
            super().__init__("cpu://flaky", options, **kw)
            self.url = url

        async def _gate(self):
            if STATE["delay"]:
                await asyncio.sleep(STATE["delay"])
            if STATE["down"]:
                raise BackendUnavailableError("flaky server is down")

        async def get_many(self, keys):
            await self._gate()
            return await super().get_many(keys)

        async def put_many(self, items, mode=PutMode.OVERWRITE):
            await self._gate()
            return await super().put_many(items, mode)

        async def contains_many(self, keys):
            await self._gate()
            return await super().contains_many(keys)

    @hookimpl
    def kvtier_backends():
        spec = BackendSpec(name="flaky", schemes=("flaky",), cls=FlakyBackend,
                           options=MemoryOptions)
        return [spec]

    @hookimpl
    def kvtier_configure(config):
        STATE["configured"].append(config.chunk_tokens)
        if config.tenant == "rejected":
            from kvtier.core.errors import ConfigError
            raise ConfigError("tenant 'rejected' is not allowed by the flaky plugin")

    @hookimpl
    def kvtier_tier_event(event):
        STATE["events"].append((event.kind.value, event.tier, event.count))
"""


@pytest.fixture
def flaky(fake_dist):
    fake_dist("kvtier-flaky", {"flaky": "flaky_plugin"}, {"flaky_plugin": FLAKY_PLUGIN})
    registry = PluginRegistry()
    return registry, sys.modules["flaky_plugin"].STATE


def flaky_config(tmp_path, **tier):
    return {
        "chunk_tokens": CHUNK,
        "retry_after": 0.2,
        "tiers": [
            {"url": "cpu://", "capacity": "64MiB", "promote": False},
            {"url": "flaky://", "capacity": "64MiB", "timeout": 0.5, **tier},
            {"url": f"file://{tmp_path}/kv", "capacity": "64MiB"},
        ],
    }


def test_failing_tier_is_skipped_and_used_again_when_back(tmp_path, flaky):
    registry, state = flaky
    tokens, kv = prompt(2 * CHUNK)
    with open_kv(flaky_config(tmp_path), registry=registry) as cache:
        state["down"] = True
        assert cache.store(tokens, kv) == 2 * CHUNK
        cache.flush()
        assert cache.lookup(tokens) == 2 * CHUNK
        n, got = cache.retrieve(tokens)
        assert n == 2 * CHUNK and torch.equal(got, kv)
        stats = cache.stats().tier("flaky")
        assert stats.errors >= 1 and not stats.available and stats.stored == 0
        state["down"] = False
        time.sleep(0.3)
        tokens2, kv2 = prompt(2 * CHUNK, seed=5)
        cache.store(tokens2, kv2)
        cache.flush()
        stats = cache.stats().tier("flaky")
        assert stats.available and stats.stored == 2, "the tier is used again once it is back"


def test_slow_tier_is_bounded_by_its_timeout(tmp_path, flaky):
    registry, state = flaky
    tokens, kv = prompt(CHUNK)
    with open_kv(flaky_config(tmp_path), registry=registry) as cache:
        state["delay"] = 2.0
        start = time.perf_counter()
        cache.store(tokens, kv)
        cache.flush()
        assert cache.lookup(tokens) == CHUNK
        assert time.perf_counter() - start < 1.9
        assert cache.stats().tier("flaky").errors >= 1
        state["delay"] = 0.0


def test_configure_and_event_hooks(tmp_path, flaky):
    registry, state = flaky
    tokens, kv = prompt(2 * CHUNK)
    with open_kv(flaky_config(tmp_path), registry=registry) as cache:
        cache.store(tokens, kv)
        cache.flush()
        cache.retrieve(tokens)
        cache.retrieve(prompt(CHUNK, seed=9)[0])
    assert state["configured"][-1] == CHUNK
    events = state["events"]
    assert ("stored", "flaky", 2) in events and ("stored", "file", 2) in events
    assert ("hit", "cpu", 2) in events
    assert ("miss", "file", 1) in events
    with pytest.raises(ConfigError, match="not allowed by the flaky plugin"):
        open_kv(flaky_config(tmp_path), registry=registry, tenant="rejected")


def test_evictions_are_counted_and_reported(tmp_path, flaky):
    registry, state = flaky
    cfg = flaky_config(tmp_path)
    cfg["tiers"][0]["capacity"] = 3 * CHUNK * LAYOUT.bytes_per_token() + 4096
    tokens, kv = prompt(8 * CHUNK)
    with open_kv(cfg, registry=registry) as cache:
        cache.store(tokens, kv)
        cache.flush()
        stats = cache.stats().tier("cpu")
        assert stats.evictions >= 5 and stats.stored == 8
    assert any(kind == "evicted" and tier == "cpu" for kind, tier, _ in state["events"])


def test_write_back_tier_receives_evicted_chunks(tmp_path):
    cfg = config(tmp_path)
    cfg["tiers"][0]["capacity"] = 3 * (CHUNK * LAYOUT.bytes_per_token() + 1024)  # 3 blobs
    cfg["tiers"][1]["write_policy"] = "back"
    tokens, kv = prompt(8 * CHUNK)
    with open_kv(cfg) as cache:
        cache.store(tokens, kv)
        cache.flush()
        assert cache.stats().tier("cpu").evictions == 5
    with open_kv(cfg) as cache:
        assert cache.lookup(tokens) == 5 * CHUNK, "the 5 evicted chunks were demoted to disk"
        n, got = cache.retrieve(tokens)
        assert torch.equal(got, kv[:, :, :n])


def test_write_back_needs_a_tier_that_hands_over_evictions(tmp_path):
    cfg = {
        "tiers": [
            {"url": f"file://{tmp_path}/a", "capacity": "1MiB"},
            {"url": "cpu://", "capacity": "1MiB", "write_policy": "back"},
        ]
    }
    with pytest.raises(ConfigError, match="cannot hand over the chunks it evicts"):
        open_kv(cfg)


def test_codec_that_cannot_handle_the_layout_fails_at_open(tmp_path):
    odd = KVLayout(num_layers=1, num_kv_heads=1, head_dim=15, dtype=torch.float16)
    cfg = {"tiers": [{"url": "cpu://", "capacity": "1MiB", "codec": "int4"}]}
    with pytest.raises(ConfigError, match=r"tier 'cpu' \(cpu://\): codec 'int4'"):
        KVTier.open(cfg, model="m", layout=odd)


def test_opening_keeps_no_config_alive(tmp_path):
    """The configure hook is not historic: a registry opened against many times keeps
    none of the configs of closed chains."""
    registry = PluginRegistry()
    cfg = load_config(config(tmp_path))
    ref = weakref.ref(cfg)
    for _ in range(3):
        open_kv(cfg, registry=registry).close()
    del cfg
    gc.collect()
    assert ref() is None, "a closed KVTier's config is still referenced"
