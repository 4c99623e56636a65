"""Layer-by-layer retrieves (``KVTier.retrieve_layers``): layered blobs stream from tiers
that read byte ranges (real file and redis tiers), layer ``i`` handed over once its
section passed its digest and before layer ``i + 1`` is read; everything else is read
whole and handed over layer by layer. Broken streams (damage, a tier that stops, a
blob gone) are read from the tiers below from the layer they stopped at, and nothing
unchecked is ever handed over."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier.core import KVLayout, KVTier
from kvtier.core import blob as fmt
from kvtier.core.errors import ConfigError
from kvtier.core.retrieval import Wanted

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
CHUNK = 16


def prompt(n: int, seed: int = 0) -> tuple[list[int], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n,), generator=gen).tolist()
    return tokens, torch.randn(LAYOUT.chunk_shape(n), generator=gen)


def tier(kind: str, tmp_path: Path, request: pytest.FixtureRequest, name: str = "kv") -> dict:
    if kind == "file":
        return {"url": f"file://{tmp_path / name}", "capacity": "64MiB"}
    return {"url": request.getfixturevalue("valkey_server").url}


def open_kv(*tiers: dict, **top: Any) -> KVTier:
    cfg = {"chunk_tokens": CHUNK, "blob_layout": "layers", "tiers": list(tiers), **top}
    return KVTier.open(cfg, model="layers-model", layout=LAYOUT)


class Receiver:
    """What a retrieve_layers caller sees: the KV handed over and the order of events."""

    def __init__(self, n: int, on_deliver: Callable[[int, int], None] | None = None) -> None:
        self.kv = torch.zeros(LAYOUT.chunk_shape(n))
        self.events: list[tuple[str, int]] = []
        self.lock = threading.Lock()
        self.on_deliver = on_deliver

    def sink(self, request: int, first: int, layer: int, kv: torch.Tensor) -> None:
        with self.lock:
            self.kv[layer, :, first : first + kv.shape[1]] = kv
            self.events.append(("deliver", layer))
        if self.on_deliver is not None:
            self.on_deliver(first, layer)

    def done(self, layer: int) -> None:
        with self.lock:
            self.events.append(("done", layer))

    def layers_in_order(self) -> bool:
        """Every delivery of layer ``i`` after ``done(i - 1)`` and before ``done(i)``."""
        current = 0
        for kind, layer in self.events:
            if kind == "deliver" and layer != current:
                return False
            if kind == "done":
                if layer != current:
                    return False
                current += 1
        return current == LAYOUT.num_layers


@pytest.mark.parametrize("kind", ["file", "redis"])
def test_layered_blobs_stream_layer_by_layer_from_ranged_tiers(kind, tmp_path, request):
    tokens, kv = prompt(4 * CHUNK + 3)
    slow = tier(kind, tmp_path, request)
    with open_kv(slow) as cache:
        cache.store(tokens, kv)
    with open_kv(slow) as cache:
        got = Receiver(len(tokens))
        assert cache.retrieve_layers([Wanted(tokens)], got.sink, got.done) == [4 * CHUNK]
        stats = cache.stats().tiers[0]
    assert torch.equal(got.kv[:, :, : 4 * CHUNK], kv[:, :, : 4 * CHUNK])
    assert got.layers_in_order()
    assert (stats.hits, stats.misses, stats.corrupt) == (4, 0, 0)


def test_a_layer_is_handed_over_before_the_blob_is_read_whole(tmp_path, request):
    """Layer ``i + 1`` is read while layer ``i`` is handed over, layer ``i + 2`` after.
    Damage layer 2's sections on disk while layer 0 is being handed over: had they been
    read already, the damage would go unseen; it is caught, and the chunks count as not
    delivered (no tier below holds them)."""
    tokens, kv = prompt(2 * CHUNK)
    slow = tier("file", tmp_path, request)
    with open_kv(slow) as cache:
        cache.store(tokens, kv)
    files = sorted(p for p in (tmp_path / "kv").rglob("*") if p.is_file())
    assert len(files) == 2

    def damage_layer_2(first: int, layer: int) -> None:
        if layer == 0 and first == 0:
            for path in files:  # in place: layer 1's reads may be under way
                offset = fmt.verify(path.read_bytes()).section(2)[0]
                with path.open("r+b") as f:
                    f.seek(offset)
                    byte = f.read(1)[0]
                    f.seek(offset)
                    f.write(bytes([byte ^ 0xFF]))

    with open_kv(slow) as cache:
        got = Receiver(len(tokens), damage_layer_2)
        assert cache.retrieve_layers([Wanted(tokens)], got.sink, got.done) == [0]
        assert cache.stats().tiers[0].corrupt == 2
    assert torch.equal(got.kv[:2], kv[:2]) and not got.kv[2:].any()
    assert not any(path.exists() for path in files), "the corrupt blobs were deleted"


@pytest.mark.parametrize("where", ["section", "head"])
def test_a_damaged_blob_is_read_from_the_tier_below_from_where_it_broke(where, tmp_path, request):
    tokens, kv = prompt(3 * CHUNK)
    upper = tier("file", tmp_path, request, "upper")
    lower = tier("file", tmp_path, request, "lower")
    with open_kv(upper, lower) as cache:
        cache.store(tokens, kv)
    victim = sorted(p for p in (tmp_path / "upper").rglob("*") if p.is_file())[0]
    data = bytearray(victim.read_bytes())
    header = fmt.verify(data)
    data[header.section(2)[0] if where == "section" else fmt.framing.PREFIX.size + 2] ^= 0x10
    victim.write_bytes(data)
    with open_kv(upper, lower) as cache:
        got = Receiver(len(tokens))
        assert cache.retrieve_layers([Wanted(tokens)], got.sink, got.done) == [3 * CHUNK]
        up, low = cache.stats().tiers
    assert torch.equal(got.kv, kv)
    assert got.layers_in_order()
    assert up.corrupt == 1 and low.hits == 1
    assert fmt.verify(victim.read_bytes()).key == header.key  # deleted, then promoted anew


def test_a_tier_that_stops_mid_stream_is_replaced_by_the_one_below(tmp_path, request):
    tokens, kv = prompt(2 * CHUNK)
    server = request.getfixturevalue("valkey_server")
    upper, lower = {"url": server.url, "timeout": 2}, tier("file", tmp_path, request)
    with open_kv(upper, lower) as cache:
        cache.store(tokens, kv)

    def stop_after_layer_0(first: int, layer: int) -> None:
        if layer == 0 and first == 0:
            server.stop()

    with open_kv(upper, lower, retry_after=60) as cache:
        got = Receiver(len(tokens), stop_after_layer_0)
        assert cache.retrieve_layers([Wanted(tokens)], got.sink, got.done) == [2 * CHUNK]
        up, low = cache.stats().tiers
    assert torch.equal(got.kv, kv)
    assert got.layers_in_order()
    assert up.errors >= 1 and low.hits == 2


def test_whole_chunk_blobs_and_in_process_tiers_are_handed_over_layer_by_layer(tmp_path, request):
    tokens, kv = prompt(4 * CHUNK)
    slow = tier("file", tmp_path, request)
    cfg = {"chunk_tokens": CHUNK, "tiers": [slow]}
    with KVTier.open(cfg, model="layers-model", layout=LAYOUT) as cache:  # chunk layout
        cache.store(tokens[: 2 * CHUNK], kv[:, :, : 2 * CHUNK])
    with open_kv({"url": "cpu://", "capacity": "64MiB"}, slow) as cache:
        cache.store(tokens, kv[:, :, 2 * CHUNK :], start=2 * CHUNK)  # layered, cpu and file
        cache.flush()
        got = Receiver(len(tokens))
        assert cache.retrieve_layers([Wanted(tokens)], got.sink, got.done) == [4 * CHUNK]
        cpu, file = cache.stats().tiers
    assert torch.equal(got.kv, kv)
    assert got.layers_in_order()
    assert cpu.hits == 2 and file.hits == 2  # chunks 0-1 from file, whole (format 1)


def test_streamed_chunks_are_promoted_to_the_faster_tiers(tmp_path, request):
    tokens, kv = prompt(3 * CHUNK)
    slow = tier("redis", tmp_path, request)
    cpu = {"url": "cpu://", "capacity": "64MiB"}
    with open_kv(slow) as cache:
        cache.store(tokens, kv)
    with open_kv(cpu, slow) as cache:
        got = Receiver(len(tokens))
        assert cache.retrieve_layers([Wanted(tokens)], got.sink, got.done) == [3 * CHUNK]
        cache.flush()
        again = Receiver(len(tokens))
        assert cache.retrieve_layers([Wanted(tokens)], again.sink, again.done) == [3 * CHUNK]
        ram, _ = cache.stats().tiers
    assert ram.hits == 3 and torch.equal(again.kv, kv)


def test_signed_layered_blobs_stream_and_forged_ones_are_refused(tmp_path, request):
    tokens, kv = prompt(2 * CHUNK)
    slow = tier("file", tmp_path, request)
    (tmp_path / "keys").write_text("ab" * 32 + "\n")
    (tmp_path / "other").write_text("cd" * 32 + "\n")
    with open_kv(slow, integrity={"keys_file": str(tmp_path / "other")}) as forger:
        forger.store(tokens, kv)
    with open_kv(slow, integrity={"keys_file": str(tmp_path / "keys")}) as cache:
        got = Receiver(len(tokens))
        assert cache.retrieve_layers([Wanted(tokens)], got.sink, got.done) == [0]
        assert cache.stats().tiers[0].corrupt == 2
        assert not got.kv.any(), "nothing forged was handed over"
        cache.store(tokens, kv)
        cache.flush()
    with open_kv(slow, integrity={"keys_file": str(tmp_path / "keys")}) as cache:
        got = Receiver(len(tokens))
        assert cache.retrieve_layers([Wanted(tokens)], got.sink, got.done) == [2 * CHUNK]
    assert torch.equal(got.kv, kv)


def test_several_prompts_in_one_call_each_get_their_own_run(tmp_path, request):
    tokens, kv = prompt(3 * CHUNK)
    other, _ = prompt(2 * CHUNK, seed=9)
    slow = tier("file", tmp_path, request)
    with open_kv(slow) as cache:
        cache.store(tokens, kv)
        cache.flush()
        got = Receiver(len(tokens))
        wanted = [Wanted(other), Wanted(tokens, (), CHUNK), Wanted(tokens[: 2 * CHUNK])]
        assert cache.retrieve_layers(wanted, got.sink, got.done) == [0, 3 * CHUNK, 2 * CHUNK]
        engine = cache.stats()
    assert torch.equal(got.kv, kv)
    assert engine.retrieves == 3


def test_a_sink_error_propagates_and_bad_arguments_read_nothing(tmp_path, request):
    tokens, kv = prompt(2 * CHUNK)
    slow = tier("file", tmp_path, request)
    with open_kv(slow) as cache:
        cache.store(tokens, kv)
        cache.flush()

        def fails(request: int, first: int, layer: int, kv: torch.Tensor) -> None:
            raise RuntimeError("the engine's copy failed")

        with pytest.raises(RuntimeError, match="copy failed"):
            cache.retrieve_layers([Wanted(tokens)], fails, lambda layer: None)
        with pytest.raises(ConfigError, match="start must be a multiple"):
            cache.retrieve_layers([Wanted(tokens, (), 3)], Receiver(1).sink, lambda layer: None)
        with pytest.raises(ConfigError, match="callables"):
            cache.retrieve_layers([Wanted(tokens)], None, lambda layer: None)  # type: ignore[arg-type]
        assert cache.lookup(tokens) == 2 * CHUNK  # nothing was deleted


@pytest.mark.parametrize("layered", [True, False], ids=["streamed", "read whole"])
def test_a_checked_blob_of_another_shape_is_corrupt_and_never_handed_over(
    layered, tmp_path, request
):
    """A blob intact by its checksum but holding a chunk of another shape under the
    key (half the tokens here) is a corrupt blob: deleted, never handed over."""
    from kvtier.core.buffers import default_pool
    from kvtier.core.codecs.pipeline import CodecPipeline
    from kvtier.core.plugins import get_registry

    tokens, kv = prompt(CHUNK)
    with open_kv(tier("file", tmp_path, request)) as cache:
        (key,) = [str(k) for k in cache.hasher.keys(tokens)]
        pipeline = CodecPipeline.from_config("raw", get_registry(), layered=layered)
        backend = cache.chain.tiers[0].backend
        with pipeline.encode(key, kv[:, :, : CHUNK // 2], default_pool()) as blob:
            assert cache._io.run(backend.put_many([(key, blob.buf)])) == [True]
        got = Receiver(len(tokens))
        assert cache.retrieve_layers([Wanted(tokens)], got.sink, got.done) == [0]
        assert cache.stats().tiers[0].corrupt == 1
        assert cache._io.run(backend.contains_many([key])) == [False]
    assert not any(kind == "deliver" for kind, _ in got.events)
    assert got.events == [("done", layer) for layer in range(LAYOUT.num_layers)]


@pytest.mark.parametrize("blob_layout", ["chunk", "layers"])
def test_other_codecs_are_decoded_whole_or_layer_by_layer(blob_layout, tmp_path, request):
    """int8 chunks: whole-chunk blobs decoded once when read, layered ones per layer."""
    tokens, kv = prompt(3 * CHUNK)
    slow = {**tier("file", tmp_path, request), "codec": "int8"}
    with open_kv(slow, blob_layout=blob_layout) as cache:
        cache.store(tokens, kv)
        cache.flush()
        got = Receiver(len(tokens))
        assert cache.retrieve_layers([Wanted(tokens)], got.sink, got.done) == [3 * CHUNK]
        n, whole = cache.retrieve(tokens)
    assert n == 3 * CHUNK and torch.equal(got.kv, whole)  # the same decode either way
    assert (got.kv - kv).abs().max() < 0.05
    assert got.layers_in_order()
