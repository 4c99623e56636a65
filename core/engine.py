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

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from kvtier.core import pins
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import BufferPool, default_pool
from kvtier.core.chain import TierChain
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.config import KVTierConfig, load_config
from kvtier.core.engine_stats import EngineStats, opened
from kvtier.core.errors import ConfigError, KVTierError
from kvtier.core.events import open_events
from kvtier.core.factory import build_tiers
from kvtier.core.inplace import HeldChunks, PendingStore
from kvtier.core.integrity import load_keys
from kvtier.core.keys import ChunkHasher, ExtraKeys, Tokens, namespace_for
from kvtier.core.layout import KVLayout, ModelFingerprint
from kvtier.core.plugins import PluginRegistry, get_registry
from kvtier.core.prefetch import Prefetches
from kvtier.core.quotas import ledgers, quota_for
from kvtier.core.retrieval import ChunkSink, RetrieveAPI
from kvtier.core.runtime import LoopThread
from kvtier.core.segments import Chunk, SegmentAPI, SegmentKeys
from kvtier.core.store_queue import StoreQueue
from kvtier.core.threads import resolve_cpus, starting_on
from kvtier.core.tier import TierStats
from kvtier.kernels.rope import RotaryConfig

__all__ = ["ChunkSink", "HeldChunks", "KVTier", "PendingStore"]
"""Re-exported: :class:`PendingStore` and :class:`HeldChunks` live in
:mod:`kvtier.core.inplace`, ``ChunkSink`` in :mod:`kvtier.core.retrieval`."""


class KVTier(RetrieveAPI, SegmentAPI):
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
        tiers = build_tiers(config, registry, pool, layout=self.layout, emit=registry.emit)
        quotas = ledgers(config)
        signing = config.integrity
        self.integrity = None if signing is None else load_keys(signing, config.tenant, os.environ)
        """The MAC keys of ``config.integrity`` (``None``: blobs are checksummed, not signed)."""
        self.thread_cpus = resolve_cpus(config.thread_cpus)
        """The CPUs of this KVTier's threads (``None``: those of the thread opening it)."""
        with starting_on(self.thread_cpus):  # its pools, the loop and what they start
            self._codec = BlockingPool("kvtier codec", config.codec_threads, name="kvtier-codec")
            self.events = open_events(config, fingerprint.model, self.hasher, tiers, registry)
            """The tiers' chunks as vLLM KV events (``None`` without ``events:``); opened
            last of what can fail, as it binds sockets and starts a thread."""
            self._io = LoopThread()
        self.chain = TierChain(tiers, registry, pool, registry.emit, self._codec, self.integrity)
        self.chain.quotas = quotas
        chunk_bytes = self.layout.bytes_per_token() * config.chunk_tokens
        self.chain.prefetches = Prefetches(config.prefetch_bytes, chunk_bytes)
        self._reads = [0] * 6  # lookups, their tokens, hit; retrieves, their tokens, hit
        through = [i for i, t in enumerate(config.tiers) if t.write_policy == "through"]
        self._store = StoreQueue(
            self.chain,
            self.layout,
            config.store_queue_bytes,
            through,
            raw=CodecPipeline.from_config("raw", registry, layered=config.blob_layout == "layers"),
            registry=registry,
            pool=pool,
            codec=self._codec,
            io=self._io,
            integrity=self.integrity,
        )
        """The store queue: byte budget, copies into blobs, the writer task."""
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
        try:
            await self.chain.open()
        except BaseException:
            await self.chain.close()
            raise
        self._store.start()

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
        return self._store.begin(keys, bounds, start, self._check_open)

    def _queue(self, chunks: Sequence[Chunk]) -> int:
        """Copy ``(key, chunk, segment_start)`` items into blobs and queue them; see
        :meth:`StoreQueue.queue`."""
        return self._store.queue(chunks)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued store has reached every write-through tier (or failed)
        and the promotions and demotions started so far are done."""
        self._check_open()
        self._io.run(self._drained(), timeout)
        failure = self._store.take_failure()
        if failure is not None:
            raise failure

    async def _drained(self) -> None:
        await self._store.drained()
        await self.chain.drain()

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
            stores_queued=self._store.queued,
            stores_dropped=self._store.dropped,
            tokens_stored=self._store.tokens_stored,
            queue_bytes=self._store.queue_bytes,
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
            self._store.stop()
            self._io.run(self._shutdown())
            self._io.stop()
            if self.events is not None:
                self.events.close()

    async def _shutdown(self) -> None:
        await self._store.stopped()
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
