"""Hostile input: whatever bytes reach the reader, it raises ChunkCorruptedError only,
and it never allocates more than a chunk's worth of memory on a header's word."""

from __future__ import annotations

import contextlib
import json
import math
import struct
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import numpy as np
import pytest
import torch
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.core.blob import MAGIC, verify
from kvtier.core.buffers import BufferPool
from kvtier.core.codecs.decode import decode_blob
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.errors import ChunkCorruptedError, CodecUnavailableError
from kvtier.core.plugins import PluginRegistry

PIPELINES = ["raw", "int8", "int4+zstd", "fp8", "shuffle+zstd"]
ALLOCATION_LIMIT = 16 << 20
REGISTRY = PluginRegistry(disabled={"cpu", "file"}, entry_points=False)


def _guard(real: Callable[..., Any], nbytes: Callable[..., int]) -> Callable[..., Any]:
    def guarded(*args: Any, **kwargs: Any) -> Any:
        size = nbytes(*args, **kwargs)
        assert size <= ALLOCATION_LIMIT, f"decoder tried to allocate {size} bytes"
        return real(*args, **kwargs)

    return guarded


def _torch_nbytes(*size: Any, dtype: torch.dtype = torch.float32, **_: Any) -> int:
    dims = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
    return math.prod(dims) * dtype.itemsize


def _numpy_nbytes(shape: Any, dtype: Any = float, **_: Any) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


@contextlib.contextmanager
def no_big_allocations() -> Iterator[None]:
    with (
        mock.patch.object(torch, "empty", _guard(torch.empty, _torch_nbytes)),
        mock.patch.object(np, "empty", _guard(np.empty, _numpy_nbytes)),
    ):
        yield


def assert_rejected(blob: bytes, *, by_header: bool = True) -> None:
    """Decoding fails; with ``by_header``, reading the header alone fails already."""
    with no_big_allocations():
        if by_header:
            with pytest.raises(ChunkCorruptedError):
                verify(blob)
        with pytest.raises(ChunkCorruptedError):
            decode_blob(blob, REGISTRY)


def decodes_or_is_rejected(blob: bytes) -> None:
    """A forged but well-signed blob may decode; if it does, it matches its header."""
    with no_big_allocations():
        try:
            header, out = decode_blob(blob, REGISTRY)
        except ChunkCorruptedError:
            return
    assert tuple(out.shape) == header.shape and out.dtype == header.dtype


def forge(
    header: dict[str, Any] | bytes,
    payload: bytes,
    *,
    header_len: int | None = None,
    payload_len: int | None = None,
    magic: bytes = MAGIC,
    version: int = 1,
    flags: int = 0,
) -> bytes:
    """A blob with a correct checksum around whatever header and payload it is given."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = struct.pack(
        "<4sHHIQ",
        magic,
        version,
        flags,
        len(text) if header_len is None else header_len,
        len(payload) if payload_len is None else payload_len,
    )
    body = prefix + text + payload
    return body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body))


def valid_blob(spec: str, tokens: int = 3) -> bytes:
    x = torch.randn(2, 2, tokens, 2, 8, generator=torch.Generator().manual_seed(7)).half()
    with CodecPipeline.from_config(spec, REGISTRY).encode("key", x, BufferPool()) as blob:
        return bytes(blob.view)


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    header = verify(blob)
    start = header.payload_offset
    return json.loads(blob[20:start]), blob[start : start + header.payload_nbytes]


BLOBS = {spec: valid_blob(spec) for spec in PIPELINES}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_rejected(data: bytes) -> None:
    assert_rejected(data)


@settings(max_examples=200, deadline=None)
@given(
    header_len=st.one_of(st.integers(0, 300), st.integers(0, 2**32 - 1)),
    payload_len=st.one_of(st.integers(0, 300), st.integers(0, 2**64 - 1)),
    rest=st.binary(max_size=300),
)
def test_arbitrary_lengths_after_a_valid_magic_are_rejected(
    header_len: int, payload_len: int, rest: bytes
) -> None:
    assert_rejected(struct.pack("<4sHHIQ", MAGIC, 1, 0, header_len, payload_len) + rest)


@settings(max_examples=150, deadline=None)
@given(spec=st.sampled_from(PIPELINES), position=st.integers(0, 10**6), bit=st.integers(0, 7))
def test_any_bit_flip_is_detected(spec: str, position: int, bit: int) -> None:
    blob = bytearray(BLOBS[spec])
    blob[position % len(blob)] ^= 1 << bit
    assert_rejected(bytes(blob))


@pytest.mark.parametrize("spec", PIPELINES)
def test_truncation_at_every_length_and_extension_are_detected(spec: str) -> None:
    blob = BLOBS[spec]
    for length in range(len(blob)):
        assert_rejected(blob[:length])
    assert_rejected(blob + b"\0")


HUGE_SHAPE = [48, 2, 4096, 32, 64]  # 3 GiB of float16, under the 4 GiB chunk limit
HEADER_EDITS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "missing key": lambda h: h.pop("key"),
    "extra field": lambda h: h.update(extra=1),
    "key not a string": lambda h: h.update(key=7),
    "unknown dtype": lambda h: h.update(dtype="float64"),
    "dtype not a string": lambda h: h.update(dtype=["float16"]),
    "negative dim": lambda h: h["shape"].__setitem__(2, -3),
    "bool dim": lambda h: h["shape"].__setitem__(2, True),
    "float dim": lambda h: h["shape"].__setitem__(2, 3.0),
    "four dims": lambda h: h["shape"].pop(),
    "six dims": lambda h: h["shape"].append(1),
    "shape over 4 GiB": lambda h: h.update(shape=[64, 2, 4096, 32, 256]),
    "3 GiB shape, sizes claim it": lambda h: h.update(shape=HUGE_SHAPE, sizes=[3 << 30]),
    "huge dim": lambda h: h["shape"].__setitem__(0, 2**80),
    "no stages": lambda h: h.update(stages=[], sizes=[]),
    "stages not a list": lambda h: h.update(stages={"name": "raw"}),
    "nine stages": lambda h: h.update(stages=h["stages"] * 9, sizes=h["sizes"] * 9),
    "stage without params": lambda h: h["stages"][0].pop("params"),
    "params not a dict": lambda h: h["stages"][0].update(params=[]),
    "stage name not a string": lambda h: h["stages"][0].update(name=None),
    "sizes too short": lambda h: h.update(sizes=[]),
    "negative size": lambda h: h["sizes"].__setitem__(0, -1),
    "size off by one": lambda h: h["sizes"].__setitem__(-1, h["sizes"][-1] + 1),
    "huge size": lambda h: h["sizes"].__setitem__(0, 2**62),
}
CODEC_EDITS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "3 GiB shape, tiny payload": lambda h: h.update(shape=HUGE_SHAPE),
    "byte codec first": lambda h: h["stages"][0].update(name="zstd"),
    "wrong params": lambda h: h["stages"][0]["params"].update(bits=3),
    "other dtype": lambda h: h.update(dtype="float32"),
    "other shape, same size": lambda h: h["shape"].__setitem__(2, h["shape"][2] * 2),
}


@pytest.mark.parametrize("name", HEADER_EDITS)
@pytest.mark.parametrize("spec", ["raw", "int8"])
def test_signed_header_edits_are_rejected(spec: str, name: str) -> None:
    header, payload = split(BLOBS[spec])
    HEADER_EDITS[name](header)
    assert_rejected(forge(header, payload))


@pytest.mark.parametrize("name", CODEC_EDITS)
@pytest.mark.parametrize("spec", ["raw", "int8"])
def test_signed_edits_that_only_the_codecs_can_see_are_rejected(spec: str, name: str) -> None:
    header, payload = split(BLOBS[spec])
    CODEC_EDITS[name](header)
    assert_rejected(forge(header, payload), by_header=False)


@pytest.mark.parametrize("spec", ["raw", "int8"])
def test_a_signed_blob_naming_an_unknown_codec_is_unavailable_not_corrupt(spec: str) -> None:
    """Nothing in this process can decode it, but it may be valid for a process that
    has the codec's plugin: never corrupt (which would delete it), and nothing allocated."""
    header, payload = split(BLOBS[spec])
    header["stages"][0].update(name="lz4")
    with no_big_allocations(), pytest.raises(CodecUnavailableError, match="lz4"):
        decode_blob(forge(header, payload), REGISTRY)


def test_3gib_chunk_behind_a_tiny_zstd_frame_is_rejected_before_allocating() -> None:
    header = {
        "key": "key",
        "dtype": "float16",
        "shape": HUGE_SHAPE,
        "stages": [{"name": "raw", "params": {}}, {"name": "zstd", "params": {"level": 3}}],
    }
    frame = zstandard.ZstdCompressor().compress(bytes(100))
    assert_rejected(forge({**header, "sizes": [3 << 30, len(frame)]}, frame), by_header=False)
    assert_rejected(forge({**header, "sizes": [100, len(frame)]}, frame), by_header=False)


@pytest.mark.parametrize(
    "text",
    [
        b"",
        b"\xff\xfe",
        b"[1, 2]",
        b"null",
        b"{" * 10,
        b"[" * 100_000 + b"]" * 100_000,
        b'{"key": ' + b"1" * 5000 + b"}",
        b'{"key": NaN}',
        b" " * 100,
    ],
)
def test_signed_garbage_headers_are_rejected(text: bytes) -> None:
    assert_rejected(forge(text, b""))


@pytest.mark.parametrize(
    "framing",
    [
        {"magic": b"KVTX"},
        {"version": 2},
        {"version": 0},
        {"flags": 1},
        {"header_len": 2**32 - 1},
        {"header_len": 0},
        {"payload_len": 2**64 - 1},
        {"payload_len": 0},
    ],
)
def test_signed_bad_framing_is_rejected(framing: dict[str, Any]) -> None:
    header, payload = split(BLOBS["raw"])
    assert_rejected(forge(header, payload, **framing))


def test_oversized_header_is_rejected_even_when_lengths_add_up() -> None:
    header, payload = split(BLOBS["raw"])
    text = json.dumps(header).encode().ljust((64 << 10) + 1)
    assert_rejected(forge(text, payload))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=200, deadline=None)
@given(
    spec=st.sampled_from(PIPELINES),
    field=st.sampled_from(["key", "dtype", "shape", "stages", "sizes"]),
    index=st.integers(0, 5),
    value=json_values,
)
def test_signed_random_header_values_never_escape(
    spec: str, field: str, index: int, value: Any
) -> None:
    header, payload = split(BLOBS[spec])
    target = header[field]
    if isinstance(target, list) and target and index < len(target):
        if isinstance(target[index], dict) and isinstance(value, dict):
            target[index]["params"] = value
        else:
            target[index] = value
    else:
        header[field] = value
    decodes_or_is_rejected(forge(header, payload))


@settings(max_examples=200, deadline=None)
@given(spec=st.sampled_from(PIPELINES), data=st.data())
def test_signed_garbage_payloads_never_escape(spec: str, data: st.DataObject) -> None:
    header, payload = split(BLOBS[spec])
    garbage = data.draw(
        st.one_of(
            st.binary(min_size=len(payload), max_size=len(payload)),
            st.binary(max_size=2 * len(payload)),
        )
    )
    header["sizes"][-1] = len(garbage)
    decodes_or_is_rejected(forge(header, garbage))


def test_the_allocation_guard_catches_big_allocations() -> None:
    with no_big_allocations():
        with pytest.raises(AssertionError, match="allocate"):
            torch.empty(2, ALLOCATION_LIMIT, dtype=torch.uint8)
        with pytest.raises(AssertionError, match="allocate"):
            np.empty(ALLOCATION_LIMIT + 1, dtype=np.uint8)
        assert torch.empty((4, 4), dtype=torch.float16).shape == (4, 4)


def test_a_valid_zstd_frame_of_256_mib_behind_8_kib_is_refused_without_allocating() -> None:
    """Issue 11, item 11: decoding without an output tensor (``migrate --recode``) must
    not expand a tiny blob into a huge chunk, however valid its frame and checksum."""
    nbytes = 256 << 20
    frame = zstandard.ZstdCompressor().compress(bytes(nbytes))
    assert len(frame) < 16 << 10
    header = {
        "key": "key",
        "dtype": "float16",
        "shape": [32, 2, 2048, 8, 128],  # 256 MiB of fp16
        "stages": [{"name": "raw", "params": {}}, {"name": "zstd", "params": {"level": 3}}],
        "sizes": [nbytes, len(frame)],
    }
    with no_big_allocations(), pytest.raises(ChunkCorruptedError, match="more than 64x"):
        decode_blob(forge(header, frame), REGISTRY)


def test_scratch_beyond_the_kept_size_is_let_go() -> None:
    from kvtier.core.codecs import _views
    from kvtier.core.codecs.zstd import ZstdCodec

    codec = ZstdCodec()
    small, big = bytes(1 << 20), bytes(_views.KEEP_BYTES + (1 << 20))
    for data in (small, big, small):
        frame = zstandard.ZstdCompressor().compress(data)
        assert bytes(codec.decode(memoryview(frame), {"level": 3}, len(data))) == data
        kept = getattr(codec._scratch._local, "array", None)
        assert kept is None or kept.nbytes <= _views.KEEP_BYTES
