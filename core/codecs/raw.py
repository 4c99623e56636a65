"""The ``raw`` codec: a chunk's bytes as they are."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from kvtier.core.codec import Params, TensorCodec
from kvtier.core.codecs._checks import check_params, check_payload
from kvtier.core.codecs._views import tensor_view


class RawCodec(TensorCodec):
    """Stores the chunk's elements in row-major order, one copy each way.

    Any dtype kvtier supports; the payload's element size is the dtype's, so a
    following ``shuffle`` groups bytes of equal significance.
    """

    name = "raw"

    def encoded_nbytes(self, shape: Sequence[int], dtype: torch.dtype) -> int:
        return math.prod(shape) * dtype.itemsize

    def encode_into(self, chunk: torch.Tensor, out: memoryview) -> Params:
        tensor_view(out, chunk.dtype, chunk.numel()).view(chunk.shape).copy_(chunk)
        return {}

    def decode_into(
        self, payload: memoryview, params: Mapping[str, Any], out: torch.Tensor
    ) -> None:
        check_params(self.name, params, {})
        check_payload(self.name, payload, self.encoded_nbytes(out.shape, out.dtype))
        out.copy_(tensor_view(payload, out.dtype, out.numel()).view(out.shape))

    def payload_itemsize(self, dtype: torch.dtype) -> int:
        return dtype.itemsize
