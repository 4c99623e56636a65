"""Decoding blobs: the codec stages a blob's header names, run backwards into a tensor.

The inverse of :class:`~kvtier.core.codecs.pipeline.CodecPipeline`. Everything it reads
from a header was validated by :func:`kvtier.core.blob.verify` or
:func:`~kvtier.core.blob.parse`; a blob whose stages do not add up raises
:class:`ChunkCorruptedError`, one that needs a codec this process lacks raises
:class:`CodecUnavailableError`, and a caller's unusable ``out`` raises
:class:`ValueError` before anything is read.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from kvtier.core.blob import Blob, BlobHeader, payload_of, verify
from kvtier.core.buffers import Buffer, BufferPool, BytesLike
from kvtier.core.codec import ByteCodec, Codec, TensorCodec
from kvtier.core.codecs._views import ThreadScratch, tensor_view
from kvtier.core.errors import ChunkCorruptedError, CodecUnavailableError, ConfigError
from kvtier.core.plugins import PluginRegistry

if TYPE_CHECKING:
    from kvtier.core.codecs.pipeline import CodecPipeline
    from kvtier.core.integrity import MacKeys


@dataclass(frozen=True)
class Sink:
    """Where :func:`decode_to` hands a chunk instead of writing a tensor: ``deliver``
    is called once with the chunk, shaped ``shape`` with ``dtype``, and the buffer
    the chunk lives in.

    The tensor passed to ``deliver`` must not be written and is only valid during the
    call: for a ``raw`` blob it is a zero-copy view of the blob's bytes (which a
    process-local tier may share) and the buffer is the blob's, which ``deliver`` may
    :meth:`~kvtier.core.buffers.Buffer.retain` (and release later) to keep the view
    valid; for other codecs it is a per-thread scratch tensor that the thread's next
    decode overwrites, and the buffer is ``None``. Copy out of it what is needed."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    deliver: Callable[[torch.Tensor, Buffer | None], None]


_scratch = ThreadScratch()
"""Per-thread memory that non-raw chunks are decoded into on their way to a :class:`Sink`."""


def _corrupt(what: str) -> ChunkCorruptedError:
    return ChunkCorruptedError(f"corrupt blob: {what}")


_decoders: weakref.WeakKeyDictionary[PluginRegistry, dict[str, Codec]] = weakref.WeakKeyDictionary()
_decoders_lock = threading.Lock()


def _decoder(registry: PluginRegistry, name: str) -> Codec:
    """The registry's codec ``name`` with default options, built once per registry;
    :class:`CodecUnavailableError` when no plugin provides it."""
    with _decoders_lock:
        cache = _decoders.setdefault(registry, {})
        codec = cache.get(name)
        if codec is None:
            try:
                spec = registry.codec(name)
            except ConfigError as exc:
                raise CodecUnavailableError(f"blob needs {exc}") from None
            codec = cache[name] = spec.load()()
        return codec


def check_out(out: torch.Tensor) -> None:
    """Raise :class:`ValueError` for an ``out`` that cannot be written here (an
    inference tensor outside inference mode): the caller's mistake, not the blob's."""
    if out.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError("out is an inference tensor: decode into it inside torch.inference_mode()")


def _codecs_for(
    header: BlobHeader, registry: PluginRegistry
) -> tuple[TensorCodec, list[ByteCodec]]:
    """The codecs of ``header``'s stages, after checking that they can hold its shape
    (before anything is allocated for it)."""
    names = [name for name, _ in header.stages]
    codecs = [_decoder(registry, name) for name in names]
    tensor_codec = codecs[0]
    byte_codecs = [codec for codec in codecs[1:] if isinstance(codec, ByteCodec)]
    if not isinstance(tensor_codec, TensorCodec) or len(byte_codecs) != len(codecs) - 1:
        raise _corrupt(f"stages {names} are not one tensor codec followed by byte codecs")
    if len(set(names)) != len(names):
        raise _corrupt(f"stages {names} repeat a codec")
    try:
        expected = tensor_codec.encoded_nbytes(header.shape, header.dtype)
    except Exception as exc:
        raise _corrupt(
            f"{names[0]} cannot size {header.shape}: {type(exc).__name__}: {exc}"
        ) from exc
    if header.sizes[0] != expected:
        raise _corrupt(
            f"{names[0]} payload for {header.shape} is {expected} bytes, not {header.sizes[0]}"
        )
    if header.layers is not None:
        section = tensor_codec.encoded_nbytes((1, *header.shape[1:]), header.dtype)
        if any(sizes[0] != section for sizes in header.layers):
            raise _corrupt(f"{names[0]} sections of {header.shape} are {section} bytes each")
    return tensor_codec, byte_codecs


def decode_into(
    blob: BytesLike | Buffer | Blob,
    header: BlobHeader,
    registry: PluginRegistry,
    out: torch.Tensor,
) -> None:
    """Decode a blob whose ``header`` was validated (:func:`verify` / :func:`parse`)
    into ``out`` (the header's shape and dtype, any strides).

    A blob that does not decode to ``out``'s shape, or whose stages fail, raises
    :class:`ChunkCorruptedError` (``out`` may then be partly written); a codec this
    process does not have raises :class:`CodecUnavailableError` (the blob is fine).
    """
    check_out(out)
    tensor_codec, byte_codecs = _codecs_for(header, registry)
    if tuple(out.shape) != header.shape or out.dtype != header.dtype:
        raise _corrupt(
            f"blob holds {header.shape} {header.dtype}, expected {tuple(out.shape)} {out.dtype}"
        )
    payload = payload_of(blob, header)
    if header.layers is None:
        _decode_section(payload, header, header.sizes, tensor_codec, byte_codecs, out)
        return
    offset = 0
    for layer, sizes in enumerate(header.layers):
        section = payload[offset : offset + sizes[-1]]
        _decode_section(section, header, sizes, tensor_codec, byte_codecs, out[layer : layer + 1])
        offset += sizes[-1]


def _decode_section(
    data: memoryview,
    header: BlobHeader,
    sizes: Sequence[int],
    tensor_codec: TensorCodec,
    byte_codecs: Sequence[ByteCodec],
    out: torch.Tensor,
) -> None:
    """Run the byte codecs backwards over ``data`` (sizes after each stage: ``sizes``),
    then the tensor codec into ``out``."""
    try:
        stages = zip(byte_codecs, header.stages[1:], sizes[:-1], strict=True)
        for codec, (name, params), nbytes in reversed(list(stages)):
            data = memoryview(codec.decode(data, params, nbytes)).cast("B")
            if data.nbytes != nbytes:
                raise _corrupt(f"{name} produced {data.nbytes} bytes, expected {nbytes}")
        tensor_codec.decode_into(data, header.stages[0][1], out)
    except (ChunkCorruptedError, MemoryError):
        raise
    except Exception as exc:
        raise _corrupt(f"decoding {header.key!r:.120} failed: {type(exc).__name__}: {exc}") from exc


def layer_of(
    blob: BytesLike | Buffer | Blob, header: BlobHeader, layer: int, registry: PluginRegistry
) -> torch.Tensor:
    """Layer ``layer`` (``[2, T, H, D]``) of a layered blob whose head and that layer's
    section were checked: a zero-copy view of the section for ``raw`` blobs (valid while
    the blob is), else decoded into per-thread scratch memory that the thread's next
    decode overwrites. Raises :class:`ChunkCorruptedError` like :func:`decode_into`."""
    assert header.layers is not None, "a whole-chunk blob has no layers to read alone"
    tensor_codec, byte_codecs = _codecs_for(header, registry)
    offset, nbytes = header.section(layer)
    start = offset - header.payload_offset
    section = payload_of(blob, header)[start : start + nbytes]
    shape = (1, *header.shape[1:])
    count = math.prod(shape)
    if header.pipeline == "raw" and count:
        return tensor_view(section, header.dtype, count).view(header.shape[1:])
    memory = _scratch.get(count * header.dtype.itemsize)
    out = tensor_view(memory, header.dtype, count).view(shape)
    _decode_section(section, header, header.layers[layer], tensor_codec, byte_codecs, out)
    return out[0]


MAX_EXPANSION = 64
"""A blob decoded into a new tensor may declare at most this many times its own size.
KV chunks shrink 1.1-4x under kvtier's codecs: a header claiming far more is forged or
broken, and must not make the reader allocate for it."""


def _empty_chunk(header: BlobHeader, registry: PluginRegistry) -> torch.Tensor:
    """A new tensor for ``header``'s chunk, once its stages were checked to hold it and
    it is within :data:`MAX_EXPANSION` of the blob's size."""
    _codecs_for(header, registry)
    nbytes = math.prod(header.shape) * header.dtype.itemsize
    if nbytes > MAX_EXPANSION * header.nbytes:
        raise _corrupt(
            f"a {header.nbytes}-byte blob declares a {nbytes}-byte chunk {header.shape}: "
            f"more than {MAX_EXPANSION}x its size"
        )
    return torch.empty(header.shape, dtype=header.dtype)


def _raw_view(blob: BytesLike | Buffer | Blob, header: BlobHeader) -> torch.Tensor:
    """The chunk of a checked non-empty ``raw`` blob: a view of its payload, no copy."""
    count = header.payload_nbytes // header.dtype.itemsize
    return tensor_view(payload_of(blob, header), header.dtype, count).view(header.shape)


def chunk_of(blob: Blob, registry: PluginRegistry) -> torch.Tensor:
    """The chunk ``blob`` holds: a zero-copy view of its payload for ``raw`` blobs (valid
    while the blob is), else decoded into a new tensor."""
    header = blob.header
    if header.pipeline == "raw" and header.payload_nbytes:
        return _raw_view(blob, header)
    out = _empty_chunk(header, registry)
    decode_into(blob, header, registry, out)
    return out


def check_target(
    header: BlobHeader, registry: PluginRegistry, shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """Check, before anything is decoded, that the blob ``header`` describes holds a
    chunk of ``shape`` and ``dtype`` through stages that can hold it:
    :class:`ChunkCorruptedError` if not, :class:`CodecUnavailableError` for a stage this
    process lacks."""
    _codecs_for(header, registry)
    if header.shape != tuple(shape) or header.dtype != dtype:
        raise _corrupt(f"blob holds {header.shape} {header.dtype}, expected {shape} {dtype}")


def decode_to(
    blob: Buffer,
    header: BlobHeader,
    registry: PluginRegistry,
    target: torch.Tensor | Sink,
) -> None:
    """:func:`decode_into` a tensor ``target``, or hand the chunk to a :class:`Sink`:
    the payload itself for a ``raw`` blob (no copy), else the chunk decoded into
    per-thread scratch memory. The sink is called only once the blob has decoded
    without error into ``target``'s shape and dtype (its checksum or MAC was checked
    by the caller before); a blob that does not raises :class:`ChunkCorruptedError`
    and the sink never sees a byte of it."""
    if isinstance(target, torch.Tensor):
        decode_into(blob, header, registry, target)
        return
    check_target(header, registry, target.shape, target.dtype)
    if header.pipeline == "raw" and header.payload_nbytes:
        target.deliver(_raw_view(blob, header), blob)
        return
    count = math.prod(header.shape)
    memory = _scratch.get(count * header.dtype.itemsize)
    chunk = tensor_view(memory, header.dtype, count).view(header.shape)
    decode_into(blob, header, registry, chunk)
    target.deliver(chunk, None)


def decode_blob(
    blob: BytesLike | Buffer | Blob,
    registry: PluginRegistry,
    out: torch.Tensor | None = None,
    *,
    expected_key: str | None = None,
) -> tuple[BlobHeader, torch.Tensor]:
    """:func:`verify` then :func:`decode_into`; returns the header and the chunk (in
    ``out`` when given, else in a new tensor that does not alias the blob)."""
    if out is not None:
        check_out(out)  # before anything is read
    header = verify(blob, expected_key=expected_key)
    if out is None:
        out = _empty_chunk(header, registry)
    decode_into(blob, header, registry, out)
    return header, out


def recode(
    blob: Blob,
    pipeline: CodecPipeline,
    registry: PluginRegistry,
    pool: BufferPool,
    keys: MacKeys | None = None,
) -> Blob:
    """``blob`` in ``pipeline``'s encoding: another reference to the same bytes when it
    already is (its checksum is passed along, not recomputed), else encoded anew (and
    signed with ``keys`` when given)."""
    if blob.header.pipeline == pipeline.name:
        return blob.retain()
    chunk = chunk_of(blob, registry)
    return pipeline.encode(
        blob.key, chunk, pool, keys=keys, segment_start=blob.header.segment_start
    )
