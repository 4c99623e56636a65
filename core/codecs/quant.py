"""The ``int8`` and ``int4`` codecs: LMDeploy's asymmetric per-token-per-head scheme.

Payload for a chunk ``[..., head_dim]`` with ``R`` rows (tokens x heads x layers x
K/V): the quantised values (``R * head_dim * bits / 8`` bytes, row-major, int4 with
the even index in the low nibble), then ``R`` scales, then ``R`` zeros, both in the
chunk's dtype. The arithmetic is :mod:`kvtier.kernels.quant`'s.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from kvtier.core.codec import Params, TensorCodec
from kvtier.core.codecs._checks import check_params, check_payload
from kvtier.core.codecs._views import tensor_view
from kvtier.core.errors import ConfigError
from kvtier.kernels.quant import dequantize_into, packed_head_dim, quantize_into

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rows_and_dim(codec: str, shape: Sequence[int], dtype: torch.dtype) -> tuple[int, int]:
    """``(rows, head_dim)`` of a float chunk; :class:`ConfigError` for other dtypes."""
    if dtype not in FLOAT_DTYPES:
        raise ConfigError(f"{codec} quantises float32/float16/bfloat16 chunks, not {dtype}")
    if not shape:
        raise ConfigError(f"{codec} needs a chunk with a head_dim axis, got a scalar")
    return math.prod(shape[:-1]), shape[-1]


class AffineQuantCodec(TensorCodec):
    """Asymmetric ``bits``-bit quantisation with one (scale, zero) per row."""

    bits: ClassVar[int]
    PARAMS: ClassVar[Params] = {"granularity": "token_head"}

    def _layout(self, shape: Sequence[int], dtype: torch.dtype) -> tuple[int, int]:
        rows, head_dim = rows_and_dim(self.name, shape, dtype)
        return rows, packed_head_dim(head_dim, self.bits)

    def encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        rows, packed = self._layout(shape, dtype)
        return rows * (packed + 2 * dtype.itemsize)

    def _views(
        self, data: memoryview, shape: Sequence[int], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows, packed = self._layout(shape, dtype)
        q_bytes = rows * packed
        return (
            tensor_view(data, torch.uint8, q_bytes),
            tensor_view(data, dtype, rows, offset=q_bytes),
            tensor_view(data, dtype, rows, offset=q_bytes + rows * dtype.itemsize),
        )

    def encode_into(self, chunk: torch.Tensor, out: memoryview) -> Params:
        q, scale, zero = self._views(out, chunk.shape, chunk.dtype)
        quantize_into(chunk, self.bits, q, scale, zero)
        return dict(self.PARAMS)

    def decode_into(
        self, payload: memoryview, params: Mapping[str, Any], out: torch.Tensor
    ) -> None:
        check_params(self.name, params, self.PARAMS)
        check_payload(self.name, payload, self.encoded_nbytes(out.shape, out.dtype))
        q, scale, zero = self._views(payload, out.shape, out.dtype)
        dequantize_into(q, scale, zero, self.bits, out)


class Int8Codec(AffineQuantCodec):
    """int8: one byte per value plus a (scale, zero) pair per row."""

    name = "int8"
    bits = 8


class Int4Codec(AffineQuantCodec):
    """int4: two values per byte (head_dim must be even) plus a (scale, zero) pair per row."""

    name = "int4"
    bits = 4
