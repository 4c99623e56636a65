"""The codec pipeline of a tier: one tensor codec, then byte codecs, written as a blob."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import torch

from kvtier.core import blob as fmt
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.codec import ByteCodec, Codec, Params, TensorCodec
from kvtier.core.errors import ConfigError, PluginError
from kvtier.core.integrity import MacKeys
from kvtier.core.layout import dtype_name
from kvtier.core.plugins import PluginRegistry
from kvtier.core.validation import validate_model

Steps: TypeAlias = str | Sequence[str | Mapping[str, Any]]
"""A pipeline in a config: ``"int8+zstd"`` or ``["int8", {"name": "zstd", "level": 9}]``."""

_PARAMS_SLACK = 128
"""Header bytes reserved for the tensor codec's parameters before they are known."""


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


def _lease(
    pool: BufferPool, header_len: int, payload_len: int, flags: int, sections: int
) -> Buffer:
    """A buffer from ``pool`` for a blob: prefix, ``header_len`` bytes of (padded)
    header, ``payload_len`` bytes of payload and the trailer ``flags`` ask for (after
    the digests of ``sections`` sections of a layered blob)."""
    trailer = fmt.trailer_bytes(bool(flags), sections)
    return pool.acquire(fmt.payload_start(header_len) + payload_len + trailer)


def _framed(
    buf: Buffer, header: bytes, header_len: int, payload_len: int, flags: int, layered: bool
) -> fmt.Blob:
    """``buf`` as an unsealed blob, once prefix and header are written in front of its
    payload (see :func:`kvtier.core.blob.frame`)."""
    version = fmt.LAYERED_VERSION if layered else fmt.FORMAT_VERSION
    fmt.frame(buf.view, header, header_len, payload_len, flags, version)
    return fmt.Blob(buf, fmt.parse(buf.view), sealed=False)


def _build(name: str, options: Mapping[str, Any], registry: PluginRegistry) -> Codec:
    spec = registry.codec(name)
    return spec.load()(validate_model(spec.options, options, where=f"codec {name!r}"))


class CodecPipeline:
    """One :class:`TensorCodec` then zero or more :class:`ByteCodec` stages.

    Encodes chunks into blobs; :func:`kvtier.core.blob.decode_into` reads them back
    using only the blob's header, whatever pipeline wrote it. Thread safe when its
    codecs are (the built-in ones are). Each byte codec may appear once. ``layered``:
    write layer-addressable blobs (each layer encoded on its own, see
    :mod:`kvtier.core.blob.layered`), else whole-chunk ones.
    """

    def __init__(self, stages: Sequence[Codec], *, layered: bool = False) -> None:
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
        self.layered = layered

    @classmethod
    def from_config(
        cls, steps: Steps, registry: PluginRegistry, *, layered: bool = False
    ) -> CodecPipeline:
        """Build from ``"int8+zstd"`` or ``["int8", {"name": "zstd", "level": 9}]``.

        A pipeline that does not start with a tensor codec gets ``raw`` in front
        (``"zstd"`` means ``"raw+zstd"``). Unknown codecs and invalid options raise
        :class:`ConfigError` naming them.
        """
        codecs = [_build(name, options, registry) for name, options in _parse_steps(steps)]
        if not isinstance(codecs[0], TensorCodec):
            codecs.insert(0, _build("raw", {}, registry))
        return cls(codecs, layered=layered)

    def __repr__(self) -> str:
        return f"CodecPipeline({self.name!r}{', layered' if self.layered else ''})"

    def _header(
        self,
        key: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        params: list[Params],
        sizes: list[int],
        segment_start: int | None = None,
        layers: list[list[int]] | None = None,
    ) -> bytes:
        for codec, p in zip(self.stages, params, strict=True):
            if not isinstance(p, dict):
                raise PluginError(f"codec {codec.name!r} returned parameters {p!r}, not a dict")
        stages = [(codec.name, p) for codec, p in zip(self.stages, params, strict=True)]
        try:
            return fmt.header_json(key, dtype, shape, stages, sizes, segment_start, layers)
        except (TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise PluginError(f"pipeline {self.name!r}: parameters are not JSON: {exc}") from exc

    def encode(
        self,
        key: str,
        chunk: torch.Tensor,
        pool: BufferPool,
        *,
        sealed: bool = True,
        keys: MacKeys | None = None,
        segment_start: int | None = None,
    ) -> fmt.Blob:
        """Encode ``chunk`` (``[L, 2, T, H, D]``, any strides) into a blob, signed with
        ``keys`` when given (:mod:`kvtier.core.integrity`).

        The blob lives in a buffer leased from ``pool``; the caller owns (and
        releases) it. With a tensor codec alone the payload is written in place, so
        ``raw`` costs one copy plus the checksum. ``sealed=False`` leaves the checksum
        (and MAC) out: the caller seals the blob (:meth:`Blob.ensure_sealed`) before its
        bytes leave the process, and only then. ``segment_start`` marks a chunk of a
        position-independent segment (see :mod:`kvtier.core.blob`).
        """
        flags = fmt.signing_flags(keys)
        dtype_name(chunk.dtype)  # ConfigError for dtypes a blob cannot name
        if chunk.dim() != 5:
            raise ConfigError(f"a chunk is [L, 2, T, H, D]; got shape {tuple(chunk.shape)}")
        if chunk.numel() * chunk.element_size() > fmt.MAX_CHUNK_BYTES:
            raise ConfigError(
                f"chunk {tuple(chunk.shape)} is larger than {fmt.MAX_CHUNK_BYTES} bytes"
            )
        if not self.byte_codecs:
            blob = self._encode_in_place(key, chunk, pool, flags, segment_start)
        else:
            blob = self._encode_staged(key, chunk, pool, flags, segment_start)
        if sealed:
            blob.ensure_sealed(keys)
        return blob

    def _sections(self, chunk: torch.Tensor) -> list[torch.Tensor]:
        """The parts of ``chunk`` encoded on their own: each layer (``[1, 2, T, H, D]``)
        of a layered pipeline, else the whole chunk."""
        if not self.layered:
            return [chunk]
        return [chunk[i : i + 1] for i in range(chunk.shape[0])]

    def _encode_staged(
        self,
        key: str,
        chunk: torch.Tensor,
        pool: BufferPool,
        flags: int,
        segment_start: int | None,
    ) -> fmt.Blob:
        """Encode through the byte codecs (each layer on its own for a layered blob),
        then copy the result behind the header."""
        dtype, shape = chunk.dtype, tuple(chunk.shape)
        if not self.layered:
            nbytes = self.tensor_codec.encoded_nbytes(shape, dtype)
            with pool.acquire(nbytes) as first:
                params, data, sizes = self._through_stages(chunk, first.view)
                header = self._header(key, dtype, shape, params, sizes, segment_start)
                return self._assemble(header, [data], pool, flags, 0)
        outputs: list[bytes] = []
        layers: list[list[int]] = []
        for part in self._sections(chunk):
            with pool.acquire(self.tensor_codec.encoded_nbytes(part.shape, dtype)) as first:
                params, data, sizes = self._through_stages(part, first.view)
                # a stage may answer with its input or its per-thread scratch, which
                # the next layer's encode reuses: keep a copy of anything not new
                outputs.append(data.obj if isinstance(data.obj, bytes) else bytes(data))
            layers.append(sizes)
        totals = [sum(column) for column in zip(*layers, strict=True)]
        header = self._header(key, dtype, shape, params, totals, segment_start, layers)
        sections = [memoryview(d) for d in outputs]
        return self._assemble(header, sections, pool, flags, len(layers))

    def _through_stages(
        self, part: torch.Tensor, first: memoryview
    ) -> tuple[list[Params], memoryview, list[int]]:
        """Encode ``part`` with the tensor codec into ``first`` (its exact size), then
        through the byte codecs: the stages' parameters, the result and its size after
        each stage."""
        params = [self.tensor_codec.encode_into(part, first)]
        itemsize = self.tensor_codec.payload_itemsize(part.dtype)
        data, sizes = first, [first.nbytes]
        for codec in self.byte_codecs:
            out, stage_params = codec.encode(data, itemsize)
            data = memoryview(out).cast("B")
            params.append(stage_params)
            sizes.append(data.nbytes)
        return params, data, sizes

    def _layers(self, shape: tuple[int, ...], dtype: torch.dtype) -> list[list[int]] | None:
        """A layered blob's section sizes for a tensor codec alone (``None``: whole)."""
        if not self.layered:
            return None
        section = self.tensor_codec.encoded_nbytes((1, *shape[1:]), dtype)
        return [[section] for _ in range(shape[0])]

    def _encode_in_place(
        self,
        key: str,
        chunk: torch.Tensor,
        pool: BufferPool,
        flags: int,
        segment_start: int | None,
    ) -> fmt.Blob:
        dtype, shape = chunk.dtype, tuple(chunk.shape)
        parts = self._sections(chunk)
        nbytes = [self.tensor_codec.encoded_nbytes(p.shape, dtype) for p in parts]
        payload_len, layers = sum(nbytes), self._layers(shape, dtype)
        guess = self._header(key, dtype, shape, [{}], [payload_len], segment_start, layers)
        header_len = min(fmt.padded_header_len(len(guess) + _PARAMS_SLACK), fmt.MAX_PADDED_HEADER)
        start = fmt.payload_start(header_len)
        buf = _lease(pool, header_len, payload_len, flags, len(parts) if layers else 0)
        try:
            payload = buf.view[start : start + payload_len]
            offset, params = 0, {}
            for part, size in zip(parts, nbytes, strict=True):
                params = self.tensor_codec.encode_into(part, payload[offset : offset + size])
                offset += size
            header = self._header(key, dtype, shape, [params], [payload_len], segment_start, layers)
            if len(header) <= header_len:
                return _framed(buf, header, header_len, payload_len, flags, self.layered)
            relocated = self._assemble(header, [payload], pool, flags, len(layers or ()))
        except BaseException:
            buf.release()
            raise
        buf.release()
        return relocated

    def _assemble(
        self, header: bytes, parts: list[memoryview], pool: BufferPool, flags: int, sections: int
    ) -> fmt.Blob:
        """A new blob of ``header`` and the payload ``parts`` (with the digest slots of
        ``sections`` sections)."""
        header_len = fmt.padded_header_len(len(header))
        start = fmt.payload_start(header_len)
        payload_len = sum(p.nbytes for p in parts)
        buf = _lease(pool, header_len, payload_len, flags, sections)
        for part in parts:
            buf.view[start : start + part.nbytes] = part
            start += part.nbytes
        return _framed(buf, header, header_len, payload_len, flags, self.layered)

    def blank(
        self,
        key: str,
        shape: tuple[int, ...],
        dtype: torch.dtype,
        pool: BufferPool,
        keys: MacKeys | None = None,
    ) -> fmt.Blob:
        """An unsealed blob of a ``raw`` pipeline for a chunk of ``shape`` and ``dtype``
        whose payload is still to be written, in place (the caller writes it through
        :func:`kvtier.core.codecs.decode.chunk_of`, then seals the blob, signed with
        ``keys``, before its bytes leave the process: see :meth:`encode`).

        The blob lives in a buffer leased from ``pool``; the caller owns (and releases)
        it. :class:`ConfigError` for a pipeline other than ``raw``, whose payload is not
        the tensor as it is."""
        if self.name != "raw":
            raise ConfigError(f"only the raw pipeline has blank blobs, not {self.name!r}")
        payload_len = self.tensor_codec.encoded_nbytes(shape, dtype)
        layers = self._layers(shape, dtype)
        header = self._header(key, dtype, shape, [{}], [payload_len], layers=layers)
        header_len = fmt.padded_header_len(len(header))
        flags = fmt.signing_flags(keys)
        buf = _lease(pool, header_len, payload_len, flags, len(layers or ()))
        try:
            return _framed(buf, header, header_len, payload_len, flags, self.layered)
        except BaseException:
            buf.release()
            raise
