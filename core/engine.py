"""``KVTier``: the synchronous API every integration uses.

::

    layout = KVLayout(num_layers=12, num_kv_heads=4, head_dim=64, dtype=torch.float32)
    with KVTier.open(config, model="my-model", layout=layout) as kv:
        kv.store(tokens, kv_tensor)      # queued; returns the number of tokens accepted
        kv.flush()                       # wait until write-through tiers have them
        n = kv.lookup(tokens)            # leading tokens available in the chain
        n, kv_tensor = kv.retrieve(tokens)
        kv.stats()

One copy each way, for engines with their own KV memory (the vLLM connector)::

    with kv.begin_store(tokens) as pending:  # reserves queue space, no copy yet
        for first, end, chunk in pending.chunks:
            chunk.copy_(engine_kv[:, :, first:end])  # straight into the queued blob
    n = kv.retrieve_to(tokens, lambda first, chunk: engine_kv[...].copy_(chunk))

``start`` (a multiple of ``chunk_tokens``) restricts ``store`` and ``retrieve`` to the
chunks from token ``start`` on: the keys still chain over ``tokens[:start]``, but no
data of that prefix is passed, read or written (for an engine that holds it already).

All backend I/O runs on one asyncio loop thread; these methods are a thin facade over
it. Storing never blocks on storage: chunks are copied into pooled buffers and queued,
and when the queue's byte budget is full new stores are dropped and counted. A tier
that fails is skipped; callers see misses, never a tier's exception.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from kvtier.core import blob as fmt
from kvtier.core import pins
from kvtier.core import tier as tier_module
from kvtier.core.blob import Blob
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import Buffer, BufferPool, default_pool, release_all
from kvtier.core.chain import TierChain
from kvtier.core.codecs import decode as decoding
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.config import KVTierConfig, load_config
from kvtier.core.engine_stats import EngineStats, opened
from kvtier.core.errors import ConfigError, KVTierError
from kvtier.core.events import open_events
from kvtier.core.factory import build_tiers
from kvtier.core.integrity import load_keys
from kvtier.core.keys import ChunkHasher, ExtraKeys, Tokens, namespace_for
from kvtier.core.layout import KVLayout, ModelFingerprint
from kvtier.core.plugins import PluginRegistry, get_registry
from kvtier.core.prefetch import Prefetches
from kvtier.core.quotas import ledgers, quota_for
from kvtier.core.runtime import LoopThread
from kvtier.core.segments import Chunk, SegmentAPI, SegmentKeys
from kvtier.core.specs import EventKind, TierEvent
from kvtier.core.tier import TierStats
from kvtier.kernels.rope import RotaryConfig

log = logging.getLogger(__name__)

PARALLEL_COPY_BYTES = 4 << 20
"""A ``store`` of at least this many bytes (in two chunks or more) is copied by the
codec threads in parallel."""


ChunkSink = Callable[[int, torch.Tensor], None]
"""What :meth:`KVTier.retrieve_to` hands each chunk to: ``sink(first, chunk)``."""


@dataclass
class _Queued:
    """The chunks one ``store`` call queued (unsealed blobs: see :meth:`TierChain.write`)."""

    blobs: list[Blob]
    tokens: int


class HeldChunks:
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

    def __enter__(self) -> HeldChunks:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


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
        kv: KVTier,
        blobs: list[Blob],
        bounds: list[tuple[int, int]],
        tokens: int,
        end: int,
    ) -> None:
        self._kv = kv
        self._blobs: list[Blob] | None = blobs
        self._tokens = tokens
        self.end = end
        self.chunks = [
            (first, last, decoding.chunk_of(blob, kv.registry))
            for blob, (first, last) in zip(blobs, bounds, strict=True)
        ]

    def commit(self) -> int:
        """Queue the chunks for the write-through tiers (their bytes are not read
        before this); returns :attr:`end`. The chunk tensors are no longer valid."""
        blobs = self._take()
        if self._kv._closed:
            self._kv._finish(blobs)
            self._kv._check_open()
        if blobs:
            job = _Queued(blobs, self._tokens)
            self._kv._io.loop.call_soon_threadsafe(self._kv._enqueue, job)
        return self.end

    def abort(self) -> None:
        """Give back the reserved queue space and the buffers; nothing is written or
        counted as dropped. Does nothing after :meth:`commit` or :meth:`abort`."""
        if self._blobs is not None:
            self._kv._finish(self._take())

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


class KVTier(SegmentAPI):
    """A model's view of the tier chain. Build it with :meth:`open`. Position-independent
    segments (:mod:`kvtier.core.segments`) need the model's ``rotary`` encoding."""

    def __init__(
        self,
        config: KVTierConfig,
        fingerprint: ModelFingerprint,
        *,
        registry: PluginRegistry,
        pool: BufferPool,
        rotary: RotaryConfig | None = None,
    ) -> None:
        self.config = config
        self.model = fingerprint.model
        self.layout = fingerprint.layout
        self.registry = registry
        self.pool = pool
        self.hasher = ChunkHasher(
            namespace_for(fingerprint, config.tenant),
            chunk_tokens=config.chunk_tokens,
            algorithm=config.hash,
            seed=config.hash_seed,
        )
        self._segment_keys = SegmentKeys(fingerprint, rotary, config) if rotary else None
        self._raw = CodecPipeline.from_config("raw", registry)
        tiers = build_tiers(config, registry, pool, layout=self.layout, emit=registry.emit)
        quotas = ledgers(config)
        self._codec = BlockingPool("kvtier codec", config.codec_threads, name="kvtier-codec")
        signing = config.integrity
        self.integrity = None if signing is None else load_keys(signing, config.tenant, os.environ)
        """The MAC keys of ``config.integrity`` (``None``: blobs are checksummed, not signed)."""
        self.events = open_events(config, fingerprint.model, self.hasher, tiers, registry)
        """The tiers' chunks as vLLM KV events (``None`` without ``events:``); opened last
        of what can fail, as it binds sockets and starts a thread."""
        self.chain = TierChain(tiers, registry, pool, registry.emit, self._codec, self.integrity)
        self.chain.quotas = quotas
        chunk_bytes = self.layout.bytes_per_token() * config.chunk_tokens
        self.chain.prefetches = Prefetches(config.prefetch_bytes, chunk_bytes)
        self._through = [i for i, t in enumerate(config.tiers) if t.write_policy == "through"]
        self._budget = threading.Lock()
        """Guards the store queue's byte budget, which ``store`` checks synchronously."""
        self._queue_bytes = 0
        self._inflight: dict[str, int] = {}  # queued key -> bytes it holds of the budget
        # Counters owned by the loop thread (updated only there):
        self._queued = 0
        self._dropped = 0
        self._tokens_stored = 0
        self._reads = [0] * 6  # lookups, their tokens, hit; retrieves, their tokens, hit
        self._failure: BaseException | None = None
        """A bug the writer met under ``tier.STRICT``; ``flush`` raises it."""
        self._io = LoopThread()
        self._jobs: asyncio.Queue[_Queued | None] | None = None
        self._closed = False
        try:
            self._io.run(self._start())
        except BaseException:
            self._io.stop()
            if self.events is not None:
                self.events.close()
            raise
        opened.add(self)

    @classmethod
    def open(
        cls,
        config: str | Path | Mapping[str, Any] | KVTierConfig | None = None,
        *,
        model: str,
        layout: KVLayout,
        tenant: str | None = None,
        tp_rank: int = 0,
        tp_size: int = 1,
        revision: str | None = None,
        pool: BufferPool | None = None,
        registry: PluginRegistry | None = None,
        rotary: RotaryConfig | None = None,
    ) -> KVTier:
        """Open the tier chain of ``config`` (a YAML path, a mapping, or ``None`` for the
        embedded default) for one model. ``tenant`` overrides the config's tenant;
        ``registry`` replaces the process-wide plugin registry (and the config's
        ``plugins.disable``); ``revision`` (the weights revision) is part of the
        namespace, so a redeployed model never reuses the old weights' KV; ``rotary``
        (the model's RoPE) enables segments."""
        cfg = load_config(config)
        if tenant is not None:
            cfg = cfg.model_copy(update={"tenant": tenant})
        registry = registry or get_registry(frozenset(cfg.plugins.disable))
        registry.pm.hook.kvtier_configure(config=cfg)
        fingerprint = ModelFingerprint(model, layout, tp_rank, tp_size, revision)
        return cls(cfg, fingerprint, registry=registry, pool=pool or default_pool(), rotary=rotary)

    async def _start(self) -> None:
        self._jobs = asyncio.Queue()
        try:
            await self.chain.open()
        except BaseException:
            await self.chain.close()
            raise
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    # -- arguments (checked before any work) ----------------------------------------------

    def _chunks(
        self,
        tokens: Tokens,
        extra_keys: Sequence[ExtraKeys],
        start: int = 0,
        *,
        note: bool = False,
    ) -> tuple[list[str], list[tuple[int, int]]]:
        """Keys and ``(start, end)`` bounds of the chunks of ``tokens`` from ``start`` on.
        Raises :class:`ConfigError` for bad tokens, extra keys or ``start``. ``note``:
        tell the KV events each chunk's tokens (for chunks about to enter a tier)."""
        keys = self.hasher.key_strings(
            tokens, extra_keys=extra_keys, partial=self.config.store_partial_chunks
        )
        bounds = self.hasher.chunk_bounds(len(tokens), partial=self.config.store_partial_chunks)
        if not isinstance(start, int) or isinstance(start, bool):
            raise ConfigError(f"start must be an int, got {type(start).__name__}")
        if not 0 <= start <= len(tokens) or start % self.config.chunk_tokens:
            raise ConfigError(
                f"start must be a multiple of chunk_tokens ({self.config.chunk_tokens}) "
                f"between 0 and len(tokens) ({len(tokens)}), got {start}"
            )
        if note and self.events is not None:
            self.events.note(tokens, keys, bounds, extra_keys)
        first = start // self.config.chunk_tokens
        return keys[first:], bounds[first:]

    def _check_out(self, out: object, tokens: int) -> torch.Tensor:
        """``out`` if it can hold ``tokens`` tokens of this layout; else :class:`ConfigError`
        naming what is wrong (a caller's mistake: nothing is read, nothing deleted)."""
        want = self.layout.chunk_shape(tokens)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(
                f"out must be a torch.Tensor of shape {want}, got {type(out).__name__}"
            )
        shape = tuple(out.shape)
        if (
            out.dtype != self.layout.dtype
            or len(shape) != 5
            or shape[:2] != want[:2]
            or shape[3:] != want[3:]
            or shape[2] < tokens
        ):
            raise ConfigError(
                f"out has shape {shape} and dtype {out.dtype}; it must be {self.layout.dtype} "
                f"[num_layers={want[0]}, 2, tokens >= {tokens}, kv_heads={want[3]}, "
                f"head_dim={want[4]}]"
            )
        try:
            decoding.check_out(out)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return out

    # -- store ------------------------------------------------------------------------

    def store(
        self,
        tokens: Tokens,
        kv: torch.Tensor,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        start: int = 0,
    ) -> int:
        """Queue the chunks of ``kv`` (``[num_layers, 2, len(tokens) - start, kv_heads,
        head_dim]``, the KV of ``tokens[start:]``) for every write-through tier; return
        the end of the accepted tokens (``start`` when none was).

        The data is copied before returning (one copy), so the caller may reuse
        ``kv``; a checksum is computed later, in the codec threads, if and when a chunk
        is written to a tier outside the process. Chunks that do not fit
        the store queue's byte budget are dropped (counted), as are chunks already
        queued; nothing here waits for storage.
        """
        self._check_open()
        keys, bounds = self._chunks(tokens, extra_keys, start, note=True)
        if not isinstance(kv, torch.Tensor):
            raise ConfigError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        self.layout.check(kv, len(tokens) - start)
        chunks = [
            (key, kv[:, :, a - start : b - start], None)
            for key, (a, b) in zip(keys, bounds, strict=True)
        ]
        n = self._queue(chunks)
        return bounds[n - 1][1] if n else start

    def begin_store(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        start: int = 0,
    ) -> PendingStore:
        """:meth:`store` without the copy: reserve the store queue's space for the
        chunks of ``tokens[start:]`` and return them as writable pooled blobs
        (:class:`PendingStore`), for the caller to fill (one copy, straight from its
        own memory) and commit. Chunks that do not fit the byte budget are dropped and
        counted now, as :meth:`store` does; chunks already queued are skipped. Until
        committed or aborted, the reserved bytes count against the budget."""
        self._check_open()
        keys, bounds = self._chunks(tokens, extra_keys, start, note=True)
        sizes = [b - a for a, b in bounds]
        accepted, fresh = self._reserve(keys, sizes)
        blobs: list[Blob] = []
        try:
            for i in fresh:
                blobs.append(self._blank(keys[i], sizes[i]))
        except BaseException:
            for blob in blobs:
                blob.release()
            self._unreserve([keys[i] for i in fresh])
            raise
        end = bounds[accepted - 1][1] if accepted else start
        tokens_queued = sum(sizes[:accepted])
        return PendingStore(self, blobs, [bounds[i] for i in fresh], tokens_queued, end)

    def _blank(self, key: str, tokens: int) -> Blob:
        """An unsealed raw blob for ``tokens`` tokens whose payload is still to be
        written (its checksum is computed when it is sealed, after that)."""
        shape = self.layout.chunk_shape(tokens)
        payload_len = self._raw.tensor_codec.encoded_nbytes(shape, self.layout.dtype)
        header = fmt.header_json(key, self.layout.dtype, shape, [("raw", {})], [payload_len])
        header_len = fmt.padded_header_len(len(header))
        flags = fmt.signing_flags(self.integrity)
        size = fmt.payload_start(header_len) + payload_len + fmt.trailer_bytes(bool(flags))
        buf = self.pool.acquire(size)
        try:
            fmt.frame(buf.view, header, header_len, payload_len, flags)
            return Blob(buf, fmt.parse(buf.view), sealed=False)
        except BaseException:
            buf.release()
            raise

    def _reserve(self, keys: Sequence[str], sizes: Sequence[int]) -> tuple[int, list[int]]:
        """Take the store queue's byte budget for chunks of ``sizes`` tokens, in order,
        until it is full (the rest are dropped and counted); keys already queued are
        skipped. Returns how many leading chunks were accepted and the indexes of
        those that took budget (the caller queues them or :meth:`_unreserve` s)."""
        fresh: list[int] = []
        for i, (key, size) in enumerate(zip(keys, sizes, strict=True)):
            nbytes = size * self.layout.bytes_per_token()
            with self._budget:
                queued = key in self._inflight
                full = not queued and self._queue_bytes + nbytes > self.config.store_queue_bytes
                if not queued and not full:
                    self._queue_bytes += nbytes
                    self._inflight[key] = nbytes
            if full:
                self._drop(list(keys[i:]))
                return i, fresh
            if not queued:
                fresh.append(i)
        return len(keys), fresh

    def _unreserve(self, keys: Sequence[str]) -> None:
        with self._budget:
            for key in keys:
                self._queue_bytes -= self._inflight.pop(key)

    def _queue(self, chunks: Sequence[Chunk]) -> int:
        """Copy ``(key, chunk, segment_start)`` items into blobs and queue them for the
        write-through tiers, in order, until the store queue's byte budget is full (the
        rest are dropped and counted); keys already queued are skipped. Returns how many
        leading items were accepted."""
        keys = [key for key, _, _ in chunks]
        sizes = [chunk.shape[2] for _, chunk, _ in chunks]
        accepted, fresh = self._reserve(keys, sizes)
        if fresh:
            try:
                blobs = self._encode([chunks[i] for i in fresh])
            except BaseException:
                self._unreserve([keys[i] for i in fresh])
                raise
            job = _Queued(blobs, sum(sizes[:accepted]))
            self._io.loop.call_soon_threadsafe(self._enqueue, job)
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
            self._dropped += len(keys)
            self.registry.emit(event)

        self._io.loop.call_soon_threadsafe(count)

    def _enqueue(self, job: _Queued) -> None:
        assert self._jobs is not None
        self._queued += len(job.blobs)
        self._tokens_stored += job.tokens
        self._jobs.put_nowait(job)

    async def _write_loop(self) -> None:
        assert self._jobs is not None
        while True:
            job = await self._jobs.get()
            try:
                if job is None:
                    return
                await self.chain.write(job.blobs, self._through)
            except Exception as exc:
                log.exception("writing %d queued chunks failed", len(job.blobs) if job else 0)
                if tier_module.STRICT:
                    self._failure = self._failure or exc
            finally:
                if job is not None:
                    self._finish(job.blobs)
                self._jobs.task_done()

    def _finish(self, blobs: list[Blob]) -> None:
        self._unreserve([blob.key for blob in blobs])
        for blob in blobs:
            blob.release()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued store has reached every write-through tier (or failed)
        and the promotions and demotions started so far are done."""
        self._check_open()
        self._io.run(self._drained(), timeout)
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    async def _drained(self) -> None:
        assert self._jobs is not None
        await self._jobs.join()
        await self.chain.drain()

    # -- lookup and retrieve ----------------------------------------------------------

    def lookup(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        limits: Sequence[float | None] | None = None,
        prefetch: bool = False,
    ) -> int:
        """Leading tokens of ``tokens`` whose KV is available in some tier (no tier
        counter moves, nothing is promoted; the engine counts the lookup). ``limits``:
        seconds to wait for each tier (see :meth:`TierChain.lookup_by_tier`).

        ``prefetch``: also start copying the leading chunks found only in slower tiers
        into the faster tiers that promote, in the background and within the config's
        ``prefetch_bytes``, so that the :meth:`retrieve` that follows reads them from
        RAM (:meth:`flush` waits for the copies; a retrieve of a chunk still being
        copied waits for it instead of reading it again). The answer does not wait."""
        self._check_open()
        counts = self._io.run(self._lookup(tokens, extra_keys, limits, prefetch))
        return counts[-1] if counts else 0

    def lookup_by_tier(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        limits: Sequence[float | None] | None = None,
        prefetch: bool = False,
    ) -> concurrent.futures.Future[list[int]]:
        """:meth:`lookup` without waiting, tier by tier: a future of, for each tier
        ``i``, the leading tokens available in tiers ``0..i`` (the last one is
        :meth:`lookup`'s answer). For callers that must never block on storage,
        such as an engine's scheduler."""
        self._check_open()
        return self._io.submit(self._lookup(tokens, extra_keys, limits, prefetch))

    async def _lookup(
        self,
        tokens: Tokens,
        extra_keys: Sequence[ExtraKeys],
        limits: Sequence[float | None] | None,
        prefetch: bool = False,
    ) -> list[int]:
        keys, bounds = self._chunks(tokens, extra_keys)
        counts: list[int] = []

        async def by_tier() -> int:
            counts.extend(await self.chain.lookup_by_tier(keys, limits, prefetch=prefetch))
            return counts[-1] if counts else 0

        await self._counted(0, len(tokens), by_tier, bounds)
        return [bounds[n - 1][1] if n else 0 for n in counts] or [0] * len(self.chain.tiers)

    async def _counted(
        self,
        which: int,
        asked: int,
        chain_call: Callable[[], Awaitable[int]],
        bounds: list[tuple[int, int]],
        start: int = 0,
    ) -> int:
        """Await ``chain_call()`` (chunks found; not called without chunks), count the
        call, the tokens asked for and those found in ``self._reads[which:which + 3]``;
        return the end of the tokens found."""
        n = await chain_call() if bounds else 0
        end = bounds[n - 1][1] if n else start
        self._reads[which] += 1
        self._reads[which + 1] += asked
        self._reads[which + 2] += end - start
        return end

    def retrieve(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        out: torch.Tensor | None = None,
        start: int = 0,
    ) -> tuple[int, torch.Tensor]:
        """The longest available run of ``tokens`` from ``start`` and its KV.

        Returns ``(n, kv)``: ``tokens[start:n]`` are available (``n == start`` when none
        is) and ``kv``, shaped ``[num_layers, 2, n - start, kv_heads, head_dim]``, holds
        their KV (a view of ``out`` if given: it must have room for ``len(tokens) -
        start`` tokens, and may be written beyond ``n``). Each chunk comes from the
        fastest tier holding a valid copy (see :meth:`TierChain.fetch`). Every argument
        is checked before anything is read: a bad one raises :class:`ConfigError` and
        leaves every stored chunk as it was.
        """
        self._check_open()
        keys, bounds = self._chunks(tokens, extra_keys, start, note=True)
        needed = len(tokens) - start
        if out is None:
            out = torch.empty(self.layout.chunk_shape(needed), dtype=self.layout.dtype)
        else:
            out = self._check_out(out, needed)
        targets = [out[:, :, s - start : e - start] for s, e in bounds]
        end = self._fetch(keys, targets, bounds, start, needed)
        return end, out[:, :, : end - start]

    def retrieve_to(
        self,
        tokens: Tokens,
        sink: ChunkSink,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        start: int = 0,
    ) -> int:
        """:meth:`retrieve` without a target tensor: each chunk is handed to
        ``sink(first, chunk)``, ``chunk`` being the KV of ``tokens[first:first + T]``
        (``[num_layers, 2, T, kv_heads, head_dim]``), and the copy is the sink's. Returns
        the end of the longest available run from ``start`` (``start`` when none is).

        The contract, for a sink that copies straight into an engine's KV memory:

        * ``chunk`` is only valid during the call and must not be written: for the
          ``raw`` codec it is a zero-copy view of the blob's bytes (shared with the
          ``cpu`` tier), for other codecs a scratch tensor reused by the next decode.
        * A chunk reaches the sink only after its blob passed its checksum (and MAC)
          and decoded to the expected shape: a corrupt blob is deleted and counted,
          never delivered, and the chunk is asked of the next tier.
        * The sink runs in kvtier's codec threads, several chunks at once and in any
          order; it may also be called for chunks past the returned end (when an
          earlier chunk is missing): those are not delivered, as with :meth:`retrieve`'s
          ``out`` beyond ``n``.
        * An exception from the sink propagates out of this call (after the chunks in
          flight finish).
        """
        self._check_open()
        if not callable(sink):
            raise ConfigError(f"sink must be callable as sink(first, chunk), got {sink!r}")
        return self._fetch_to(tokens, extra_keys, start, lambda first, chunk, _: sink(first, chunk))

    def retrieve_held(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        start: int = 0,
    ) -> HeldChunks:
        """:meth:`retrieve_to`, keeping the chunks instead of handing them over one at
        a time: for a caller that copies them out in another order (layer by layer).
        With the raw codec each chunk stays a zero-copy view of its verified blob, kept
        alive until :meth:`HeldChunks.release`; other codecs' chunks are decoded into
        new tensors. Only the leading run that was delivered is held."""
        self._check_open()
        kept: list[tuple[int, torch.Tensor, Buffer | None]] = []
        lock = threading.Lock()

        def keep(first: int, chunk: torch.Tensor, buf: Buffer | None) -> None:
            item = (first, chunk, buf.retain()) if buf is not None else (first, chunk.clone(), None)
            with lock:
                kept.append(item)

        try:
            end = self._fetch_to(tokens, extra_keys, start, keep)
        except BaseException:
            release_all(buf for _, _, buf in kept)
            raise
        kept.sort(key=lambda item: item[0])
        release_all(buf for first, _, buf in kept if first >= end)
        held = [item for item in kept if item[0] < end]
        return HeldChunks(end, [(first, chunk) for first, chunk, _ in held], [b for *_, b in held])

    def _fetch_to(
        self,
        tokens: Tokens,
        extra_keys: Sequence[ExtraKeys],
        start: int,
        deliver: Callable[[int, torch.Tensor, Buffer | None], None],
    ) -> int:
        """Fetch the chunks of ``tokens[start:]`` into sinks calling ``deliver(first,
        chunk, buffer)`` (see :class:`~kvtier.core.codecs.decode.Sink`)."""
        keys, bounds = self._chunks(tokens, extra_keys, start, note=True)
        dtype = self.layout.dtype
        targets = [
            decoding.Sink(self.layout.chunk_shape(e - s), dtype, partial(deliver, s))
            for s, e in bounds
        ]
        return self._fetch(keys, targets, bounds, start, len(tokens) - start)

    def _fetch(
        self,
        keys: list[str],
        targets: Sequence[torch.Tensor | decoding.Sink],
        bounds: list[tuple[int, int]],
        start: int,
        needed: int,
    ) -> int:
        """Fetch ``keys`` into ``targets`` on the loop, counted as a retrieve."""
        fetched = partial(self.chain.fetch, keys, targets)
        return self._io.run(self._counted(3, needed, fetched, bounds, start))

    # -- pins -------------------------------------------------------------------------

    def pin(
        self,
        tokens: Tokens | None = None,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        unpin: bool = False,
    ) -> dict[str, int]:
        """Pin the stored chunks of ``tokens`` (``None``: every chunk of this cache's
        model and tenant) in the tiers that support pins, within their pinned-bytes
        budget: they are then never evicted. ``unpin=True`` releases them. Returns the
        chunks pinned (unpinned) per tier name."""
        self._check_open()
        keys = None if tokens is None else self._chunks(tokens, extra_keys)[0]
        return self._io.run(pins.pin(self.chain, keys, self.hasher.namespace, unpin=unpin))

    def set_quota(self, tier: str, tenant: str, nbytes: int | None) -> int:
        """Give ``tenant`` a byte quota in tier ``tier`` from now on (``None``: remove
        it); its least recently used chunks beyond it are deleted (returns how many).
        :class:`ConfigError` for a tier this cache lacks."""
        self._check_open()
        return self._io.run(quota_for(self.chain, tier, tenant, nbytes))

    # -- stats and lifetime -----------------------------------------------------------

    def stats(self, timeout: float | None = None) -> EngineStats:
        """A snapshot of per-tier counters and the store queue (``TimeoutError`` after
        ``timeout`` seconds: for exporters, which must not hang on a closing cache)."""
        self._check_open()
        return self._io.run(self._snapshot(), timeout)

    async def _snapshot(self) -> EngineStats:
        usage: dict[str, tuple[int | None, int | None]] = {}
        for tier in self.chain.tiers:
            if tier.backend.capabilities.bounded:  # cheap to ask: in memory
                try:
                    held = await tier.backend.stats()
                except KVTierError:
                    continue
                usage[tier.name] = (held.bytes_used, held.capacity_bytes)
        return EngineStats(
            tiers=[TierStats(**vars(t.stats)) for t in self.chain.tiers],
            stores_queued=self._queued,
            stores_dropped=self._dropped,
            tokens_stored=self._tokens_stored,
            queue_bytes=self._queue_bytes,
            lookups=self._reads[0],
            lookup_requested_tokens=self._reads[1],
            lookup_hit_tokens=self._reads[2],
            retrieves=self._reads[3],
            retrieve_requested_tokens=self._reads[4],
            retrieve_hit_tokens=self._reads[5],
            prefetched=self.chain.prefetches.stats.started,
            prefetch_read_bytes=self.chain.prefetches.stats.read_bytes,
            prefetch_dropped=self.chain.prefetches.stats.dropped,
            prefetch_joined=self.chain.prefetches.stats.joined,
            prefetch_in_flight_bytes=self.chain.prefetches.in_flight_bytes,
            usage=usage,
        )

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this KVTier is closed; open a new one with KVTier.open(...)")

    def close(self, *, flush: bool = True) -> None:
        """Flush queued stores (unless ``flush=False``), close every tier, stop the loop."""
        if self._closed:
            return
        try:
            if flush:
                self.flush()
        finally:
            self._closed = True
            opened.discard(self)
            assert self._jobs is not None
            self._io.loop.call_soon_threadsafe(self._jobs.put_nowait, None)
            self._io.run(self._shutdown())
            self._io.stop()
            if self.events is not None:
                self.events.close()

    async def _shutdown(self) -> None:
        await self._writer
        await self.chain.close()
        await self._codec.shutdown()

    def __enter__(self) -> KVTier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
