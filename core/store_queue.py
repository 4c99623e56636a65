"""The store queue of one :class:`~kvtier.core.engine.KVTier`: stores are copied into
pooled blobs and queued for the write-through tiers, within a byte budget, and one
writer task on the I/O loop hands them to the tier chain.

Storing never blocks on storage: when the budget is full new chunks are dropped and
counted. The budget is checked synchronously, in the caller's thread; the counters
are owned by the loop thread (updated only there).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from kvtier.core import tier as tier_module
from kvtier.core.blob import Blob
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import BufferPool
from kvtier.core.chain import TierChain
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.inplace import PendingStore
from kvtier.core.integrity import MacKeys
from kvtier.core.layout import KVLayout
from kvtier.core.plugins import PluginRegistry
from kvtier.core.runtime import LoopThread
from kvtier.core.segments import Chunk
from kvtier.core.specs import EventKind, TierEvent

log = logging.getLogger(__name__)

PARALLEL_COPY_BYTES = 4 << 20
"""A ``store`` of at least this many bytes (in two chunks or more) is copied by the
codec threads in parallel."""


@dataclass
class _Queued:
    """The chunks one ``store`` call queued (unsealed blobs: see :meth:`TierChain.write`)."""

    blobs: list[Blob]
    tokens: int


class StoreQueue:
    """The byte budget, the copies into blobs and the writer of one cache's stores.

    ``through``: the indexes of the write-through tiers; ``raw``: the ``raw`` codec
    pipeline blobs are copied with; ``codec``: the threads that copy big stores."""

    def __init__(
        self,
        chain: TierChain,
        layout: KVLayout,
        budget_bytes: int,
        through: list[int],
        *,
        raw: CodecPipeline,
        registry: PluginRegistry,
        pool: BufferPool,
        codec: BlockingPool,
        io: LoopThread,
        integrity: MacKeys | None,
    ) -> None:
        self.chain = chain
        self.layout = layout
        self.budget_bytes = budget_bytes
        self.through = through
        self.registry = registry
        self.pool = pool
        self.integrity = integrity
        self._raw = raw
        self._codec = codec
        self._io = io
        self._budget = threading.Lock()
        """Guards the byte budget, which ``store`` checks synchronously."""
        self.queue_bytes = 0
        self._inflight: dict[str, int] = {}  # queued key -> bytes it holds of the budget
        # Counters owned by the loop thread (updated only there):
        self.queued = 0
        self.dropped = 0
        self.tokens_stored = 0
        self.failure: BaseException | None = None
        """A bug the writer met under ``tier.STRICT``; ``flush`` raises it."""
        self._jobs: asyncio.Queue[_Queued | None] | None = None
        self._writer: asyncio.Task[None] | None = None

    # -- lifetime (on the loop) ---------------------------------------------------------

    def start(self) -> None:
        """Start the writer task (on the loop, once the chain is open)."""
        self._jobs = asyncio.Queue()
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    async def drained(self) -> None:
        """Wait until every queued store has reached the write-through tiers (or failed)."""
        assert self._jobs is not None
        await self._jobs.join()

    def stop(self) -> None:
        """Tell the writer to stop after what is queued (from any thread)."""
        assert self._jobs is not None
        self._io.loop.call_soon_threadsafe(self._jobs.put_nowait, None)

    async def stopped(self) -> None:
        """Wait for the writer :meth:`stop` stopped."""
        assert self._writer is not None
        await self._writer

    def take_failure(self) -> BaseException | None:
        """The bug the writer met since the last call (``None``: none), forgotten."""
        failure, self.failure = self.failure, None
        return failure

    # -- queueing (in the caller's thread) ----------------------------------------------

    def begin(
        self,
        keys: list[str],
        bounds: list[tuple[int, int]],
        start: int,
        check_open: Callable[[], None],
    ) -> PendingStore:
        """Reserve the budget for the chunks ``keys`` (token ``bounds``) and return them
        as writable blobs (see :meth:`KVTier.begin_store`)."""
        sizes = [b - a for a, b in bounds]
        accepted, fresh = self.reserve(keys, sizes)
        blobs: list[Blob] = []
        try:
            for i in fresh:
                blobs.append(self._blank(keys[i], sizes[i]))
        except BaseException:
            for blob in blobs:
                blob.release()
            self.unreserve([keys[i] for i in fresh])
            raise
        end = bounds[accepted - 1][1] if accepted else start
        tokens_queued = sum(sizes[:accepted])
        fresh_bounds = [bounds[i] for i in fresh]
        return PendingStore(
            self, check_open, self.registry, blobs, fresh_bounds, tokens_queued, end
        )

    def _blank(self, key: str, tokens: int) -> Blob:
        """An unsealed raw blob for ``tokens`` tokens whose payload is still to be
        written (its checksum is computed when it is sealed, after that)."""
        shape = self.layout.chunk_shape(tokens)
        return self._raw.blank(key, shape, self.layout.dtype, self.pool, self.integrity)

    def reserve(self, keys: Sequence[str], sizes: Sequence[int]) -> tuple[int, list[int]]:
        """Take the store queue's byte budget for chunks of ``sizes`` tokens, in order,
        until it is full (the rest are dropped and counted); keys already queued are
        skipped. Returns how many leading chunks were accepted and the indexes of
        those that took budget (the caller queues them or :meth:`unreserve` s)."""
        fresh: list[int] = []
        for i, (key, size) in enumerate(zip(keys, sizes, strict=True)):
            nbytes = size * self.layout.bytes_per_token()
            with self._budget:
                queued = key in self._inflight
                full = not queued and self.queue_bytes + nbytes > self.budget_bytes
                if not queued and not full:
                    self.queue_bytes += nbytes
                    self._inflight[key] = nbytes
            if full:
                self._drop(list(keys[i:]))
                return i, fresh
            if not queued:
                fresh.append(i)
        return len(keys), fresh

    def unreserve(self, keys: Sequence[str]) -> None:
        with self._budget:
            for key in keys:
                self.queue_bytes -= self._inflight.pop(key)

    def queue(self, chunks: Sequence[Chunk]) -> int:
        """Copy ``(key, chunk, segment_start)`` items into blobs and queue them for the
        write-through tiers, in order, until the store queue's byte budget is full (the
        rest are dropped and counted); keys already queued are skipped. Returns how many
        leading items were accepted."""
        keys = [key for key, _, _ in chunks]
        sizes = [chunk.shape[2] for _, chunk, _ in chunks]
        accepted, fresh = self.reserve(keys, sizes)
        if fresh:
            try:
                blobs = self._encode([chunks[i] for i in fresh])
            except BaseException:
                self.unreserve([keys[i] for i in fresh])
                raise
            self.submit(blobs, sum(sizes[:accepted]))
        return accepted

    def _encode(self, parts: list[Chunk]) -> list[Blob]:
        """Unsealed raw blobs of ``parts``, copied by the codec threads in parallel
        (the caller waits) when there is enough to share, else by the caller."""
        if len(parts) < 2 or sum(p.nbytes for _, p, _ in parts) < PARALLEL_COPY_BYTES:
            return [self._copy(*part) for part in parts]
        futures = [self._codec.submit(partial(self._copy, *part)) for part in parts]
        concurrent.futures.wait(futures)
        blobs = [f.result() for f in futures if f.exception() is None]
        failed = next((f.exception() for f in futures if f.exception() is not None), None)
        if failed is not None:
            for blob in blobs:
                blob.release()
            raise failed
        return blobs

    def _copy(self, key: str, part: torch.Tensor, segment_start: int | None) -> Blob:
        with torch.no_grad():  # autograd is per thread: never record history on blobs
            return self._raw.encode(
                key, part, self.pool, sealed=False, keys=self.integrity, segment_start=segment_start
            )

    def _drop(self, keys: list[str]) -> None:
        event = TierEvent(EventKind.DROPPED, "-", len(keys), keys=tuple(keys))

        def count() -> None:
            self.dropped += len(keys)
            self.registry.emit(event)

        self._io.loop.call_soon_threadsafe(count)

    def submit(self, blobs: list[Blob], tokens: int) -> None:
        """Queue ``blobs`` (their budget reserved) for the writer, counting ``tokens``
        as stored (from any thread)."""
        self._io.loop.call_soon_threadsafe(self._enqueue, _Queued(blobs, tokens))

    # -- the writer (on the loop) -------------------------------------------------------

    def _enqueue(self, job: _Queued) -> None:
        assert self._jobs is not None
        self.queued += len(job.blobs)
        self.tokens_stored += job.tokens
        self._jobs.put_nowait(job)

    async def _write_loop(self) -> None:
        assert self._jobs is not None
        while True:
            job = await self._jobs.get()
            try:
                if job is None:
                    return
                await self.chain.write(job.blobs, self.through)
            except Exception as exc:
                log.exception("writing %d queued chunks failed", len(job.blobs) if job else 0)
                if tier_module.STRICT:
                    self.failure = self.failure or exc
            finally:
                if job is not None:
                    self.finish(job.blobs)
                self._jobs.task_done()

    def finish(self, blobs: list[Blob]) -> None:
        """Give back the budget of queued or reserved ``blobs`` and release them."""
        self.unreserve([blob.key for blob in blobs])
        for blob in blobs:
            blob.release()
