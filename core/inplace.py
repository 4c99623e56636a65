"""The in-place handles of :class:`~kvtier.core.engine.KVTier`: one copy each way, for
engines with their own KV memory (the vLLM worker). :class:`PendingStore` is a store
the caller writes straight into the queued blobs; :class:`HeldChunks` are retrieved
chunks kept as views of their verified blobs until released."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

import torch

from kvtier.core.blob import Blob
from kvtier.core.buffers import Buffer, Releasable, release_all
from kvtier.core.codecs import decode as decoding
from kvtier.core.errors import ConfigError
from kvtier.core.plugins import PluginRegistry

if TYPE_CHECKING:
    from kvtier.core.store_queue import StoreQueue


class HeldChunks(Releasable):
    """The chunks :meth:`KVTier.retrieve_held` delivered: ``chunks`` lists ``(first,
    kv)`` in token order, ``kv`` the KV of ``tokens[first:first + T]`` (read only;
    valid until :meth:`release`); ``end`` is the end of the run. A context manager
    that releases on exit."""

    def __init__(
        self, end: int, chunks: list[tuple[int, torch.Tensor]], buffers: list[Buffer | None]
    ) -> None:
        self.end = end
        self.chunks = chunks
        self._buffers = buffers

    def release(self) -> None:
        """Let go of the blobs (once; the chunk tensors are then invalid)."""
        buffers, self._buffers, self.chunks = self._buffers, [], []
        release_all(buffers)


class PendingStore:
    """Chunks reserved in the store queue by :meth:`KVTier.begin_store`, for the caller
    to write in place and then :meth:`commit` (queue them) or :meth:`abort`.

    ``chunks`` lists ``(first, end, kv)`` per chunk to write: ``kv`` is a writable
    ``[num_layers, 2, end - first, kv_heads, head_dim]`` tensor over the payload of
    the pooled blob that will be queued (valid until :meth:`commit` or
    :meth:`abort`), for tokens ``tokens[first:end]``. Chunks already queued by an
    earlier store are not listed (nothing to write); ``end`` is the end of the tokens
    accepted (``start`` when none was). Used as a context manager, it commits on
    normal exit and aborts on an exception.
    """

    def __init__(
        self,
        queue: StoreQueue,
        check_open: Callable[[], None],
        registry: PluginRegistry,
        blobs: list[Blob],
        bounds: list[tuple[int, int]],
        tokens: int,
        end: int,
    ) -> None:
        self._queue = queue
        self._check_open = check_open
        self._blobs: list[Blob] | None = blobs
        self._tokens = tokens
        self.end = end
        self.chunks = [
            (first, last, decoding.chunk_of(blob, registry))
            for blob, (first, last) in zip(blobs, bounds, strict=True)
        ]

    def commit(self) -> int:
        """Queue the chunks for the write-through tiers (their bytes are not read
        before this); returns :attr:`end`. The chunk tensors are no longer valid."""
        blobs = self._take()
        try:
            self._check_open()
        except BaseException:
            self._queue.finish(blobs)
            raise
        if blobs:
            self._queue.submit(blobs, self._tokens)
        return self.end

    def abort(self) -> None:
        """Give back the reserved queue space and the buffers; nothing is written or
        counted as dropped. Does nothing after :meth:`commit` or :meth:`abort`."""
        if self._blobs is not None:
            self._queue.finish(self._take())

    def _take(self) -> list[Blob]:
        if self._blobs is None:
            raise ConfigError("this PendingStore was already committed or aborted")
        blobs, self._blobs = self._blobs, None
        self.chunks = []
        return blobs

    def __enter__(self) -> PendingStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and self._blobs is not None:
            self.commit()
        else:
            self.abort()
