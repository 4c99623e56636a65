"""Codec stages and the per-tier pipeline that chains them.

A pipeline is one :class:`TensorCodec` (``raw``, ``int8``, ``int4``, ``fp8``) that
turns a chunk tensor into payload bytes, followed by zero or more
:class:`ByteCodec` stages (``shuffle``, ``zstd``) that transform those bytes. The
stages and their parameters are written into every blob's header
(:mod:`kvtier.core.blob`), so a blob decodes by itself whatever tier it came from.

Contract for every codec: encoding never changes its input; decoding validates every
parameter and length it reads from the header and raises
:class:`~kvtier.core.errors.ChunkCorruptedError` when something does not add up,
never any other exception, and never allocates more than the declared output size.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, TypeAlias

import torch
from pydantic import BaseModel

from kvtier.core.buffers import BytesLike
from kvtier.core.specs import NoOptions

Params: TypeAlias = dict[str, Any]
"""JSON-serialisable parameters a stage records in the blob header."""


class Codec(ABC):
    """Base of all codec stages; ``options`` is an instance of the spec's options model."""

    name: ClassVar[str]

    def __init__(self, options: BaseModel | None = None) -> None:
        self.options = options if options is not None else NoOptions()


class TensorCodec(Codec):
    """First stage: chunk tensor <-> payload bytes."""

    @abstractmethod
    def encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        """Exact payload size for a chunk of ``shape`` and ``dtype``."""

    @abstractmethod
    def encode_into(self, chunk: torch.Tensor, out: memoryview) -> Params:
        """Write ``chunk``'s payload into ``out`` (exactly ``encoded_nbytes`` long).

        ``chunk`` may be non-contiguous. Returns the parameters to record.
        """

    @abstractmethod
    def decode_into(
        self, payload: memoryview, params: Mapping[str, Any], out: torch.Tensor
    ) -> None:
        """Reconstruct the chunk into ``out`` (target shape and dtype, maybe non-contiguous)."""

    def payload_itemsize(self, dtype: torch.dtype) -> int:
        """Element size of the payload, used by byte-shuffle (1 for quantised payloads)."""
        return 1


class ByteCodec(Codec):
    """Later stage: payload bytes <-> transformed bytes."""

    @abstractmethod
    def encode(self, data: memoryview, itemsize: int) -> tuple[BytesLike, Params]:
        """Transform ``data``; ``itemsize`` is the payload's element size."""

    @abstractmethod
    def decode(self, data: memoryview, params: Mapping[str, Any], nbytes: int) -> BytesLike:
        """Invert :meth:`encode`, producing exactly ``nbytes`` bytes (never more)."""
