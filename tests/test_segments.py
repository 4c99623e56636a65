"""Position-independent segments in kvtier.core: keys, canonical positions, re-rotation."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
import torch

from kvtier.core import ConfigError, KVLayout, KVTier
from kvtier.core import blob as fmt
from kvtier.core.keys import ChunkKey
from kvtier.core.segments import split_on_separator
from kvtier.kernels.rope import RotaryConfig, rerotate_

CHUNK = 32
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32)
ROPE = RotaryConfig(head_dim=16, rotary_dim=16, theta=10000.0, max_positions=4096)


def config(tmp_path: Path | None = None, **extra: object) -> dict[str, object]:
    tiers: list[dict[str, object]] = [{"url": "cpu://", "capacity": "64MiB"}]
    if tmp_path is not None:
        tiers.append({"url": f"file://{tmp_path}/kv", "capacity": "64MiB", "codec": "int8"})
    return {"chunk_tokens": CHUNK, "tiers": tiers, **extra}


def open_kv(cfg: dict[str, object], **kwargs: object) -> KVTier:
    return KVTier.open(cfg, model=str(kwargs.pop("model", "m")), layout=LAYOUT,
                       rotary=kwargs.pop("rotary", ROPE), **kwargs)  # type: ignore[arg-type]  # fmt: skip


class Text:
    """Segments with a fixed 'true' KV per token: keys unrotated (``raw``) and values."""

    def __init__(self, *lengths: int, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.tokens = [torch.randint(0, 30000, (n,), generator=gen).tolist() for n in lengths]
        self.raw = [torch.randn(2, 2, n, 2, 16, generator=gen) for n in lengths]

    def kv(self, order: list[int], positions: list[int]) -> torch.Tensor:
        """The KV of segments ``order`` back to back, keys at ``positions``."""
        parts = []
        for i, start in zip(order, positions, strict=True):
            part = self.raw[i].clone()
            rerotate_(part[:, 0], 0, start, ROPE)
            parts.append(part)
        return torch.cat(parts, dim=2)

    def segments(self, order: list[int]) -> list[list[int]]:
        return [self.tokens[i] for i in order]


def back_to_back(lengths: list[int], start: int = 0) -> list[int]:
    positions = []
    for n in lengths:
        positions.append(start)
        start += n
    return positions


def test_segments_are_found_in_any_order_and_rotated_to_their_new_positions():
    text = Text(100, 70, 64)
    with open_kv(config()) as kv:
        order = [0, 1, 2]
        stored = kv.store_segments(text.segments(order), text.kv(order, [0, 100, 170]))
        assert stored == [100, 70, 64]
        kv.flush()
        new = [2, 0, 1]
        positions = back_to_back([64, 100, 70], start=500)
        assert kv.lookup_segments(text.segments(new)) == [64, 100, 70]
        hits, got = kv.retrieve_segments(text.segments(new), positions)
        assert hits == [64, 100, 70]
        expected = text.kv(new, positions)
        assert float((got[:, 0] - expected[:, 0]).abs().max()) <= 1e-5
        assert torch.equal(got[:, 1], expected[:, 1])  # values never move


def test_partial_hits_short_segments_and_gaps():
    text = Text(80, 90, 10, 64)
    with open_kv(config()) as kv:
        assert kv.store_segments(text.segments([0, 2]), text.kv([0, 2], [0, 80])) == [80, 0]
        kv.flush()
        # segment 2 (10 tokens) is shorter than min_tokens (64): never cached
        assert kv.lookup_segments(text.segments([1, 0, 2, 3])) == [0, 80, 0, 0]
        positions = [0, 200, 400, 1000]  # gaps between segments are allowed
        hits, got = kv.retrieve_segments(text.segments([1, 0, 2, 3]), positions)
        assert hits == [0, 80, 0, 0] and got.shape[2] == 90 + 80 + 10 + 64
        expected = text.kv([0], [200])
        assert float((got[:, :, 90:170] - expected).abs().max()) <= 1e-5


def test_min_tokens_is_configurable():
    text = Text(20)
    with open_kv(config(segments={"min_tokens": 16})) as kv:
        assert kv.store_segments(text.segments([0]), text.kv([0], [0])) == [20]
        kv.flush()
        assert kv.lookup_segments(text.segments([0])) == [20]


def test_long_segments_are_chained_chunks_with_their_canonical_start(tmp_path):
    text = Text(3 * CHUNK + 5)
    with open_kv(config(tmp_path)) as kv:
        kv.store_segments(text.segments([0]), text.kv([0], [300]), positions=[300])
        kv.flush()
        store = kv.chain.tiers[0].backend.store  # type: ignore[attr-defined]
        with store.lock:
            blobs = {key: bytes(buf.view) for key, buf in store.blobs.items()}
        starts = sorted(fmt.parse(b).segment_start for b in blobs.values())
        assert starts == [0, CHUNK, 2 * CHUNK, 3 * CHUNK]
        shapes = sorted(fmt.parse(b).shape[2] for b in blobs.values())
        assert shapes == [5, CHUNK, CHUNK, CHUNK]
        # the int8 file tier got recoded copies that still say so
        files = sorted((tmp_path / "kv").rglob("*-seg.*"))
        assert len(files) == 4
        recoded = [fmt.verify(f.read_bytes()) for f in files]
        assert {h.pipeline for h in recoded} == {"int8"}
        assert sorted(h.segment_start for h in recoded) == starts  # type: ignore[type-var]
        # canonical positions: stored keys are those at 0..n-1
        hits, got = kv.retrieve_segments(text.segments([0]), [0])
        assert hits == [3 * CHUNK + 5]
        assert float((got - text.raw[0]).abs().max()) <= 1e-5


def test_signed_segment_blobs_keep_their_canonical_start(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGMENT_TEST_KEYS", secrets.token_hex(16))
    cfg = {
        "chunk_tokens": CHUNK,
        "tiers": [{"url": f"file://{tmp_path}/kv", "capacity": "64MiB"}],
        "integrity": {"keys_env": "SEGMENT_TEST_KEYS"},
    }
    text = Text(2 * CHUNK + 5)
    with open_kv(cfg) as kv:
        kv.store_segments(text.segments([0]), text.kv([0], [40]), positions=[40])
        kv.flush()
    headers = [fmt.parse(f.read_bytes()) for f in (tmp_path / "kv").rglob("*-seg.*")]
    assert all(h.signed for h in headers)
    assert sorted(h.segment_start for h in headers) == [0, CHUNK, 2 * CHUNK]  # type: ignore[type-var]
    with open_kv(cfg) as kv:  # a new process: read back from the file tier, verified
        hits, got = kv.retrieve_segments(text.segments([0]), [0])
        assert hits == [2 * CHUNK + 5]
        assert float((got - text.raw[0]).abs().max()) <= 1e-5


def test_a_partly_stored_segment_is_a_partial_hit(tmp_path):
    text = Text(3 * CHUNK)
    with open_kv(config()) as kv:
        kv.store_segments(text.segments([0]), text.kv([0], [0]))
        kv.flush()
        store = kv.chain.tiers[0].backend.store  # type: ignore[attr-defined]
        last = max(store.blobs, key=lambda k: fmt.parse(store.blobs[k].view).segment_start)
        kv.chain.tiers[0].backend.store.delete_many([last])  # type: ignore[attr-defined]
        assert kv.lookup_segments(text.segments([0])) == [2 * CHUNK]
        hits, _ = kv.retrieve_segments(text.segments([0]), [7])
        assert hits == [2 * CHUNK]


def test_a_corrupt_segment_blob_is_a_miss_and_deleted(tmp_path):
    text = Text(CHUNK * 2)
    cfg = {"chunk_tokens": CHUNK, "tiers": [{"url": f"file://{tmp_path}/kv", "capacity": "8MiB"}]}
    with open_kv(cfg) as kv:
        kv.store_segments(text.segments([0]), text.kv([0], [0]))
        kv.flush()
        first = next(f for f in (tmp_path / "kv").rglob("*-seg.*") if fmt.verify(
            f.read_bytes()).segment_start == 0)  # fmt: skip
        data = bytearray(first.read_bytes())
        data[-20] ^= 0xFF
        first.write_bytes(bytes(data))
        hits, _ = kv.retrieve_segments(text.segments([0]), [0])
        assert hits == [0]
        assert kv.stats().tiers[0].corrupt == 1 and not first.exists()


def test_segment_keys_never_collide(tmp_path):
    """Not with prefix keys of the same tokens, nor across models, tenants or RoPEs."""
    text = Text(CHUNK * 2)
    cfg = config(tmp_path)
    with open_kv(cfg) as kv:
        kv.store_segments(text.segments([0]), text.kv([0], [0]))
        kv.store(text.tokens[0], text.raw[0])
        kv.flush()
        keys = [k for k in kv.chain.tiers[0].backend.store.blobs]  # type: ignore[attr-defined]
        namespaces = {ChunkKey.parse(k).namespace for k in keys}
        assert len(keys) == 4 and len(namespaces) == 2
        assert any(ns.endswith("-seg") for ns in namespaces)
        assert kv.lookup(text.tokens[0]) == 2 * CHUNK
    others = [
        dict(model="other"),
        dict(tenant="acme"),
        dict(rotary=RotaryConfig(head_dim=16, rotary_dim=16, theta=500000.0)),
        dict(rotary=RotaryConfig(head_dim=16, rotary_dim=8, theta=10000.0)),
        dict(rotary=RotaryConfig(16, 16, 10000.0, scaling="linear", factor=2.0)),
    ]
    for other in others:
        with open_kv(cfg, **other) as kv:  # the same file tier
            assert kv.lookup_segments(text.segments([0])) == [0], other
    with open_kv(cfg, tenant="acme") as a, open_kv(cfg, tenant="acme") as b:
        a.store_segments(text.segments([0]), text.kv([0], [0]))
        a.flush()
        assert b.lookup_segments(text.segments([0])) == [2 * CHUNK]


def test_extra_keys_separate_segments():
    text = Text(CHUNK * 2)
    with open_kv(config()) as kv:
        kv.store_segments(text.segments([0]), text.kv([0], [0]), extra_keys=("lora-a",))
        kv.flush()
        assert kv.lookup_segments(text.segments([0])) == [0]
        assert kv.lookup_segments(text.segments([0]), extra_keys=("lora-a",)) == [2 * CHUNK]


def stored_keys(kv: KVTier) -> set[str]:
    return set(kv.chain.tiers[0].backend.store.blobs)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda kv, t: kv.retrieve_segments(t.segments([0, 1]), [0, 50]), "overlap"),
        (
            lambda kv, t: kv.store_segments(t.segments([0, 1]), t.kv([0, 1], [0, 100]), [0, 99]),
            "overlap",
        ),
        (lambda kv, t: kv.retrieve_segments(t.segments([0]), [4000]), "past the model's context"),
        (lambda kv, t: kv.lookup_segments([list(range(5000))]), "past the model's context"),
        (lambda kv, t: kv.retrieve_segments(t.segments([0]), [-1]), "start at 0"),
        (lambda kv, t: kv.retrieve_segments(t.segments([0, 1]), [0]), "one int"),
        (lambda kv, t: kv.retrieve_segments(t.segments([0]), [1.5]), "one int"),
        (lambda kv, t: kv.lookup_segments(t.tokens[0]), "segments.0. is an int"),
        (lambda kv, t: kv.lookup_segments("text"), "list of token sequences"),
        (lambda kv, t: kv.lookup_segments([[1.5] * 70]), r"segments\[0\]: tokens must be"),
        (lambda kv, t: kv.store_segments(t.segments([0]), t.kv([0, 1], [0, 100])), "KV tensor"),
        (lambda kv, t: kv.store_segments(t.segments([0]), "kv"), "torch.Tensor"),
        (lambda kv, t: kv.retrieve_segments(t.segments([0]), out=torch.empty(1)), "out has"),
    ],
)
def test_bad_input_is_a_clear_error_and_changes_nothing(call, message):
    text = Text(100, 70)
    with open_kv(config()) as kv:
        kv.store_segments(text.segments([0, 1]), text.kv([0, 1], [0, 100]))
        kv.flush()
        before = stored_keys(kv)
        with pytest.raises(ConfigError, match=message):
            call(kv, text)
        kv.flush()
        assert stored_keys(kv) == before
        assert kv.lookup_segments(text.segments([0, 1])) == [100, 70]


def test_segments_need_a_rotary_encoding_of_the_layout():
    text = Text(64)
    with KVTier.open(config(), model="m", layout=LAYOUT) as kv:
        with pytest.raises(ConfigError, match="rotary=RotaryConfig"):
            kv.lookup_segments(text.segments([0]))
        assert kv.store(text.tokens[0], text.raw[0]) == 64  # prefixes need none
    with pytest.raises(ConfigError, match="head_dim 32"):
        open_kv(config(), rotary=RotaryConfig(head_dim=32, rotary_dim=32, theta=1e4))


def test_blob_headers_without_a_segment_still_read():
    """Blobs written before segments existed: no ``segment`` in the header."""
    raw = torch.arange(2 * 2 * 4 * 2 * 16, dtype=torch.float32).view(2, 2, 4, 2, 16)
    from kvtier.core.buffers import BufferPool
    from kvtier.core.codecs.pipeline import CodecPipeline
    from kvtier.core.plugins import get_registry

    pipeline = CodecPipeline.from_config("raw", get_registry())
    pool = BufferPool()
    with pipeline.encode("m-0123456789abcdef.00", raw, pool) as blob:
        header = fmt.verify(blob)
        assert header.segment_start is None and b'"segment"' not in bytes(blob.view)
    with pipeline.encode("m-0123456789abcdef.00", raw, pool, segment_start=64) as blob:
        assert fmt.verify(blob).segment_start == 64
        data = bytearray(blob.view)
    at = bytes(data).index(b'"start":64')
    data[at : at + 10] = b'"start":-1'
    from kvtier.core.blob import seal

    seal(memoryview(data))
    with pytest.raises(fmt.ChunkCorruptedError, match="segment must be"):
        fmt.verify(bytes(data))


def test_split_on_separator():
    sep = [7, 8]
    assert split_on_separator([1, 2, 7, 8, 3, 7, 8, 4, 5], sep) == [[1, 2], sep, [3], sep, [4, 5]]
    assert split_on_separator([7, 8, 1, 7, 8], sep) == [sep, [1], sep]
    assert split_on_separator([1, 7, 2, 8], sep) == [[1, 7, 2, 8]]  # no run: unchanged
    assert split_on_separator(torch.tensor([1, 7, 8]), sep) == [[1], sep]
    with pytest.raises(ConfigError, match="non-empty separator"):
        split_on_separator([1, 2], [])
