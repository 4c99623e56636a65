"""The read path of the tier chain: which tier serves each chunk of a fetch, and what
is checked on the way (see :meth:`ChainReads.fetch`).

A fetch asks each tier, fastest first, for the chunks the tiers above did not serve
(in :data:`FETCH_PARTS` concurrent parts for a tier outside the process). Bytes from
outside the process are verified in the codec threads; a corrupt blob is counted,
deleted and asked of the next tier; a blob that passes is decoded into its target.
Prefetches (:meth:`TierChain.prefetch`) read through the same path, checked but not
decoded.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from kvtier.core import blob as fmt
from kvtier.core.blob import Blob
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import Buffer
from kvtier.core.codecs import decode as decoding
from kvtier.core.errors import ChunkCorruptedError, CodecUnavailableError
from kvtier.core.specs import EventKind, TierEvent

if TYPE_CHECKING:
    from kvtier.core.integrity import MacKeys
    from kvtier.core.plugins import PluginRegistry
    from kvtier.core.prefetch import Prefetches
    from kvtier.core.quotas import TenantLedger
    from kvtier.core.tier import Tier

log = logging.getLogger(__name__)

Target = torch.Tensor | decoding.Sink
"""Where :meth:`TierChain.fetch` puts a chunk."""

FETCH_PARTS = 4
"""Concurrent ``get_many`` calls a fetch from a tier outside the process is split into."""


@dataclass
class Read:
    """Chunk ``index``'s bytes as tier ``tier`` returned them; ``blob`` once checked."""

    index: int
    tier: int
    buf: Buffer
    blob: Blob | None = None


class ChainReads:
    """The read path of :class:`~kvtier.core.chain.TierChain` (a mixin: it uses the
    chain's tiers, codec threads, quotas and prefetches, and promotes what slower tiers
    served through the chain)."""

    tiers: list[Tier]
    registry: PluginRegistry
    emit: Callable[[TierEvent], None]
    codec: BlockingPool
    integrity: MacKeys | None
    quotas: dict[str, TenantLedger]
    prefetches: Prefetches
    _promote: Callable[[Sequence[Read]], None]

    async def fetch(self, keys: Sequence[str], targets: Sequence[Target]) -> int:
        """Decode the longest available run of ``keys`` (from the first) into
        ``targets`` (one per key: a tensor of the chunk's shape, or a
        :class:`~kvtier.core.codecs.decode.Sink` that is handed the chunk, in the codec
        threads, possibly several at once); return the run's length.

        Each tier is asked (one ``get_many``, or :data:`FETCH_PARTS` concurrent ones for
        a tier outside the process, so that checking and decoding the first part
        overlaps reading the rest) for what the tiers above did not serve. A chunk is
        served by the fastest tier holding a valid copy: bytes from tiers without
        ``verified_reads`` are verified; a corrupt blob is counted, deleted from its
        tier and asked of the next; a blob needing a codec this process lacks is a
        miss there and stays. Chunks served by slower tiers are copied into the faster
        tiers that ``promote`` (:meth:`drain` waits for that). Targets past the
        returned run may have been written (sinks past it called). A blob reaches its
        target only after its checksum or MAC passed; a corrupt one never does.
        """
        await self.prefetches.settled(keys)  # promoted by now, or not at all
        served: dict[int, Read] = {}
        try:
            await self._serve_tiers(
                range(len(self.tiers)), list(range(len(keys))), keys, targets, served
            )
            count = next((i for i in range(len(keys)) if i not in served), len(keys))
            self._promote([r for i, r in served.items() if i < count])
            return count
        finally:
            for r in served.values():
                r.buf.release()

    async def _serve_tiers(
        self,
        tiers: Iterable[int],
        pending: list[int],
        keys: Sequence[str],
        targets: Sequence[Target] | None,
        served: dict[int, Read],
    ) -> None:
        """Ask ``tiers``, in order, for the chunks ``pending`` (indexes into ``keys``)
        that no tier before served (see :meth:`_serve`); the hits go into ``served``."""
        for t in tiers:
            if not pending:
                return
            reads = [
                self._serve(t, part, keys, targets, served) for part in self._parts(t, pending)
            ]
            results = await asyncio.gather(*reads, return_exceptions=True)
            failure = next((r for r in results if isinstance(r, BaseException)), None)
            if failure is not None:
                raise failure
            pending = [i for i in pending if i not in served]

    def _parts(self, t: int, wanted: list[int]) -> list[list[int]]:
        """``wanted`` split for concurrent reads from tier ``t``: in one part for a tier
        in the process, :data:`FETCH_PARTS` for the others."""
        parts = 1 if self.tiers[t].backend.capabilities.process_local else FETCH_PARTS
        step = -(-len(wanted) // parts)
        return [wanted[i : i + step] for i in range(0, len(wanted), step)]

    async def _serve(
        self,
        t: int,
        wanted: Sequence[int],
        keys: Sequence[str],
        targets: Sequence[Target] | None,
        served: dict[int, Read],
    ) -> None:
        """One ``get_many`` of ``keys[i]`` (``i`` in ``wanted``) from tier ``t``; each
        hit is checked and decoded into its target (only checked without ``targets``),
        and those that pass go into ``served``."""
        tier = self.tiers[t]
        asked = [keys[i] for i in wanted]
        began = time.perf_counter()
        got = await tier.guarded("get", tier.backend.get_many, asked, count=len(asked))
        if got is None:
            return
        seconds = time.perf_counter() - began
        reads = [Read(i, t, buf) for i, buf in zip(wanted, got, strict=True) if buf is not None]
        self._count_reads(tier, [r.buf for r in reads], len(wanted) - len(reads), seconds)
        if tier.name in self.quotas:
            self.quotas[tier.name].touch(
                [keys[r.index] for r in reads], [r.buf.nbytes for r in reads]
            )
        try:
            failed = await self._decode(reads, keys, targets)
        except BaseException:
            for r in reads:
                r.buf.release()
            raise
        for r in reads:
            if r.index in failed:
                r.buf.release()
            else:
                served[r.index] = r

    async def _decode(
        self,
        reads: Sequence[Read],
        keys: Sequence[str],
        targets: Sequence[Target] | None,
    ) -> set[int]:
        """Check and decode each read into its target (see :func:`decoding.decode_to`;
        only check, without ``targets``), in the codec threads; returns the indexes of
        the chunks that failed (corrupt blobs already counted and deleted). An exception
        a sink raises propagates."""

        def one(r: Read) -> ChunkCorruptedError | CodecUnavailableError | None:
            caps = self.tiers[r.tier].backend.capabilities
            try:
                check = fmt.parse if caps.verified_reads else fmt.verify
                mac_keys = None if caps.process_local else self.integrity
                header = check(r.buf.view, expected_key=keys[r.index], keys=mac_keys)
                if targets is not None:
                    target = targets[r.index]
                    inference = isinstance(target, torch.Tensor) and target.is_inference()
                    with torch.inference_mode(inference), torch.no_grad():
                        decoding.decode_to(r.buf, header, self.registry, target)
            except (ChunkCorruptedError, CodecUnavailableError) as exc:
                return exc
            r.blob = Blob(r.buf, header, sealed=not caps.process_local)
            return None

        problems = await self.codec.run_all([partial(one, r) for r in reads])
        for r, problem in zip(reads, problems, strict=True):
            if problem is not None:
                await self._unusable(r.tier, keys[r.index], problem)
        return {r.index for r, problem in zip(reads, problems, strict=True) if problem}

    def _count_reads(self, tier: Tier, hits: Sequence[Buffer], misses: int, seconds: float) -> None:
        """Count one ``get_many``; its wall time rides on its first event only (the hit
        event, else the miss event), so an observer sees each batch's latency once."""
        if hits:
            nbytes = sum(b.nbytes for b in hits)
            tier.stats.hits += len(hits)
            tier.stats.bytes_out += nbytes
            self.emit(TierEvent(EventKind.HIT, tier.name, len(hits), nbytes, seconds))
        if misses:
            tier.stats.misses += misses
            self.emit(TierEvent(EventKind.MISS, tier.name, misses, 0, 0.0 if hits else seconds))

    async def _unusable(
        self, t: int, key: str, problem: ChunkCorruptedError | CodecUnavailableError
    ) -> None:
        """A blob of tier ``t`` this process cannot use: a corrupt one is counted and
        deleted; one needing a codec this process lacks is fine and stays, for processes
        that have it."""
        if isinstance(problem, ChunkCorruptedError):
            await self._discard_corrupt(t, key, str(problem))
        else:
            log.warning("tier %s: %s", self.tiers[t].name, problem)

    async def _discard_corrupt(self, t: int, key: str, reason: str) -> None:
        """Count a blob that failed validation and delete it from tier ``t``."""
        tier = self.tiers[t]
        tier.stats.corrupt += 1
        log.warning("tier %s: deleting corrupt chunk %s: %s", tier.name, key, reason)
        self.emit(TierEvent(EventKind.CORRUPT, tier.name, 1, keys=(key,), detail=reason))
        await tier.guarded("delete", tier.backend.delete_many, [key], count=1)
        if tier.name in self.quotas:
            self.quotas[tier.name].forget([key])
