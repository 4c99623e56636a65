"""kvtier's self-describing blob format, and the codec pipeline that writes it.

Layout (integers little-endian)::

    0                magic b"KVTB"
    4                format version, u16 (1)
    6                flags, u16 (0; anything else is corrupt)
    8                header_len, u32 (at most MAX_HEADER_BYTES)
    12               payload_len, u64
    20               header: UTF-8 JSON, header_len bytes
                     {"key": str, "dtype": "float16", "shape": [L, 2, T, H, D],
                      "stages": [{"name": "int8", "params": {...}}, ...],
                      "sizes": [n0, n1, ...]}
    20+header_len    payload, payload_len bytes
    end-8            xxh3_64 of every byte before it, u64

``sizes[i]`` is the payload size after stage ``i``; the last equals payload_len. The
encoder pads the JSON with spaces so that the payload starts at a multiple of 64
bytes. Everything read from a blob is validated before it is used: lengths first
(so a lying header cannot make the reader allocate), then the checksum, then the
header's fields. Any inconsistency raises :class:`ChunkCorruptedError`, which the
tier chain treats as a miss.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import torch
import xxhash

from kvtier.core.buffers import Buffer, BufferPool, BytesLike
from kvtier.core.codec import ByteCodec, Codec, Params, TensorCodec
from kvtier.core.errors import ChunkCorruptedError, ConfigError, PluginError
from kvtier.core.layout import DTYPES, dtype_name
from kvtier.core.plugins import PluginRegistry
from kvtier.core.validation import validate_model

MAGIC = b"KVTB"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 << 10
MAX_CHUNK_BYTES = 4 << 30
MAX_STAGES = 8
MAX_STAGE_BYTES = MAX_CHUNK_BYTES + (64 << 20)
"""Largest payload any stage may declare: a chunk plus what compression may add."""

_PREFIX = struct.Struct("<4sHHIQ")
_CHECKSUM = struct.Struct("<Q")
_OVERHEAD = _PREFIX.size + _CHECKSUM.size
_PAYLOAD_ALIGN = 64
_PARAMS_SLACK = 128
"""Header bytes reserved for the tensor codec's parameters before they are known."""
_HEADER_KEYS = frozenset({"key", "dtype", "shape", "stages", "sizes"})
_STAGE_KEYS = frozenset({"name", "params"})


@dataclass(frozen=True)
class BlobHeader:
    """A validated blob header; ``nbytes`` is the whole blob's size."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stages: tuple[tuple[str, dict[str, Any]], ...]
    sizes: tuple[int, ...]
    payload_nbytes: int
    nbytes: int

    @property
    def payload_offset(self) -> int:
        """Where the payload starts in the blob."""
        return self.nbytes - _CHECKSUM.size - self.payload_nbytes


Steps: TypeAlias = str | Sequence[str | Mapping[str, Any]]
"""A pipeline in a config: ``"int8+zstd"`` or ``["int8", {"name": "zstd", "level": 9}]``."""


def _parse_steps(steps: Steps) -> list[tuple[str, dict[str, Any]]]:
    if not isinstance(steps, (str, Sequence)):
        raise ConfigError(f"a codec pipeline is a string or a list of steps, got {steps!r}")
    items = steps.split("+") if isinstance(steps, str) else steps
    parsed = []
    for item in items:
        if isinstance(item, str):
            name, options = item.strip(), {}
        elif isinstance(item, Mapping) and isinstance(item.get("name"), str):
            options = {k: v for k, v in item.items() if k != "name"}
            name = item["name"].strip()
        else:
            raise ConfigError(
                f"codec pipeline {steps!r}: each step is a codec name or a mapping with a "
                f"'name' key and the codec's options, got {item!r}"
            )
        if not name:
            raise ConfigError(f"codec pipeline {steps!r} has an empty step")
        parsed.append((name, options))
    if not parsed:
        raise ConfigError("codec pipeline is empty; use 'raw' to store chunks unencoded")
    return parsed


def _build(name: str, options: Mapping[str, Any], registry: PluginRegistry) -> Codec:
    spec = registry.codec(name)
    return spec.load()(validate_model(spec.options, options, where=f"codec {name!r}"))


def _padded_header_len(nbytes: int) -> int:
    """Header length >= ``nbytes`` that puts the payload on a 64-byte boundary."""
    return -(-(_PREFIX.size + nbytes) // _PAYLOAD_ALIGN) * _PAYLOAD_ALIGN - _PREFIX.size


_MAX_PADDED_HEADER = (
    _PREFIX.size + MAX_HEADER_BYTES
) // _PAYLOAD_ALIGN * _PAYLOAD_ALIGN - _PREFIX.size


def _seal(view: memoryview, header: bytes, header_len: int, payload_len: int) -> None:
    """Write prefix and space-padded header in front of the payload, checksum after it."""
    _PREFIX.pack_into(view, 0, MAGIC, FORMAT_VERSION, 0, header_len, payload_len)
    end = _PREFIX.size + header_len
    view[_PREFIX.size : _PREFIX.size + len(header)] = header
    view[_PREFIX.size + len(header) : end] = b" " * (header_len - len(header))
    body = view.nbytes - _CHECKSUM.size
    _CHECKSUM.pack_into(view, body, xxhash.xxh3_64_intdigest(view[:body]))


def _assemble(header: bytes, payload: memoryview, pool: BufferPool) -> Buffer:
    header_len = _padded_header_len(len(header))
    buf = pool.acquire(_OVERHEAD + header_len + payload.nbytes)
    start = _PREFIX.size + header_len
    buf.view[start : start + payload.nbytes] = payload
    _seal(buf.view, header, header_len, payload.nbytes)
    return buf


class CodecPipeline:
    """One :class:`TensorCodec` then zero or more :class:`ByteCodec` stages.

    Encodes chunks into blobs; :func:`decode_blob` reads them back using only the
    blob's header, whatever pipeline wrote it. Thread safe when its codecs are (the
    built-in ones are). Each byte codec may appear once.
    """

    def __init__(self, stages: Sequence[Codec]) -> None:
        stages = tuple(stages)
        if not stages or not isinstance(stages[0], TensorCodec):
            first = stages[0].name if stages else "nothing"
            raise ConfigError(
                f"a codec pipeline starts with a tensor codec (raw, int8, int4, fp8), not {first}"
            )
        names = [codec.name for codec in stages]
        for codec in stages[1:]:
            if not isinstance(codec, ByteCodec):
                raise ConfigError(
                    f"codec {codec.name!r} transforms tensors and must come first in "
                    f"{'+'.join(names)!r}; only byte codecs (shuffle, zstd) may follow"
                )
            if names.count(codec.name) > 1:
                raise ConfigError(f"codec {codec.name!r} appears twice in {'+'.join(names)!r}")
        self.stages: tuple[Codec, ...] = stages
        self.tensor_codec: TensorCodec = stages[0]
        self.byte_codecs = tuple(c for c in stages[1:] if isinstance(c, ByteCodec))
        self.name = "+".join(names)

    @classmethod
    def from_config(cls, steps: Steps, registry: PluginRegistry) -> CodecPipeline:
        """Build from ``"int8+zstd"`` or ``["int8", {"name": "zstd", "level": 9}]``.

        A pipeline that does not start with a tensor codec gets ``raw`` in front
        (``"zstd"`` means ``"raw+zstd"``). Unknown codecs and invalid options raise
        :class:`ConfigError` naming them.
        """
        codecs = [_build(name, options, registry) for name, options in _parse_steps(steps)]
        if not isinstance(codecs[0], TensorCodec):
            codecs.insert(0, _build("raw", {}, registry))
        return cls(codecs)

    def __repr__(self) -> str:
        return f"CodecPipeline({self.name!r})"

    def _header(
        self, key: str, chunk: torch.Tensor, params: list[Params], sizes: list[int]
    ) -> bytes:
        for codec, p in zip(self.stages, params, strict=True):
            if not isinstance(p, dict):
                raise PluginError(f"codec {codec.name!r} returned parameters {p!r}, not a dict")
        header = {
            "key": key,
            "dtype": dtype_name(chunk.dtype),
            "shape": list(chunk.shape),
            "stages": [
                {"name": c.name, "params": p} for c, p in zip(self.stages, params, strict=True)
            ],
            "sizes": sizes,
        }
        try:
            text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
        except (TypeError, ValueError) as exc:
            raise PluginError(f"pipeline {self.name!r}: parameters are not JSON: {exc}") from exc
        if _padded_header_len(len(text)) > _MAX_PADDED_HEADER:
            raise ConfigError(
                f"blob header for key {key[:80]!r} is {len(text)} bytes; the limit is "
                f"{MAX_HEADER_BYTES} (is the key that long?)"
            )
        return text

    def encode(self, key: str, chunk: torch.Tensor, pool: BufferPool) -> Buffer:
        """Encode ``chunk`` (``[L, 2, T, H, D]``, any strides) into a blob.

        The blob lives in a buffer leased from ``pool``; the caller owns (and
        releases) it. With a tensor codec alone the payload is written in place, so
        ``raw`` costs one copy plus the checksum.
        """
        dtype_name(chunk.dtype)  # ConfigError for dtypes a blob cannot name
        if chunk.dim() != 5:
            raise ConfigError(f"a chunk is [L, 2, T, H, D]; got shape {tuple(chunk.shape)}")
        if chunk.numel() * chunk.element_size() > MAX_CHUNK_BYTES:
            raise ConfigError(f"chunk {tuple(chunk.shape)} is larger than {MAX_CHUNK_BYTES} bytes")
        payload_len = self.tensor_codec.encoded_nbytes(chunk.shape, chunk.dtype)
        if not self.byte_codecs:
            return self._encode_in_place(key, chunk, payload_len, pool)
        with pool.acquire(payload_len) as first:
            params = [self.tensor_codec.encode_into(chunk, first.view)]
            data: BytesLike = first.view
            sizes = [payload_len]
            itemsize = self.tensor_codec.payload_itemsize(chunk.dtype)
            for codec in self.byte_codecs:
                data, stage_params = codec.encode(memoryview(data).cast("B"), itemsize)
                params.append(stage_params)
                sizes.append(memoryview(data).nbytes)
            header = self._header(key, chunk, params, sizes)
            return _assemble(header, memoryview(data).cast("B"), pool)

    def _encode_in_place(
        self, key: str, chunk: torch.Tensor, payload_len: int, pool: BufferPool
    ) -> Buffer:
        guess = self._header(key, chunk, [{}], [payload_len])
        header_len = min(_padded_header_len(len(guess) + _PARAMS_SLACK), _MAX_PADDED_HEADER)
        start = _PREFIX.size + header_len
        buf = pool.acquire(_OVERHEAD + header_len + payload_len)
        try:
            payload = buf.view[start : start + payload_len]
            params = self.tensor_codec.encode_into(chunk, payload)
            header = self._header(key, chunk, [params], [payload_len])
            if len(header) <= header_len:
                _seal(buf.view, header, header_len, payload_len)
                return buf
            relocated = _assemble(header, payload, pool)
        except BaseException:
            buf.release()
            raise
        buf.release()
        return relocated


def _view_of(blob: BytesLike | Buffer) -> memoryview:
    view = blob.view if isinstance(blob, Buffer) else memoryview(blob)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _corrupt(what: str) -> ChunkCorruptedError:
    return ChunkCorruptedError(f"corrupt blob: {what}")


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _parse_header(text: bytes, payload_len: int, nbytes: int) -> BlobHeader:
    try:
        obj = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _corrupt(f"header is not UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict) or set(obj) != _HEADER_KEYS:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise _corrupt(f"header must be an object with keys {sorted(_HEADER_KEYS)}, got {keys}")
    key, dtype, shape, stages, sizes = (
        obj[k] for k in ("key", "dtype", "shape", "stages", "sizes")
    )
    if not isinstance(key, str):
        raise _corrupt(f"key must be a string, got {key!r:.80}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(f"unsupported dtype {dtype!r:.80}")
    torch_dtype = DTYPES[dtype]
    if not isinstance(shape, list) or len(shape) != 5 or not all(map(_is_count, shape)):
        raise _corrupt(f"shape must be 5 non-negative integers, got {shape!r:.120}")
    if math.prod(shape) * torch_dtype.itemsize > MAX_CHUNK_BYTES:
        raise _corrupt(f"shape {shape} holds more than {MAX_CHUNK_BYTES} bytes")
    if not isinstance(stages, list) or not 1 <= len(stages) <= MAX_STAGES:
        raise _corrupt(f"stages must be a list of 1..{MAX_STAGES} stages, got {stages!r:.120}")
    parsed = []
    for stage in stages:
        if (
            not isinstance(stage, dict)
            or set(stage) != _STAGE_KEYS
            or not isinstance(stage["name"], str)
            or not isinstance(stage["params"], dict)
        ):
            raise _corrupt(f"a stage must be {{name: str, params: {{...}}}}, got {stage!r:.120}")
        parsed.append((stage["name"], stage["params"]))
    if not isinstance(sizes, list) or len(sizes) != len(stages) or not all(map(_is_count, sizes)):
        raise _corrupt(f"sizes must be one non-negative integer per stage, got {sizes!r:.120}")
    if max(sizes) > MAX_STAGE_BYTES:
        raise _corrupt(f"a stage size exceeds {MAX_STAGE_BYTES} bytes: {sizes}")
    if sizes[-1] != payload_len:
        raise _corrupt(f"last stage size {sizes[-1]} != payload length {payload_len}")
    return BlobHeader(
        key, torch_dtype, tuple(shape), tuple(parsed), tuple(sizes), payload_len, nbytes
    )


def read_header(blob: BytesLike | Buffer) -> BlobHeader:
    """Validate ``blob``'s framing, checksum and header; :class:`ChunkCorruptedError` if bad."""
    view = _view_of(blob)
    nbytes = view.nbytes
    if nbytes < _OVERHEAD:
        raise _corrupt(f"{nbytes} bytes is shorter than the {_OVERHEAD}-byte minimum")
    magic, version, flags, header_len, payload_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise _corrupt(f"magic is {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise _corrupt(f"format version {version}, this kvtier reads {FORMAT_VERSION}")
    if flags:
        raise _corrupt(f"unknown flags {flags:#06x}")
    if header_len > MAX_HEADER_BYTES:
        raise _corrupt(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    if _OVERHEAD + header_len + payload_len != nbytes:
        raise _corrupt(
            f"{nbytes} bytes, but the prefix declares {_OVERHEAD} + {header_len} (header) "
            f"+ {payload_len} (payload)"
        )
    body = nbytes - _CHECKSUM.size
    (stored,) = _CHECKSUM.unpack_from(view, body)
    if xxhash.xxh3_64_intdigest(view[:body]) != stored:
        raise _corrupt("checksum mismatch")
    return _parse_header(bytes(view[_PREFIX.size : _PREFIX.size + header_len]), payload_len, nbytes)


def verify(blob: BytesLike | Buffer, *, expected_key: str | None = None) -> BlobHeader:
    """:func:`read_header`, and the header's key must be ``expected_key`` (when given):
    the one check for bytes that come from outside this process."""
    header = read_header(blob)
    if expected_key is not None and header.key != expected_key:
        raise _corrupt(f"foreign blob: key {header.key!r:.120}, expected {expected_key!r:.120}")
    return header


_decoders: weakref.WeakKeyDictionary[PluginRegistry, dict[str, Codec]] = weakref.WeakKeyDictionary()
_decoders_lock = threading.Lock()


def _decoder(registry: PluginRegistry, name: str) -> Codec:
    """The registry's codec ``name`` with default options, built once per registry."""
    with _decoders_lock:
        cache = _decoders.setdefault(registry, {})
        codec = cache.get(name)
        if codec is None:
            codec = cache[name] = registry.codec(name).load()()
        return codec


def _decode_stages(
    header: BlobHeader, payload: memoryview, registry: PluginRegistry, out: torch.Tensor | None
) -> torch.Tensor:
    names = [name for name, _ in header.stages]
    codecs = [_decoder(registry, name) for name in names]
    tensor_codec = codecs[0]
    byte_codecs = [codec for codec in codecs[1:] if isinstance(codec, ByteCodec)]
    if not isinstance(tensor_codec, TensorCodec) or len(byte_codecs) != len(codecs) - 1:
        raise _corrupt(f"stages {names} are not one tensor codec followed by byte codecs")
    if len(set(names)) != len(names):
        raise _corrupt(f"stages {names} repeat a codec")
    expected = tensor_codec.encoded_nbytes(header.shape, header.dtype)
    if header.sizes[0] != expected:
        raise _corrupt(
            f"{names[0]} payload for {header.shape} is {expected} bytes, not {header.sizes[0]}"
        )
    if out is not None and (tuple(out.shape) != header.shape or out.dtype != header.dtype):
        raise _corrupt(
            f"blob holds {header.shape} {header.dtype}, expected {tuple(out.shape)} {out.dtype}"
        )
    data = payload
    stages = zip(byte_codecs, header.stages[1:], header.sizes[:-1], strict=True)
    for codec, (name, params), nbytes in reversed(list(stages)):
        data = memoryview(codec.decode(data, params, nbytes)).cast("B")
        if data.nbytes != nbytes:
            raise _corrupt(f"{name} produced {data.nbytes} bytes, expected {nbytes}")
    if out is None:
        out = torch.empty(header.shape, dtype=header.dtype)
    tensor_codec.decode_into(data, header.stages[0][1], out)
    return out


def decode_blob(
    blob: BytesLike | Buffer,
    registry: PluginRegistry,
    out: torch.Tensor | None = None,
    *,
    expected_key: str | None = None,
) -> tuple[BlobHeader, torch.Tensor]:
    """Validate and decode ``blob``; returns its header and the chunk.

    The chunk is written into ``out`` when given (its shape and dtype must match the
    header; any strides), else into a new tensor that does not alias the blob. A key
    other than ``expected_key``, an unknown codec, or any failure while decoding
    raises :class:`ChunkCorruptedError`; ``out`` may then be partly written. An ``out``
    that cannot be written here (an inference tensor outside inference mode) raises
    :class:`ValueError` before anything is read.
    """
    if out is not None and out.is_inference() and not torch.is_inference_mode_enabled():
        # The caller's mistake, not the blob's: never let it discard a valid chunk.
        raise ValueError("out is an inference tensor: decode into it inside torch.inference_mode()")
    header = verify(blob, expected_key=expected_key)
    payload = _view_of(blob)[header.payload_offset : header.payload_offset + header.payload_nbytes]
    try:
        return header, _decode_stages(header, payload, registry, out)
    except ChunkCorruptedError:
        raise
    except Exception as exc:
        raise _corrupt(f"decoding {header.key!r:.120} failed: {type(exc).__name__}: {exc}") from exc
