"""The built-in codecs, alone and in pipelines: registration, round trips, options."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.core.buffers import BufferPool
from kvtier.core.codec import ByteCodec, TensorCodec
from kvtier.core.codecs.decode import decode_blob
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.codecs.shuffle import ShuffleCodec
from kvtier.core.codecs.zstd import ZstdCodec, ZstdOptions
from kvtier.core.errors import ChunkCorruptedError, ConfigError
from kvtier.core.plugins import PluginRegistry
from kvtier.kernels.quant import dequantize_fp8_into, dequantize_into, quantize, quantize_fp8_into

FLOATS = [torch.float32, torch.float16, torch.bfloat16]
LOSSLESS = ["raw", "zstd", "shuffle+zstd", "shuffle", "raw+shuffle+zstd"]
LOSSY = ["int8", "int8+zstd", "int4", "int4+shuffle+zstd", "fp8", "fp8+zstd"]


@pytest.fixture(scope="module")
def registry() -> PluginRegistry:
    return PluginRegistry(disabled={"cpu", "file"}, entry_points=False)


@pytest.fixture(scope="module")
def pool() -> Iterator[BufferPool]:
    pool = BufferPool()
    yield pool
    pool.clear()


def round_trip(
    spec: str, chunk: torch.Tensor, registry: PluginRegistry, pool: BufferPool
) -> torch.Tensor:
    pipeline = CodecPipeline.from_config(spec, registry)
    with pipeline.encode("chunk", chunk, pool) as blob:
        header, out = decode_blob(blob, registry, expected_key="chunk")
    assert header.shape == tuple(chunk.shape) and header.dtype == chunk.dtype
    return out


def reference(spec: str, chunk: torch.Tensor) -> torch.Tensor:
    """What the lossy tensor codec reconstructs, computed with the kernels directly."""
    out = torch.empty_like(chunk)
    if spec.startswith("fp8"):
        q = torch.empty(chunk.shape, dtype=torch.uint8)
        scale = torch.empty(chunk.shape[:-1])
        quantize_fp8_into(chunk, q, scale)
        dequantize_fp8_into(q, scale, out)
    else:
        bits = 8 if spec.startswith("int8") else 4
        dequantize_into(*quantize(chunk, bits), bits, out)
    return out


chunk_shapes = st.tuples(
    st.integers(1, 3), st.just(2), st.integers(0, 6), st.integers(1, 3), st.integers(1, 5)
)


@st.composite
def float_chunks(draw: st.DrawFn, even_head_dim: bool = False) -> torch.Tensor:
    """A finite float chunk, often a non-contiguous slice along the token axis."""
    layers, two, tokens, heads, head_dim = draw(chunk_shapes)
    head_dim *= 2 if even_head_dim else 1
    dtype = draw(st.sampled_from(FLOATS))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(["normal", "constant", "zeros", "wide"]))
    lead = draw(st.integers(0, 2))
    full = torch.randn(layers, two, lead + tokens, heads, head_dim, generator=gen)
    if kind == "constant":
        full = torch.full_like(full, 0.375)
    elif kind == "zeros":
        full.zero_()
    elif kind == "wide":
        full *= 1000.0
    return full.to(dtype)[:, :, lead:]


@st.composite
def any_bit_chunks(draw: st.DrawFn) -> torch.Tensor:
    """A chunk of arbitrary bit patterns (NaNs and infs included) of any stored dtype."""
    shape = draw(chunk_shapes)
    dtype = draw(st.sampled_from([*FLOATS, torch.float8_e4m3fn, torch.int8, torch.uint8]))
    nbytes = torch.Size(shape).numel() * dtype.itemsize
    data = draw(st.binary(min_size=nbytes, max_size=nbytes))
    return torch.tensor(list(data), dtype=torch.uint8).view(dtype).view(shape)


def test_builtin_codecs_are_registered(registry: PluginRegistry) -> None:
    kinds = {name: registry.codec(name).load() for name in ("raw", "int8", "int4", "fp8")}
    assert all(issubclass(cls, TensorCodec) for cls in kinds.values())
    assert issubclass(registry.codec("shuffle").load(), ByteCodec)
    assert issubclass(registry.codec("zstd").load(), ByteCodec)
    assert registry.codec("zstd").options is ZstdOptions
    assert set(registry.codecs) >= {"raw", "int8", "int4", "fp8", "shuffle", "zstd"}


@settings(max_examples=40, deadline=None)
@given(chunk=any_bit_chunks(), spec=st.sampled_from(LOSSLESS))
def test_lossless_pipelines_are_byte_exact(
    chunk: torch.Tensor, spec: str, registry: PluginRegistry, pool: BufferPool
) -> None:
    out = round_trip(spec, chunk, registry, pool)
    assert torch.equal(out.view(torch.uint8), chunk.view(torch.uint8))


@settings(max_examples=60, deadline=None)
@given(chunk=float_chunks(even_head_dim=True), spec=st.sampled_from(LOSSY))
def test_lossy_pipelines_reconstruct_what_the_kernels_compute(
    chunk: torch.Tensor, spec: str, registry: PluginRegistry, pool: BufferPool
) -> None:
    out = round_trip(spec, chunk, registry, pool)
    assert torch.equal(out.view(torch.uint8), reference(spec, chunk).view(torch.uint8))
    step = (chunk.float().amax(-1) - chunk.float().amin(-1)) / (255 if "int8" in spec else 15)
    tolerance = step[..., None] * 1.01 + chunk.float().abs() * (0.07 if "fp8" in spec else 0.01)
    assert torch.all((out.float() - chunk.float()).abs() <= tolerance + 1e-30)


@settings(max_examples=30, deadline=None)
@given(chunk=float_chunks())
def test_int8_handles_odd_head_dims(
    chunk: torch.Tensor, registry: PluginRegistry, pool: BufferPool
) -> None:
    out = round_trip("int8", chunk, registry, pool)
    assert torch.equal(out, reference("int8", chunk))


@pytest.mark.parametrize("spec", LOSSLESS + LOSSY)
@pytest.mark.parametrize("dtype", FLOATS)
def test_zero_token_chunks_round_trip(
    spec: str, dtype: torch.dtype, registry: PluginRegistry, pool: BufferPool
) -> None:
    chunk = torch.empty(2, 2, 0, 4, 8, dtype=dtype)
    out = round_trip(spec, chunk, registry, pool)
    assert out.shape == chunk.shape and out.dtype == dtype


def test_int4_rejects_odd_head_dim(registry: PluginRegistry, pool: BufferPool) -> None:
    pipeline = CodecPipeline.from_config("int4", registry)
    with pytest.raises(ConfigError, match="even"):
        pipeline.encode("k", torch.zeros(1, 2, 3, 1, 5), pool)


@pytest.mark.parametrize("spec", ["int8", "int4", "fp8"])
def test_quantisers_reject_integer_chunks(
    spec: str, registry: PluginRegistry, pool: BufferPool
) -> None:
    pipeline = CodecPipeline.from_config(spec, registry)
    with pytest.raises(ConfigError, match="float"):
        pipeline.encode("k", torch.zeros(1, 2, 3, 1, 4, dtype=torch.int8), pool)


def test_quantised_payload_sizes(registry: PluginRegistry, pool: BufferPool) -> None:
    chunk = torch.randn(2, 2, 16, 4, 128).half()
    rows = 2 * 2 * 16 * 4
    expected = {"int8": rows * (128 + 4), "int4": rows * (64 + 4), "fp8": rows * (128 + 4)}
    for name, size in expected.items():
        with CodecPipeline.from_config(name, registry).encode("k", chunk, pool) as blob:
            header, _ = decode_blob(blob, registry)
        assert header.sizes == (size,)


def test_shuffle_groups_bytes_by_significance() -> None:
    codec = ShuffleCodec()
    data = memoryview(b"A0B1C2Z")  # three 2-byte elements and a trailing byte
    shuffled, params = codec.encode(data, 2)
    assert bytes(shuffled) == b"ABC012Z"
    assert params == {"itemsize": 2}
    assert bytes(codec.decode(memoryview(b"ABC012Z"), params, 7)) == bytes(data)
    assert bytes(codec.encode(memoryview(b"xyz"), 1)[0]) == b"xyz"


def test_shuffle_rejects_bad_recorded_parameters() -> None:
    codec = ShuffleCodec()
    data = memoryview(bytes(8))
    for params in (
        {},
        {"itemsize": 0},
        {"itemsize": 17},
        {"itemsize": "2"},
        {"itemsize": True},
        {"itemsize": 2, "x": 1},
    ):
        with pytest.raises(ChunkCorruptedError, match="shuffle"):
            codec.decode(data, params, 8)
    with pytest.raises(ChunkCorruptedError, match="payload is 8 bytes"):
        codec.decode(data, {"itemsize": 2}, 9)


def test_zstd_level_is_recorded_and_validated(registry: PluginRegistry, pool: BufferPool) -> None:
    pipeline = CodecPipeline.from_config(["int8", {"name": "zstd", "level": 9}], registry)
    with pipeline.encode("k", torch.randn(1, 2, 4, 2, 8), pool) as blob:
        header, _ = decode_blob(blob, registry)
    assert header.stages[1] == ("zstd", {"level": 9})
    for bad in (99, -100, "fast", 2.5, True):
        with pytest.raises(ConfigError, match="level"):
            CodecPipeline.from_config([{"name": "zstd", "level": bad}], registry)
    with pytest.raises(ConfigError, match="did you mean 'level'"):
        CodecPipeline.from_config([{"name": "zstd", "levle": 3}], registry)


def test_zstd_decode_never_exceeds_the_recorded_size() -> None:
    codec = ZstdCodec()
    frame = zstandard.ZstdCompressor().compress(bytes(1000))
    assert bytes(codec.decode(memoryview(frame), {"level": 3}, 1000)) == bytes(1000)
    with pytest.raises(ChunkCorruptedError, match="declares 1000"):
        codec.decode(memoryview(frame), {"level": 3}, 999)
    unsized = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(1000))
    with pytest.raises(ChunkCorruptedError, match="-1"):
        codec.decode(memoryview(unsized), {"level": 3}, 1000)
    truncated = memoryview(frame)[:-3]
    with pytest.raises((ChunkCorruptedError, zstandard.ZstdError)):
        codec.decode(truncated, {"level": 3}, 1000)


def test_unknown_codec_and_bad_options_name_the_problem(registry: PluginRegistry) -> None:
    with pytest.raises(ConfigError, match=r"unknown codec 'zstdd' \(did you mean 'zstd'\?\)"):
        CodecPipeline.from_config("int8+zstdd", registry)
    with pytest.raises(ConfigError, match="unknown key 'level'"):
        CodecPipeline.from_config([{"name": "int8", "level": 3}], registry)


def test_codecs_are_thread_safe(registry: PluginRegistry) -> None:
    pool = BufferPool()
    pipelines = [
        CodecPipeline.from_config(s, registry) for s in ("shuffle+zstd", "int8+zstd", "fp8")
    ]
    chunks = [torch.randn(2, 2, 8 * (i + 1), 2, 16).half() for i in range(4)]
    expected = {
        (p.name, i): round_trip(p.name, c, registry, pool)
        for p in pipelines
        for i, c in enumerate(chunks)
    }
    barrier = threading.Barrier(4)

    def work(i: int) -> bool:
        barrier.wait()
        ok = True
        for _ in range(10):
            for p in pipelines:
                with p.encode("chunk", chunks[i], pool) as blob:
                    _, out = decode_blob(blob, registry)
                ok &= torch.equal(out, expected[(p.name, i)])
        return ok

    with ThreadPoolExecutor(4) as executor:
        assert all(executor.map(work, range(4)))
