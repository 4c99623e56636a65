"""Zero-copy tensor views of byte buffers, and per-thread scratch memory for codecs."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import torch


def _spend_readonly_warning() -> None:
    """Decoders view read-only payloads (``bytes``) as tensors and only read them.

    torch warns about such views once per process; spend that warning here, silenced.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.frombuffer(b"\0", dtype=torch.uint8)


_spend_readonly_warning()


def tensor_view(data: memoryview, dtype: torch.dtype, count: int, offset: int = 0) -> torch.Tensor:
    """A 1-D tensor over ``count`` ``dtype`` elements of ``data`` from byte ``offset``.

    Shares memory with ``data`` (no copy, any alignment, native byte order, which is
    little-endian on every platform kvtier supports). ``count`` may be 0.
    """
    if count == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(data, dtype=dtype, count=count, offset=offset)


KEEP_BYTES = 64 << 20
"""Scratch a thread keeps between calls: enough for the chunks of large models; a larger
request gets memory of its own, freed with its view."""


class ThreadScratch:
    """A growable byte buffer per thread, reused across calls.

    A view returned by :meth:`get` stays valid until the same thread calls
    :meth:`get` again. The kept memory grows to the largest size asked for, up to
    :data:`KEEP_BYTES`; a request beyond it is served by a buffer that nobody keeps.
    """

    def __init__(self) -> None:
        self._local = threading.local()

    def get(self, nbytes: int) -> memoryview:
        """A writable view of ``nbytes`` bytes (contents undefined)."""
        if nbytes > KEEP_BYTES:
            self._local.array = None  # let go of the kept buffer too: one big one at a time
            return np.empty(nbytes, dtype=np.uint8).data
        array: np.ndarray | None = getattr(self._local, "array", None)
        if array is None or array.nbytes < nbytes:
            size = min(nbytes + nbytes // 8, KEEP_BYTES)
            array = self._local.array = np.empty(size, dtype=np.uint8)
        return array.data[:nbytes]
