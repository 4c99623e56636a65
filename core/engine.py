"""``KVTier``: the synchronous API every integration uses.

::

    layout = KVLayout(num_layers=12, num_kv_heads=4, head_dim=64, dtype=torch.float32)
    with KVTier.open(config, model="my-model", layout=layout) as kv:
        kv.store(tokens, kv_tensor)      # queued; returns the number of tokens accepted
        kv.flush()                       # wait until write-through tiers have them
        n = kv.lookup(tokens)            # leading tokens available in the chain
        n, kv_tensor = kv.retrieve(tokens)
        kv.stats()

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
import collections
import logging
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from kvtier.core.blob import CodecPipeline, decode_blob
from kvtier.core.buffers import Buffer, BufferPool, default_pool
from kvtier.core.chain import Fetched, TierChain
from kvtier.core.config import KVTierConfig, load_config
from kvtier.core.errors import ChunkCorruptedError, ConfigError
from kvtier.core.factory import build_backend
from kvtier.core.keys import ChunkHasher, ExtraKeys, Tokens, namespace_for
from kvtier.core.layout import KVLayout, ModelFingerprint
from kvtier.core.plugins import PluginRegistry, get_registry
from kvtier.core.runtime import LoopThread
from kvtier.core.specs import EventKind, TierEvent
from kvtier.core.tier import Tier, TierStats

log = logging.getLogger(__name__)


@dataclass
class KVTierStats:
    """Per-tier counters plus the store queue's."""

    tiers: list[TierStats]
    stores_queued: int = 0
    stores_dropped: int = 0
    tokens_stored: int = 0
    queue_bytes: int = 0

    def tier(self, name: str) -> TierStats:
        return next(t for t in self.tiers if t.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tiers": [t.as_dict() for t in self.tiers],
            "stores_queued": self.stores_queued,
            "stores_dropped": self.stores_dropped,
            "tokens_stored": self.tokens_stored,
            "queue_bytes": self.queue_bytes,
        }


class KVTier:
    """A model's view of the tier chain. Build it with :meth:`open`."""

    def __init__(
        self,
        config: KVTierConfig,
        fingerprint: ModelFingerprint,
        *,
        registry: PluginRegistry,
        pool: BufferPool,
    ) -> None:
        self.config = config
        self.layout = fingerprint.layout
        self.registry = registry
        self.pool = pool
        self.hasher = ChunkHasher(
            namespace_for(fingerprint, config.tenant),
            chunk_tokens=config.chunk_tokens,
            algorithm=config.hash,
            seed=config.hash_seed,
        )
        self._raw = CodecPipeline.from_config("raw", registry)
        tiers = [
            Tier(
                tier_config,
                build_backend(
                    tier_config.url,
                    capacity=tier_config.capacity,
                    options=tier_config.options,
                    registry=registry,
                    pool=pool,
                ),
                CodecPipeline.from_config(tier_config.codec, registry),
                retry_after=config.retry_after,
                emit=registry.emit,
            )
            for tier_config in config.tiers
        ]
        self._check_codecs(tiers)
        self.chain = TierChain(tiers, registry, pool, registry.emit)
        self._through = [i for i, t in enumerate(config.tiers) if t.write_policy == "through"]
        self._lock = threading.Lock()
        self._queue_bytes = 0
        self._queued = 0
        self._dropped = 0
        self._tokens_stored = 0
        self._inflight: dict[str, int] = {}  # queued key -> bytes it holds of the budget
        self._io = LoopThread()
        self._jobs: asyncio.Queue[list[tuple[str, Buffer]] | None] | None = None
        self._closed = False
        try:
            self._io.run(self._start())
        except BaseException:
            self._io.stop()
            raise

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
        pool: BufferPool | None = None,
        registry: PluginRegistry | None = None,
    ) -> KVTier:
        """Open the tier chain of ``config`` (a YAML path, a mapping, or ``None`` for the
        embedded default) for one model. ``tenant`` overrides the config's tenant;
        ``registry`` replaces the process-wide plugin registry (and the config's
        ``plugins.disable``)."""
        cfg = load_config(config)
        if tenant is not None:
            cfg = cfg.model_copy(update={"tenant": tenant})
        registry = registry or get_registry(frozenset(cfg.plugins.disable))
        registry.pm.hook.kvtier_configure(config=cfg)
        fingerprint = ModelFingerprint(model, layout, tp_rank=tp_rank, tp_size=tp_size)
        return cls(cfg, fingerprint, registry=registry, pool=pool or default_pool())

    async def _start(self) -> None:
        self._jobs = asyncio.Queue()
        try:
            await self.chain.open()
        except BaseException:
            await self.chain.close()
            raise
        self._writer = asyncio.get_running_loop().create_task(self._write_loop())

    def _check_codecs(self, tiers: list[Tier]) -> None:
        """Encode a one-token chunk with every tier's pipeline, so that a codec that cannot
        handle this layout (``int4`` with an odd head_dim, say) fails here, not later."""
        probe = torch.zeros(self.layout.chunk_shape(1), dtype=self.layout.dtype)
        key = str(self.hasher.keys([0], partial=True)[0])
        for tier in tiers:
            try:
                tier.pipeline.encode(key, probe, self.pool).release()
            except ConfigError as exc:
                raise ConfigError(
                    f"tier {tier.name!r}: codec {tier.pipeline.name!r}: {exc}"
                ) from None

    # -- keys -------------------------------------------------------------------------

    def _chunks(
        self, tokens: Tokens, extra_keys: Sequence[ExtraKeys], start: int = 0
    ) -> tuple[list[str], list[tuple[int, int]]]:
        """Keys and ``(start, end)`` bounds of the chunks of ``tokens`` from ``start`` on."""
        if not 0 <= start <= len(tokens) or start % self.config.chunk_tokens:
            raise ConfigError(
                f"start must be a multiple of chunk_tokens ({self.config.chunk_tokens}) "
                f"between 0 and len(tokens) ({len(tokens)}), got {start}"
            )
        partial = self.config.store_partial_chunks
        keys = self.hasher.keys(tokens, extra_keys=extra_keys, partial=partial)
        bounds = self.hasher.chunk_bounds(len(tokens), partial=partial)
        first = start // self.config.chunk_tokens
        return [str(k) for k in keys[first:]], bounds[first:]

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

        The data is copied before returning, so the caller may reuse ``kv``. Chunks
        that do not fit the store queue's byte budget are dropped (counted), as are
        chunks already queued; nothing here waits for storage.
        """
        self._check_open()
        keys, bounds = self._chunks(tokens, extra_keys, start)
        self.layout.check(kv, len(tokens) - start)
        batch: list[tuple[str, Buffer]] = []
        accepted = start
        for i, (key, (chunk_start, end)) in enumerate(zip(keys, bounds, strict=True)):
            nbytes = (end - chunk_start) * self.layout.bytes_per_token()
            with self._lock:
                queued = key in self._inflight
                full = not queued and self._queue_bytes + nbytes > self.config.store_queue_bytes
                if not queued and not full:
                    self._queue_bytes += nbytes
                    self._inflight[key] = nbytes
            if full:
                self._drop(keys[i:])
                break
            if not queued:
                part = kv[:, :, chunk_start - start : end - start]
                batch.append((key, self._raw.encode(key, part, self.pool)))
            accepted = end
        if batch:
            with self._lock:
                self._queued += len(batch)
                self._tokens_stored += accepted - start
            self._io.loop.call_soon_threadsafe(self._enqueue, batch)
        return accepted

    def _drop(self, keys: list[str]) -> None:
        with self._lock:
            self._dropped += len(keys)
        self.registry.emit(TierEvent(EventKind.DROPPED, "-", len(keys), keys=tuple(keys)))

    def _enqueue(self, batch: list[tuple[str, Buffer]]) -> None:
        assert self._jobs is not None
        self._jobs.put_nowait(batch)

    async def _write_loop(self) -> None:
        assert self._jobs is not None
        while True:
            batch = await self._jobs.get()
            try:
                if batch is None:
                    return
                await self.chain.write(batch, self._through)
            except Exception:
                log.exception("writing %d queued chunks failed", len(batch or ()))
            finally:
                if batch:
                    self._finish(batch)
                self._jobs.task_done()

    def _finish(self, batch: list[tuple[str, Buffer]]) -> None:
        with self._lock:
            for key, _ in batch:
                self._queue_bytes -= self._inflight.pop(key)
        for _, blob in batch:
            blob.release()

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every queued store has reached every write-through tier (or failed)."""
        self._check_open()
        assert self._jobs is not None
        self._io.run(self._jobs.join(), timeout)

    # -- lookup and retrieve ----------------------------------------------------------

    def lookup(self, tokens: Tokens, *, extra_keys: Sequence[ExtraKeys] = ()) -> int:
        """Leading tokens of ``tokens`` whose KV is available in some tier (side-effect
        free: no counters move, nothing is promoted)."""
        self._check_open()
        keys, bounds = self._chunks(tokens, extra_keys)
        if not keys:
            return 0
        n = self._io.run(self.chain.lookup(keys))
        return bounds[n - 1][1] if n else 0

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
        start`` tokens). Each chunk comes from the fastest tier holding it; a corrupt
        blob is deleted and the next tier is tried; chunks served by slower tiers are
        promoted into faster tiers with ``promote`` set.
        """
        self._check_open()
        keys, bounds = self._chunks(tokens, extra_keys, start)
        if out is not None:
            want = self.layout.chunk_shape(len(tokens) - start)
            if (
                out.dtype != self.layout.dtype
                or out.dim() != 5
                or out.shape[2] < len(tokens) - start
            ):
                raise ConfigError(f"out must have dtype {self.layout.dtype} and shape {want}")
        if not keys:
            return start, self._result(out, 0)
        fetched = self._io.run(self.chain.fetch(keys))
        if out is None and fetched:
            out = torch.empty(
                self.layout.chunk_shape(bounds[len(fetched) - 1][1] - start),
                dtype=self.layout.dtype,
            )
        served: list[Fetched] = []
        pending = collections.deque(fetched)
        try:
            while pending:
                item = pending.popleft()
                chunk_start, end = bounds[item.index]
                target = out[:, :, chunk_start - start : end - start]  # type: ignore[index]
                done = self._decode(keys[item.index], item, target)
                if done is None:
                    break
                served.append(done)
        finally:
            for item in pending:
                item.blob.release()
        n = bounds[len(served) - 1][1] if served else start
        self._promote(keys, served)
        return n, self._result(out, n - start)

    def _result(self, out: torch.Tensor | None, n: int) -> torch.Tensor:
        if out is None:
            return torch.empty(self.layout.chunk_shape(n), dtype=self.layout.dtype)
        return out[:, :, :n]

    def _decode(self, key: str, item: Fetched | None, target: torch.Tensor) -> Fetched | None:
        """Decode ``item`` into ``target``; on corruption discard it and try slower tiers.

        Takes ownership of ``item``; returns the item that was decoded (still holding its
        blob, for promotion) or ``None`` when no tier has a valid copy."""
        while item is not None:
            try:
                decode_blob(item.blob.view, self.registry, target, expected_key=key)
                return item
            except ChunkCorruptedError as exc:
                item.blob.release()
                self._io.run(self.chain.discard_corrupt(item.tier, key, str(exc)))
                item = self._io.run(self.chain.refetch(key, item.tier, item.index))
        return None

    def _promote(self, keys: list[str], served: list[Fetched]) -> None:
        """Queue chunks served by slower tiers for the faster tiers that promote."""
        by_targets: dict[tuple[int, ...], list[tuple[str, Buffer]]] = {}
        for item in served:
            targets = tuple(t for t in range(item.tier) if self.config.tiers[t].promote)
            if targets:
                by_targets.setdefault(targets, []).append((keys[item.index], item.blob))
            else:
                item.blob.release()
        for targets, items in by_targets.items():
            coro = self.chain.write_and_release(items, targets)
            self._io.loop.call_soon_threadsafe(self.chain.spawn, coro)

    # -- stats and lifetime -----------------------------------------------------------

    def stats(self) -> KVTierStats:
        """A snapshot of per-tier counters and the store queue."""
        with self._lock:
            return KVTierStats(
                tiers=[TierStats(**vars(t.stats)) for t in self.chain.tiers],
                stores_queued=self._queued,
                stores_dropped=self._dropped,
                tokens_stored=self._tokens_stored,
                queue_bytes=self._queue_bytes,
            )

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this KVTier is closed; open a new one with KVTier.open(...)")

    def close(self, *, flush: bool = True) -> None:
        """Flush queued stores (unless ``flush=False``), close every tier, stop the loop."""
        if self._closed:
            return
        if flush:
            self.flush()
        self._closed = True
        assert self._jobs is not None
        self._io.loop.call_soon_threadsafe(self._jobs.put_nowait, None)
        self._io.run(self._shutdown())
        self._io.stop()

    async def _shutdown(self) -> None:
        await self._writer
        await self.chain.close()

    def __enter__(self) -> KVTier:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
