"""The ``fp8`` codec: float8_e4m3fn values with one float32 scale per token per head.

Per-row scaling (``scale = max(|row|) / 448``) maps every row onto e4m3's full
range, so chunks with values far beyond +-448 survive and small rows keep their
precision. Scales are float32 whatever the chunk's dtype, so they never underflow.
Payload: ``R * head_dim`` e4m3fn bytes, then ``R`` float32 scales.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch

from kvtier.core.codec import Params, TensorCodec
from kvtier.core.codecs._checks import check_params, check_payload
from kvtier.core.codecs._views import tensor_view
from kvtier.core.codecs.quant import rows_and_dim
from kvtier.kernels.quant import dequantize_fp8_into, quantize_fp8_into


class Fp8Codec(TensorCodec):
    """float8_e4m3fn values with a float32 scale per token per head."""

    name = "fp8"
    PARAMS: ClassVar[Params] = {"granularity": "token_head", "scale_dtype": "float32"}

    def encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        rows, head_dim = rows_and_dim(self.name, shape, dtype)
        return rows * (head_dim + 4)

    def _views(self, data: memoryview, shape: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows, head_dim = rows_and_dim(self.name, shape, torch.float32)
        return (
            tensor_view(data, torch.uint8, rows * head_dim),
            tensor_view(data, torch.float32, rows, offset=rows * head_dim),
        )

    def encode_into(self, chunk: torch.Tensor, out: memoryview) -> Params:
        quantize_fp8_into(chunk, *self._views(out, chunk.shape))
        return dict(self.PARAMS)

    def decode_into(
        self, payload: memoryview, params: Mapping[str, Any], out: torch.Tensor
    ) -> None:
        check_params(self.name, params, self.PARAMS)
        check_payload(self.name, payload, self.encoded_nbytes(out.shape, out.dtype))
        dequantize_fp8_into(*self._views(payload, out.shape), out)
