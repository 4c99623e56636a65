"""The tier chain: batched lookups, fetches and writes across ordered tiers.

Runs on the I/O loop. Every backend call goes through :meth:`Tier.guarded`, so a
failing tier is skipped (its chunks look missing) and never raises into the caller.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.core.backend import PutMode
from kvtier.core.blob import BlobHeader, CodecPipeline, decode_blob, read_header
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.errors import BackendUnavailableError, ChunkCorruptedError, ConfigError
from kvtier.core.plugins import PluginRegistry
from kvtier.core.specs import EventKind, TierEvent
from kvtier.core.tier import Tier

log = logging.getLogger(__name__)


@dataclass
class Fetched:
    """A blob read for chunk ``index`` from tier ``tier``; the receiver releases ``blob``."""

    index: int
    tier: int
    blob: Buffer


def blob_tensor(blob: Buffer, header: BlobHeader, registry: PluginRegistry) -> torch.Tensor:
    """The chunk a blob holds: a zero-copy view for ``raw`` blobs, else decoded."""
    if [name for name, _ in header.stages] != ["raw"] or header.payload_nbytes == 0:
        return decode_blob(blob.view, registry)[1]
    start = header.payload_offset
    payload = blob.view[start : start + header.payload_nbytes]
    return torch.frombuffer(payload, dtype=header.dtype).view(header.shape)


class TierChain:
    """The ordered tiers of one :class:`KVTier`; index 0 is the fastest."""

    def __init__(
        self,
        tiers: list[Tier],
        registry: PluginRegistry,
        pool: BufferPool,
        emit: Callable[[TierEvent], None],
    ) -> None:
        self.tiers = tiers
        self.registry = registry
        self.pool = pool
        self.emit = emit
        self._background: set[asyncio.Task[None]] = set()

    async def open(self) -> None:
        """Open every backend; an unreachable one starts out skipped, a bad config raises."""
        for i, tier in enumerate(self.tiers):
            tier.backend.eviction_listener = self._eviction_listener(tier)
            below = self.tiers[i + 1] if i + 1 < len(self.tiers) else None
            if below is not None and below.config.write_policy == "back":
                if not tier.backend.capabilities.hands_over_evictions:
                    raise ConfigError(
                        f"tier {below.name!r} has write_policy 'back', but the tier above it, "
                        f"{tier.name!r}, cannot hand over the chunks it evicts; use "
                        f"write_policy 'through' for {below.name!r}"
                    )
                tier.backend.demotion_sink = self._demotion_sink(i + 1)
            try:
                await tier.backend.open()
            except BackendUnavailableError as exc:
                tier.mark_unopened(exc)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` in the background; :meth:`drain` waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background promotions and demotions."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _demotion_sink(self, target: int) -> Callable[[Sequence[tuple[str, Buffer]]], None]:
        def demote(items: Sequence[tuple[str, Buffer]]) -> None:
            self.spawn(self.write_and_release(items, [target]))

        return demote

    async def write_and_release(
        self, items: Sequence[tuple[str, Buffer]], targets: Sequence[int]
    ) -> None:
        """:meth:`write`, then release the blobs (which the caller handed over)."""
        try:
            await self.write(items, targets)
        finally:
            for _, blob in items:
                blob.release()

    async def close(self) -> None:
        await self.drain()
        for tier in self.tiers:
            try:
                await tier.backend.close()
            except Exception:
                log.exception("closing tier %s failed", tier.name)

    def _eviction_listener(self, tier: Tier) -> Callable[[Sequence[tuple[str, int]]], None]:
        def evicted(items: Sequence[tuple[str, int]]) -> None:
            tier.stats.evictions += len(items)
            self.emit(
                TierEvent(
                    EventKind.EVICTED,
                    tier.name,
                    len(items),
                    nbytes=sum(n for _, n in items),
                    keys=tuple(k for k, _ in items),
                )
            )

        return evicted

    async def holders(self, keys: Sequence[str], *, count: bool = False) -> list[int | None]:
        """Index of the first tier holding each key (``None`` where none does).

        Each tier is asked only about keys the tiers above it lack. With ``count``,
        per-tier misses are counted (a retrieval, not a side-effect-free lookup).
        """
        holder: list[int | None] = [None] * len(keys)
        missing = list(range(len(keys)))
        for t, tier in enumerate(self.tiers):
            if not missing:
                break
            asked = [keys[i] for i in missing]
            present = await tier.guarded("contains", tier.backend.contains_many, asked)
            if present is None:
                continue
            still = [i for i, ok in zip(missing, present, strict=True) if not ok]
            for i, ok in zip(missing, present, strict=True):
                if ok:
                    holder[i] = t
            if count and still:
                tier.stats.misses += len(still)
                self.emit(TierEvent(EventKind.MISS, tier.name, len(still)))
            missing = still
        return holder

    async def lookup(self, keys: Sequence[str]) -> int:
        """Number of leading keys available in some tier."""
        holder = await self.holders(keys)
        return next((i for i, t in enumerate(holder) if t is None), len(keys))

    async def fetch(self, keys: Sequence[str]) -> list[Fetched]:
        """Blobs of the longest available prefix of ``keys``, each from the fastest tier
        holding it (falling back to slower tiers where a read misses)."""
        holder = await self.holders(keys, count=True)
        prefix = next((i for i, t in enumerate(holder) if t is None), len(keys))
        got: dict[int, Fetched] = {}
        pending = list(range(prefix))
        for t, tier in enumerate(self.tiers):
            mine = [i for i in pending if (h := holder[i]) is not None and h <= t]
            if not mine:
                continue
            asked = [keys[i] for i in mine]
            blobs = await tier.guarded("get", tier.backend.get_many, asked, count=len(mine))
            if blobs is None:
                continue
            for i, blob in zip(mine, blobs, strict=True):
                if blob is not None:
                    got[i] = Fetched(i, t, blob)
            self._count_hits(tier, [b for b in blobs if b is not None])
            pending = [i for i in pending if i not in got]
        end = next((i for i in range(prefix) if i not in got), prefix)
        for i in range(end, prefix):
            if i in got:
                got.pop(i).blob.release()
        return [got[i] for i in range(end)]

    async def refetch(self, key: str, below: int, index: int) -> Fetched | None:
        """The blob of ``key`` from the first tier after ``below`` that has it."""
        for t in range(below + 1, len(self.tiers)):
            tier = self.tiers[t]
            blobs = await tier.guarded("get", tier.backend.get_many, [key], count=1)
            if blobs and blobs[0] is not None:
                self._count_hits(tier, [blobs[0]])
                return Fetched(index, t, blobs[0])
        return None

    def _count_hits(self, tier: Tier, blobs: Sequence[Buffer]) -> None:
        if blobs:
            nbytes = sum(b.nbytes for b in blobs)
            tier.stats.hits += len(blobs)
            tier.stats.bytes_out += nbytes
            self.emit(TierEvent(EventKind.HIT, tier.name, len(blobs), nbytes=nbytes))

    async def discard_corrupt(self, tier_index: int, key: str, reason: str) -> None:
        """Delete a blob that failed validation and count it."""
        tier = self.tiers[tier_index]
        tier.stats.corrupt += 1
        self.emit(TierEvent(EventKind.CORRUPT, tier.name, 1, keys=(key,), detail=reason))
        await tier.guarded("delete", tier.backend.delete_many, [key], count=1)

    async def write(self, items: Sequence[tuple[str, Buffer]], targets: Sequence[int]) -> None:
        """Write blobs to each target tier that lacks them, re-encoding for each tier's
        codec pipeline. The caller keeps ownership of ``items``."""
        await asyncio.gather(*(self._write_tier(self.tiers[t], items) for t in targets))

    async def _write_tier(self, tier: Tier, items: Sequence[tuple[str, Buffer]]) -> None:
        keys = [k for k, _ in items]
        present = await tier.guarded("contains", tier.backend.contains_many, keys, count=len(keys))
        if present is None:
            return
        todo = [item for item, ok in zip(items, present, strict=True) if not ok]
        if not todo:
            return
        loop = asyncio.get_running_loop()
        try:
            blobs = await loop.run_in_executor(None, self._encode_for, tier.pipeline, todo)
        except Exception as exc:
            tier.encode_failed(exc, len(todo))
            return
        try:
            stored = await tier.guarded(
                "put", tier.backend.put_many, blobs, PutMode.OVERWRITE, count=len(blobs)
            )
            if stored is None:
                return
            done = [(k, b) for (k, b), ok in zip(blobs, stored, strict=True) if ok]
            nbytes = sum(b.nbytes for _, b in done)
            tier.stats.stored += len(done)
            tier.stats.bytes_in += nbytes
            tier.stats.rejected += len(blobs) - len(done)
            if done:
                self.emit(
                    TierEvent(
                        EventKind.STORED,
                        tier.name,
                        len(done),
                        nbytes=nbytes,
                        keys=tuple(k for k, _ in done),
                    )
                )
        finally:
            for _, blob in blobs:
                blob.release()

    def _encode_for(
        self, pipeline: CodecPipeline, items: Sequence[tuple[str, Buffer]]
    ) -> list[tuple[str, Buffer]]:
        """Each blob in ``pipeline``'s encoding: the same buffer (retained) when it already
        is, else re-encoded. Unreadable blobs are dropped."""
        out = []
        for key, blob in items:
            try:
                header = read_header(blob.view)
                if "+".join(name for name, _ in header.stages) == pipeline.name:
                    out.append((key, blob.retain()))
                else:
                    tensor = blob_tensor(blob, header, self.registry)
                    out.append((key, pipeline.encode(key, tensor, self.pool)))
            except ChunkCorruptedError:
                log.warning("not writing unreadable blob %s", key)
        return out
