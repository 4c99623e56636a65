"""The ``shuffle`` codec: byte-shuffle a payload by element size before compression.

Byte ``j`` of every element goes to plane ``j`` (planes stored one after another),
so the slowly varying high bytes of floats (sign and exponent) sit together and
compress far better. Trailing bytes that do not fill an element are kept as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from pydantic import BaseModel

from kvtier.core.buffers import BytesLike
from kvtier.core.codec import ByteCodec, Params
from kvtier.core.codecs._checks import check_payload
from kvtier.core.codecs._views import ThreadScratch
from kvtier.core.errors import ChunkCorruptedError, ConfigError

MAX_ITEMSIZE = 16


class ShuffleCodec(ByteCodec):
    """Byte shuffle; the element size comes from the tensor codec and is recorded.

    The result is a view of per-thread scratch memory, valid until the same thread
    calls this codec again (the pipeline consumes it at once).
    """

    name = "shuffle"

    def __init__(self, options: BaseModel | None = None) -> None:
        super().__init__(options)
        self._scratch = ThreadScratch()

    def encode(self, data: memoryview, itemsize: int) -> tuple[BytesLike, Params]:
        if not 1 <= itemsize <= MAX_ITEMSIZE:
            raise ConfigError(f"shuffle: element size must be 1..{MAX_ITEMSIZE}, got {itemsize}")
        if itemsize == 1:
            return data, {"itemsize": 1}
        out = self._scratch.get(data.nbytes)
        src, dst = np.frombuffer(data, np.uint8), np.frombuffer(out, np.uint8)
        body = data.nbytes - data.nbytes % itemsize
        planes, elements = dst[:body].reshape(itemsize, -1), src[:body].reshape(-1, itemsize)
        for j in range(itemsize):
            planes[j] = elements[:, j]
        dst[body:] = src[body:]
        return out, {"itemsize": itemsize}

    def decode(self, data: memoryview, params: Mapping[str, Any], nbytes: int) -> BytesLike:
        itemsize = _recorded_itemsize(params)
        check_payload(self.name, data, nbytes)
        if itemsize == 1:
            return data
        out = self._scratch.get(nbytes)
        src, dst = np.frombuffer(data, np.uint8), np.frombuffer(out, np.uint8)
        body = nbytes - nbytes % itemsize
        planes, elements = src[:body].reshape(itemsize, -1), dst[:body].reshape(-1, itemsize)
        for j in range(itemsize):
            elements[:, j] = planes[j]
        dst[body:] = src[body:]
        return out


def _recorded_itemsize(params: Mapping[str, Any]) -> int:
    itemsize = params.get("itemsize")
    if set(params) == {"itemsize"} and type(itemsize) is int and 1 <= itemsize <= MAX_ITEMSIZE:
        return itemsize
    raise ChunkCorruptedError(f"shuffle: unsupported parameters {dict(params)!r}")
