"""Layered blobs (format 2): each layer of a chunk is its own section with its own
digest, so a reader can check and use one layer before the rest arrives; whole blobs
still verify in one pass, and whole-chunk blobs (format 1) read as before."""

from __future__ import annotations

import struct

import pytest
import torch

from kvtier.core import blob as fmt
from kvtier.core.buffers import default_pool
from kvtier.core.codecs import decode
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.errors import ChunkCorruptedError
from kvtier.core.integrity import MacKeys
from kvtier.core.plugins import get_registry

REGISTRY = get_registry()
KEY = "m-0123456789ab." + "1" * 32
LAYERS = 4
PIPELINES = ["raw", "int8", "int4", "fp8", "raw+zstd", "raw+shuffle", "int8+shuffle+zstd"]


def chunk(seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(LAYERS, 2, 16, 2, 8, generator=gen)


def encode(spec: str = "raw", *, layered: bool = True, keys: MacKeys | None = None) -> bytearray:
    pipeline = CodecPipeline.from_config(spec, REGISTRY, layered=layered)
    with pipeline.encode(KEY, chunk(), default_pool(), keys=keys) as blob:
        return bytearray(blob.view)


@pytest.mark.parametrize("spec", PIPELINES)
def test_a_layered_blob_decodes_like_a_whole_one_and_layer_by_layer(spec: str) -> None:
    whole, layered = encode(spec, layered=False), encode(spec)
    header = fmt.verify(layered, expected_key=KEY)
    assert (header.version, fmt.verify(whole).version) == (2, 1)
    assert header.layers is not None and len(header.layers) == LAYERS
    _, from_whole = decode.decode_blob(whole, REGISTRY)
    _, from_layers = decode.decode_blob(layered, REGISTRY)
    assert torch.equal(from_whole, from_layers)  # same codec, same values
    for layer in range(LAYERS):
        fmt.check_section(memoryview(layered), header, layer)
        assert torch.equal(decode.layer_of(layered, header, layer, REGISTRY), from_layers[layer])


def test_raw_layers_are_views_of_the_blob() -> None:
    data = encode("raw")
    header = fmt.verify(data)
    first = decode.layer_of(data, header, 1, REGISTRY)
    offset, nbytes = header.section(1)
    data[offset : offset + 4] = struct.pack("<f", 42.0)
    assert first.flatten()[0].item() == 42.0  # no copy: the section's own bytes
    assert nbytes == first.numel() * 4


def head_table_trailer(data: bytearray, header: fmt.BlobHeader) -> bytearray:
    """The blob as a ranged reader has it before any section: payload unread."""
    partial = bytearray(len(data))
    partial[: header.payload_offset] = data[: header.payload_offset]
    end = header.payload_offset + header.payload_nbytes
    partial[end:] = data[end:]
    return partial


@pytest.mark.parametrize("keys", [None, MacKeys((b"k" * 32,)), MacKeys((b"k" * 32,), strong=True)])
def test_a_reader_checks_the_head_then_each_section_as_it_arrives(keys: MacKeys | None) -> None:
    data = encode("int8+zstd", keys=keys)
    header = fmt.read_head(memoryview(data)[: fmt.read_prefix(memoryview(data)).head_nbytes], KEY)
    assert header == fmt.verify(data, keys=keys)  # the head alone tells the layout
    partial = head_table_trailer(data, header)
    view = memoryview(partial)
    fmt.check_head(view, header)
    if keys is not None:
        fmt.check_signature(view, header, *fmt.layered.mac_parts(view, header), keys)
    for layer in range(LAYERS):
        with pytest.raises(ChunkCorruptedError, match=f"layer {layer}"):
            fmt.check_section(view, header, layer)  # not arrived yet: zeros
        offset, nbytes = header.section(layer)
        partial[offset : offset + nbytes] = data[offset : offset + nbytes]
        fmt.check_section(view, header, layer)
    assert partial == data


def regions(data: bytearray) -> dict[str, int]:
    """One byte offset in each region of a layered blob."""
    header = fmt.verify(data)
    table = header.payload_offset + header.payload_nbytes
    return {
        "prefix": 13,
        "header": fmt.framing.PREFIX.size + 5,
        "section 0": header.section(0)[0] + 3,
        "last section": header.section(LAYERS - 1)[0] + 1,
        "table": table + 2,
        "trailer": len(data) - 1,
    }


REGIONS = ["prefix", "header", "section 0", "last section", "table", "trailer"]


@pytest.mark.parametrize("signed", [False, True])
@pytest.mark.parametrize("region", REGIONS)
def test_any_damaged_byte_is_caught_by_the_whole_check(region: str, signed: bool) -> None:
    keys = MacKeys((b"k" * 32,)) if signed else None
    data = encode("raw", keys=keys)
    data[regions(data)[region]] ^= 0x01
    with pytest.raises(ChunkCorruptedError):
        fmt.verify(data, keys=keys)


@pytest.mark.parametrize("region", ["header", "table", "trailer"])
def test_a_damaged_head_table_or_trailer_fails_the_head_check(region: str) -> None:
    data = encode("raw")
    header = fmt.verify(data)
    data[regions(data)[region]] ^= 0x01
    with pytest.raises(ChunkCorruptedError, match="checksum"):
        fmt.check_head(memoryview(data), header)


def test_a_damaged_section_fails_only_its_own_check() -> None:
    data = encode("raw")
    header = fmt.verify(data)
    data[header.section(2)[0]] ^= 0x80
    view = memoryview(data)
    fmt.check_head(view, header)
    for layer in (0, 1, 3):
        fmt.check_section(view, header, layer)
    with pytest.raises(ChunkCorruptedError, match="layer 2"):
        fmt.check_section(view, header, 2)


def test_unsealed_layered_blobs_parse_and_seal_later() -> None:
    pipeline = CodecPipeline.from_config("raw", REGISTRY, layered=True)
    with pipeline.encode(KEY, chunk(5), default_pool(), sealed=False) as blob:
        assert fmt.parse(blob.view).version == 2 and not blob.sealed
        blob.view[-8:] = bytes(8)  # the pool's memory holds anything before sealing
        blob.ensure_sealed()
        fmt.verify(blob.view, expected_key=KEY)
        with pipeline.encode(KEY, chunk(5), default_pool()) as sealed_at_once:
            assert bytes(blob.view) == bytes(sealed_at_once.view)


def test_a_blank_layered_blob_is_written_in_place_then_sealed() -> None:
    pipeline = CodecPipeline.from_config("raw", REGISTRY, layered=True)
    x = chunk(3)
    with pipeline.blank(KEY, tuple(x.shape), x.dtype, default_pool()) as blob:
        decode.chunk_of(blob, REGISTRY).copy_(x)
        blob.ensure_sealed()
        header = fmt.verify(blob.view)
        assert header.layers == tuple((x[0].numel() * 4,) for _ in range(LAYERS))
        assert torch.equal(decode.decode_blob(blob.view, REGISTRY)[1], x)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda h: h.replace(b'"layers":[[', b'"layerz":[['), "no layers|keys"),
        (lambda h: h.replace(b"]]", b"],[1]]", 1), "layers must be"),
    ],
)
def test_a_layered_header_that_does_not_add_up_is_corrupt(edit, message: str) -> None:
    data = encode("raw")
    header = fmt.verify(data)
    text = bytes(data[fmt.framing.PREFIX.size : header.payload_offset])
    edited = edit(text)
    assert len(edited) <= len(text) + 4
    with pytest.raises(ChunkCorruptedError, match=message):
        fmt.header.parse_header(
            edited.ljust(len(text)), header.payload_nbytes, None, False, fmt.LAYERED_VERSION
        )


def test_a_whole_chunk_blob_is_refused_a_layers_field() -> None:
    data = encode("raw")
    header = fmt.verify(data)
    text = bytes(data[fmt.framing.PREFIX.size : header.payload_offset])
    with pytest.raises(ChunkCorruptedError, match="no layers field"):
        fmt.header.parse_header(text, header.payload_nbytes, None, False, fmt.FORMAT_VERSION)


def test_truncated_and_extended_layered_blobs_are_corrupt() -> None:
    data = encode("raw")
    for bad in (data[:-1], data + b"\0", data[: len(data) // 2]):
        with pytest.raises(ChunkCorruptedError):
            fmt.verify(bad)


def test_an_unknown_version_is_named() -> None:
    data = encode("raw")
    data[4:6] = (3).to_bytes(2, "little")
    with pytest.raises(ChunkCorruptedError, match=r"version 3, this kvtier reads \[1, 2\]"):
        fmt.verify(data)


def test_a_chain_writes_the_layout_its_config_names_and_reads_both(tmp_path) -> None:
    from kvtier.core import KVLayout, KVTier

    layout = KVLayout(num_layers=3, num_kv_heads=2, head_dim=8, dtype=torch.float32)
    tokens = list(range(64))
    kv = torch.randn(layout.chunk_shape(64))

    def config(blob_layout: str) -> dict[str, object]:
        tier = {"url": f"file://{tmp_path / 'chunks'}", "capacity": "8MiB", "codec": "int8+zstd"}
        return {"chunk_tokens": 16, "blob_layout": blob_layout, "tiers": [tier]}

    def versions() -> set[int]:
        files = [p for p in (tmp_path / "chunks").rglob("*") if p.is_file()]
        return {fmt.read_prefix(memoryview(p.read_bytes())).version for p in files}

    with KVTier.open(config("chunk"), model="m", layout=layout) as first:
        first.store(tokens[:32], kv[:, :, :32])
        first.flush()
    assert versions() == {1}
    with KVTier.open(config("layers"), model="m", layout=layout) as second:
        second.store(tokens, kv)
        second.flush()
        assert versions() == {1, 2}  # chunks already stored stay as they were
        n, got = second.retrieve(tokens)
    assert n == 64 and (got - kv).abs().max() < 0.05
