"""The codec pipeline of a tier: one tensor codec, then byte codecs, written as a blob."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeAlias

import torch

from kvtier.core import blob as fmt
from kvtier.core.buffers import Buffer, BufferPool, BytesLike
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


def _lease(pool: BufferPool, header_len: int, payload_len: int, flags: int) -> Buffer:
    """A buffer from ``pool`` for a blob: prefix, ``header_len`` bytes of (padded)
    header, ``payload_len`` bytes of payload and the trailer ``flags`` ask for."""
    return pool.acquire(
        fmt.payload_start(header_len) + payload_len + fmt.trailer_bytes(bool(flags))
    )


def _framed(buf: Buffer, header: bytes, header_len: int, payload_len: int, flags: int) -> fmt.Blob:
    """``buf`` as an unsealed blob, once prefix and header are written in front of its
    payload (see :func:`kvtier.core.blob.frame`)."""
    fmt.frame(buf.view, header, header_len, payload_len, flags)
    return fmt.Blob(buf, fmt.parse(buf.view), sealed=False)


def _build(name: str, options: Mapping[str, Any], registry: PluginRegistry) -> Codec:
    spec = registry.codec(name)
    return spec.load()(validate_model(spec.options, options, where=f"codec {name!r}"))


class CodecPipeline:
    """One :class:`TensorCodec` then zero or more :class:`ByteCodec` stages.

    Encodes chunks into blobs; :func:`kvtier.core.blob.decode_into` reads them back
    using only the blob's header, whatever pipeline wrote it. Thread safe when its
    codecs are (the built-in ones are). Each byte codec may appear once.
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
        self,
        key: str,
        dtype: torch.dtype,
        shape: tuple[int, ...],
        params: list[Params],
        sizes: list[int],
        segment_start: int | None = None,
    ) -> bytes:
        for codec, p in zip(self.stages, params, strict=True):
            if not isinstance(p, dict):
                raise PluginError(f"codec {codec.name!r} returned parameters {p!r}, not a dict")
        stages = [(codec.name, p) for codec, p in zip(self.stages, params, strict=True)]
        try:
            return fmt.header_json(key, dtype, shape, stages, sizes, segment_start)
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
        payload_len = self.tensor_codec.encoded_nbytes(chunk.shape, chunk.dtype)
        if not self.byte_codecs:
            blob = self._encode_in_place(key, chunk, payload_len, pool, flags, segment_start)
        else:
            with pool.acquire(payload_len) as first:
                params = [self.tensor_codec.encode_into(chunk, first.view)]
                data: BytesLike = first.view
                sizes = [payload_len]
                itemsize = self.tensor_codec.payload_itemsize(chunk.dtype)
                for codec in self.byte_codecs:
                    data, stage_params = codec.encode(memoryview(data).cast("B"), itemsize)
                    params.append(stage_params)
                    sizes.append(memoryview(data).nbytes)
                header = self._header(
                    key, chunk.dtype, tuple(chunk.shape), params, sizes, segment_start
                )
                blob = self._assemble(header, memoryview(data).cast("B"), pool, flags)
        if sealed:
            blob.ensure_sealed(keys)
        return blob

    def _encode_in_place(
        self,
        key: str,
        chunk: torch.Tensor,
        payload_len: int,
        pool: BufferPool,
        flags: int,
        segment_start: int | None,
    ) -> fmt.Blob:
        dtype, shape = chunk.dtype, tuple(chunk.shape)
        guess = self._header(key, dtype, shape, [{}], [payload_len], segment_start)
        header_len = min(fmt.padded_header_len(len(guess) + _PARAMS_SLACK), fmt.MAX_PADDED_HEADER)
        start = fmt.payload_start(header_len)
        buf = _lease(pool, header_len, payload_len, flags)
        try:
            payload = buf.view[start : start + payload_len]
            params = self.tensor_codec.encode_into(chunk, payload)
            header = self._header(key, dtype, shape, [params], [payload_len], segment_start)
            if len(header) <= header_len:
                return _framed(buf, header, header_len, payload_len, flags)
            relocated = self._assemble(header, payload, pool, flags)
        except BaseException:
            buf.release()
            raise
        buf.release()
        return relocated

    @staticmethod
    def _assemble(header: bytes, payload: memoryview, pool: BufferPool, flags: int) -> fmt.Blob:
        header_len = fmt.padded_header_len(len(header))
        start = fmt.payload_start(header_len)
        buf = _lease(pool, header_len, payload.nbytes, flags)
        buf.view[start : start + payload.nbytes] = payload
        return _framed(buf, header, header_len, payload.nbytes, flags)

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
        header = self._header(key, dtype, shape, [{}], [payload_len])
        header_len = fmt.padded_header_len(len(header))
        flags = fmt.signing_flags(keys)
        buf = _lease(pool, header_len, payload_len, flags)
        try:
            return _framed(buf, header, header_len, payload_len, flags)
        except BaseException:
            buf.release()
            raise
