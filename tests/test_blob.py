"""The blob format and the codec pipeline: layout, config parsing, decode contract."""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch
import xxhash

from kvtier.core.blob import FORMAT_VERSION, MAGIC, MAX_HEADER_BYTES, verify
from kvtier.core.buffers import BufferPool
from kvtier.core.codec import Params, TensorCodec
from kvtier.core.codecs.decode import decode_blob
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.codecs.raw import RawCodec
from kvtier.core.codecs.zstd import ZstdCodec
from kvtier.core.errors import ChunkCorruptedError, CodecUnavailableError, ConfigError
from kvtier.core.plugins import PluginRegistry


@pytest.fixture(scope="module")
def registry() -> PluginRegistry:
    return PluginRegistry(disabled={"cpu", "file"}, entry_points=False)


def chunk(tokens: int = 4, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    return torch.randn(2, 2, tokens, 3, 8, generator=torch.Generator().manual_seed(tokens)).to(
        dtype
    )


@pytest.mark.parametrize("spec", ["raw", "int8", "shuffle+zstd"])
def test_layout_matches_the_documented_format(spec: str, registry: PluginRegistry) -> None:
    pipeline = CodecPipeline.from_config(spec, registry)
    x = chunk()
    with pipeline.encode("key-1", x, BufferPool()) as blob:
        data = bytes(blob.view)
    magic, version, flags, header_len, payload_len = struct.unpack_from("<4sHHIQ", data)
    assert (magic, version, flags) == (MAGIC, FORMAT_VERSION, 0)
    assert len(data) == 20 + header_len + payload_len + 8
    assert (20 + header_len) % 64 == 0
    (checksum,) = struct.unpack_from("<Q", data, len(data) - 8)
    assert checksum == xxhash.xxh3_64_intdigest(data[:-8])
    header = json.loads(data[20 : 20 + header_len].decode("utf-8"))
    assert header["key"] == "key-1"
    assert header["dtype"] == "float16"
    assert header["shape"] == [2, 2, 4, 3, 8]
    assert [s["name"] for s in header["stages"]] == pipeline.name.split("+")
    assert header["sizes"][-1] == payload_len
    if spec == "raw":
        payload = data[20 + header_len : 20 + header_len + payload_len]
        assert payload == x.numpy().tobytes()


def test_verify_reports_the_fields(registry: PluginRegistry) -> None:
    pipeline = CodecPipeline.from_config("int8+zstd", registry)
    with pipeline.encode("k", chunk(dtype=torch.bfloat16), BufferPool()) as blob:
        header = verify(blob)
        assert header == verify(bytes(blob.view)) == verify(blob.view)
        assert header.nbytes == blob.nbytes
    assert header.key == "k"
    assert header.dtype == torch.bfloat16
    assert header.shape == (2, 2, 4, 3, 8)
    assert header.stages == (("int8", {"granularity": "token_head"}), ("zstd", {"level": 3}))
    assert header.sizes[0] == 2 * 2 * 4 * 3 * (8 + 4)
    assert header.sizes[1] == header.payload_nbytes
    assert header.payload_offset % 64 == 0


def test_raw_encode_leases_one_buffer_and_reuses_it(registry: PluginRegistry) -> None:
    pool = BufferPool()
    pipeline = CodecPipeline.from_config("raw", registry)
    full = torch.randn(2, 2, 64, 4, 32).half()
    pipeline.encode("k", full[:, :, 8:40], pool).release()
    assert (pool.allocations, pool.reuses) == (1, 0)
    with pipeline.encode("k", full[:, :, 8:40], pool) as blob:
        assert (pool.allocations, pool.reuses) == (1, 1)
        _, out = decode_blob(blob, registry)
    assert torch.equal(out, full[:, :, 8:40])


def test_pipeline_intermediates_return_to_the_pool(registry: PluginRegistry) -> None:
    pool = BufferPool()
    pipeline = CodecPipeline.from_config("int8+zstd", registry)
    for _ in range(3):
        pipeline.encode("k", chunk(), pool).release()
    assert pool.allocations == 2  # the int8 stage buffer and the blob, then reused


class VerboseRaw(RawCodec):
    """Records parameters longer than the header space the encoder reserves."""

    name = "raw"

    def encode_into(self, chunk: torch.Tensor, out: memoryview) -> Params:
        super().encode_into(chunk, out)
        return {"note": "x" * 1000}


def test_parameters_larger_than_the_reservation_still_give_a_valid_blob() -> None:
    pool = BufferPool()
    x = chunk()
    with CodecPipeline([VerboseRaw()]).encode("k", x, pool) as blob:
        header = verify(blob)
        payload = blob.view[header.payload_offset : header.payload_offset + header.payload_nbytes]
        assert header.stages == (("raw", {"note": "x" * 1000}),)
        assert header.payload_offset % 64 == 0
        assert bytes(payload) == x.numpy().tobytes()
    assert pool.idle_bytes > 0  # the first, too small, lease went back


@pytest.mark.parametrize(
    ("steps", "names"),
    [
        ("raw", "raw"),
        ("int8+zstd", "int8+zstd"),
        (" int4 + shuffle + zstd ", "int4+shuffle+zstd"),
        ("zstd", "raw+zstd"),
        ("shuffle+zstd", "raw+shuffle+zstd"),
        (["fp8", {"name": "zstd", "level": 1}], "fp8+zstd"),
        ([{"name": "zstd"}], "raw+zstd"),
    ],
)
def test_pipeline_config_forms(
    steps: str | Sequence[str | Mapping[str, Any]], names: str, registry: PluginRegistry
) -> None:
    pipeline = CodecPipeline.from_config(steps, registry)
    assert pipeline.name == names
    assert [c.name for c in pipeline.stages] == names.split("+")


@pytest.mark.parametrize(
    ("steps", "message"),
    [
        ("", "empty step"),
        ([], "empty"),
        ("int8++zstd", "empty step"),
        ("lz4", "unknown codec 'lz4'"),
        ("zstd+int8", "'int8' transforms tensors and must come first"),
        ("int8+int4", "'int4' transforms tensors"),
        ("zstd+zstd", "'zstd' appears twice"),
        ([{"level": 3}], "'name' key"),
        ([42], "'name' key"),
        ([{"name": "zstd", "level": 23}], "level"),
        ([{"name": "zstd", "lvl": 3}], "unknown key 'lvl'"),
        ([{"name": "shuffle", "itemsize": 2}], "unknown key 'itemsize'"),
    ],
)
def test_bad_pipeline_configs_name_the_problem(
    steps: str | Sequence[Any], message: str, registry: PluginRegistry
) -> None:
    with pytest.raises(ConfigError, match=message):
        CodecPipeline.from_config(steps, registry)


def test_constructor_checks_stage_kinds() -> None:
    with pytest.raises(ConfigError, match="starts with a tensor codec"):
        CodecPipeline([])
    with pytest.raises(ConfigError, match="starts with a tensor codec"):
        CodecPipeline([ZstdCodec()])
    assert CodecPipeline([RawCodec(), ZstdCodec()]).name == "raw+zstd"


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (torch.zeros(2, 3, 4, 5), r"\[L, 2, T, H, D\]"),
        (torch.zeros(1, 2, 1, 1, 4, dtype=torch.float64), "unsupported dtype"),
    ],
)
def test_encode_rejects_bad_chunks(x: torch.Tensor, message: str, registry: PluginRegistry) -> None:
    with pytest.raises(ConfigError, match=message):
        CodecPipeline.from_config("raw", registry).encode("k", x, BufferPool())


def test_encode_rejects_keys_that_overflow_the_header(registry: PluginRegistry) -> None:
    pipeline = CodecPipeline.from_config("raw", registry)
    with pytest.raises(ConfigError, match=str(MAX_HEADER_BYTES)):
        pipeline.encode("k" * MAX_HEADER_BYTES, chunk(), BufferPool())


@pytest.mark.parametrize("spec", ["raw", "zstd"])
def test_keys_up_to_the_header_limit_round_trip(spec: str, registry: PluginRegistry) -> None:
    pipeline = CodecPipeline.from_config(spec, registry)
    key = "k" * (MAX_HEADER_BYTES - 200)  # raw: no room left for the encoder's reservation
    with pipeline.encode(key, chunk(), BufferPool()) as blob:
        header = verify(blob)
    assert header.key == key
    assert header.payload_offset - 20 <= MAX_HEADER_BYTES


def test_unicode_keys_round_trip(registry: PluginRegistry) -> None:
    key = "tenant/ü/\u2603/\ud800"  # a lone surrogate too: the header escapes it
    with CodecPipeline.from_config("raw", registry).encode(key, chunk(), BufferPool()) as blob:
        assert decode_blob(blob, registry, expected_key=key)[0].key == key


def test_decode_into_a_given_non_contiguous_tensor(registry: PluginRegistry) -> None:
    x = chunk(tokens=5)
    target = torch.zeros(2, 2, 9, 3, 8, dtype=torch.float16)
    for spec in ("raw", "shuffle+zstd", "int8"):
        target.zero_()
        with CodecPipeline.from_config(spec, registry).encode("k", x, BufferPool()) as blob:
            _, out = decode_blob(blob, registry, target[:, :, 2:7])
        assert out.data_ptr() == target[:, :, 2:7].data_ptr()
        assert torch.allclose(target[:, :, 2:7], x, atol=0.05)
        assert not target[:, :, :2].any() and not target[:, :, 7:].any()


def test_decoded_tensor_does_not_alias_the_blob(registry: PluginRegistry) -> None:
    x = chunk()
    with CodecPipeline.from_config("raw", registry).encode("k", x, BufferPool()) as blob:
        _, out = decode_blob(blob, registry)
        blob.view[:] = bytes(blob.nbytes)
    assert torch.equal(out, x)


@pytest.mark.parametrize(
    "target",
    [torch.zeros(2, 2, 5, 3, 8, dtype=torch.float16), torch.zeros(2, 2, 4, 3, 8)],
)
def test_decode_into_a_mismatched_tensor_is_a_miss(
    target: torch.Tensor, registry: PluginRegistry
) -> None:
    blob = CodecPipeline.from_config("int8", registry).encode("k", chunk(), BufferPool())
    with blob, pytest.raises(ChunkCorruptedError, match="expected"):
        decode_blob(blob, registry, target)


def test_foreign_key_is_corruption(registry: PluginRegistry) -> None:
    blob = CodecPipeline.from_config("raw", registry).encode("mine", chunk(), BufferPool())
    with blob, pytest.raises(ChunkCorruptedError, match="foreign blob"):
        decode_blob(blob, registry, expected_key="theirs")


def test_blob_from_an_uninstalled_codec_is_not_corrupt(registry: PluginRegistry) -> None:
    """A codec plugin missing here (installed or enabled elsewhere) is no reason to
    delete a valid blob: it is a CodecUnavailableError, not ChunkCorruptedError."""

    class Lz4(RawCodec):
        name = "lz4"

    with CodecPipeline([Lz4()]).encode("k", chunk(), BufferPool()) as blob:
        assert verify(blob).stages == (("lz4", {}),)
        with pytest.raises(CodecUnavailableError, match="unknown codec 'lz4'") as info:
            decode_blob(blob, registry)
        assert not isinstance(info.value, ChunkCorruptedError)


def test_third_party_tensor_codec_errors_surface_as_corruption(registry: PluginRegistry) -> None:
    class Broken(TensorCodec):
        name = "raw"

        def encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
            raise OverflowError("boom")

        def encode_into(self, chunk: torch.Tensor, out: memoryview) -> Params:
            return {}

        def decode_into(
            self, payload: memoryview, params: Mapping[str, Any], out: torch.Tensor
        ) -> None:
            raise AssertionError("unreachable")

    with CodecPipeline.from_config("raw", registry).encode("k", chunk(), BufferPool()) as blob:
        data = bytes(blob.view)
    other = PluginRegistry(disabled={"cpu", "file"}, entry_points=False)
    other.codecs["raw"] = type(other.codecs["raw"])(name="raw", cls=Broken)
    with pytest.raises(ChunkCorruptedError, match="OverflowError: boom"):
        decode_blob(data, other)


def test_unwritable_out_is_the_callers_error_not_corruption(registry: PluginRegistry) -> None:
    x = chunk()
    with CodecPipeline.from_config("raw", registry).encode("key-1", x, BufferPool()) as blob:
        with torch.inference_mode():
            out = torch.empty_like(x)
        with pytest.raises(ValueError, match="inference tensor"):
            decode_blob(blob.view, registry, out, expected_key="key-1")
        with torch.inference_mode():
            decode_blob(blob.view, registry, out, expected_key="key-1")
    assert torch.equal(out, x)
