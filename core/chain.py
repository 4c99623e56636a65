"""The tier chain: batched lookups, fetches and writes across ordered tiers.

Runs on the I/O loop; checksums, encoding and decoding run in the chain's codec
threads, never on the loop. Every backend call goes through :meth:`Tier.guarded`, so a
failing tier is skipped (its chunks look missing) and never raises into the caller.
Everything about stored bytes is decided in the chain, once: which tier serves a
chunk, whether its bytes are verified (only bytes from outside the process are), what
happens to a corrupt blob (counted, deleted, read from the next tier): the read path,
:mod:`kvtier.core.reads` (layer by layer: :mod:`kvtier.core.layer_reads`); and which
faster tiers get a copy (promotion, here).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from functools import partial
from typing import Any

from kvtier.core import blob as fmt
from kvtier.core.backend import PutMode
from kvtier.core.blob import Blob
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.codecs import decode as decoding
from kvtier.core.errors import BackendUnavailableError
from kvtier.core.integrity import MacKeys
from kvtier.core.layer_reads import ChainLayerReads
from kvtier.core.plugins import PluginRegistry
from kvtier.core.prefetch import Prefetches
from kvtier.core.quotas import TenantLedger, evict
from kvtier.core.reads import FETCH_PARTS, Read, Target
from kvtier.core.specs import EventKind, TierEvent
from kvtier.core.tier import Tier

log = logging.getLogger(__name__)

__all__ = ["FETCH_PARTS", "Target", "TierChain"]
"""Re-exported: :data:`FETCH_PARTS` and ``Target`` live in :mod:`kvtier.core.reads`."""


class TierChain(ChainLayerReads):
    """The ordered tiers of one :class:`KVTier`; index 0 is the fastest.

    ``codec`` runs the CPU work on chunks (checksums, encoding, decoding).
    """

    def __init__(
        self,
        tiers: list[Tier],
        registry: PluginRegistry,
        pool: BufferPool,
        emit: Callable[[TierEvent], None],
        codec: BlockingPool,
        integrity: MacKeys | None = None,
    ) -> None:
        self.tiers = tiers
        self.registry = registry
        self.pool = pool
        self.emit = emit
        self.codec = codec
        self.integrity = integrity
        """MAC keys: blobs leaving the process are signed, and blobs read from outside
        it must be signed with one of them (see :mod:`kvtier.core.integrity`)."""
        self._encoding = (registry, pool, integrity)
        """What :func:`~kvtier.core.codecs.decode.recode` needs besides blob and pipeline."""
        self._background: set[asyncio.Task[None]] = set()
        self._late: set[asyncio.Future[Any]] = set()  # lookups that may outlive their limit
        self.quotas: dict[str, TenantLedger] = {}
        """Per-tenant quotas by tier name (:mod:`kvtier.core.quotas`)."""
        self.prefetches = Prefetches()
        """Chunks being prefetched and their byte budget (off until the owner sets
        one; :mod:`kvtier.core.prefetch`)."""

    # -- lifetime -----------------------------------------------------------------------

    async def open(self) -> None:
        """Open every backend; an unreachable one starts out skipped, a bad config raises.
        (The tiers fit together: :func:`~kvtier.core.factory.build_tiers` checked.)"""
        for i, tier in enumerate(self.tiers):
            tier.backend.eviction_listener = self._eviction_listener(tier)
            below = self.tiers[i + 1] if i + 1 < len(self.tiers) else None
            if below is not None and below.config.write_policy == "back":
                tier.backend.demotion_sink = self._demotion_sink(i + 1)
            try:
                await tier.backend.open()
            except BackendUnavailableError as exc:
                tier.mark_unopened(exc)

    async def close(self) -> None:
        await self.drain()
        await asyncio.gather(*self._late, return_exceptions=True)
        for tier in self.tiers:
            try:
                await tier.backend.close()
            except Exception:
                log.exception("closing tier %s failed", tier.name)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        """Run ``coro`` in the background; :meth:`drain` waits for it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def drain(self) -> None:
        """Wait for background promotions and demotions (and those they start)."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def _demotion_sink(self, target: int) -> Callable[[Sequence[tuple[str, Buffer]]], None]:
        sealed = not self.tiers[target - 1].backend.capabilities.process_local

        def demote(items: Sequence[tuple[str, Buffer]]) -> None:
            # Evicted blobs were checked when they entered the tier above.
            blobs = [Blob(buf, fmt.parse(buf.view), sealed=sealed) for _, buf in items]
            self.spawn(self.write_and_release(blobs, [target]))

        return demote

    def _eviction_listener(self, tier: Tier) -> Callable[[Sequence[tuple[str, int]]], None]:
        def evicted(items: Sequence[tuple[str, int]]) -> None:
            tier.stats.evictions += len(items)
            if tier.name in self.quotas:
                self.quotas[tier.name].forget([k for k, _ in items])
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

    # -- lookup -------------------------------------------------------------------------

    async def lookup(
        self,
        keys: Sequence[str],
        limits: Sequence[float | None] | None = None,
        *,
        prefetch: bool = False,
    ) -> int:
        """Number of leading keys available in some tier (side-effect free unless
        ``prefetch``: no counters move, nothing is read or promoted); see
        :meth:`lookup_by_tier`."""
        counts = await self.lookup_by_tier(keys, limits, prefetch=prefetch)
        return counts[-1] if counts else 0

    async def lookup_by_tier(
        self,
        keys: Sequence[str],
        limits: Sequence[float | None] | None = None,
        *,
        prefetch: bool = False,
        held: int = 0,
    ) -> list[int]:
        """For each tier ``t``, the number of leading keys available in tiers ``0..t``.
        Each tier is asked only about the keys the tiers above it lack.

        ``limits`` (seconds, one per tier; ``None``: the tier's own timeout) bounds how
        long each tier is waited for: a tier that has not answered by then counts as
        holding none of the keys. Its call goes on in the background, so that its own
        timeout still opens its circuit breaker and later lookups skip it at once.

        Side-effect free, unless ``prefetch``: then the leading keys found only in
        slower tiers, past the first ``held`` (which the caller holds itself), start
        moving into the faster tiers that promote (see :meth:`prefetch`; the answer
        does not wait for it)."""
        missing = list(range(len(keys)))
        found = [len(self.tiers)] * len(keys)  # the fastest tier holding each key
        counts = []
        for t, tier in enumerate(self.tiers):
            if missing:
                asked = [keys[i] for i in missing]
                present = await self._contains(tier, asked, limits[t] if limits else None)
                if present is not None:
                    for i, ok in zip(missing, present, strict=True):
                        if ok:
                            found[i] = t
                    missing = [i for i in missing if found[i] != t]
            counts.append(missing[0] if missing else len(keys))
        if prefetch and counts and counts[-1] > held:
            self.prefetch(keys[held : counts[-1]], found[held : counts[-1]])
        return counts

    async def _contains(
        self, tier: Tier, keys: list[str], limit: float | None
    ) -> list[bool] | None:
        call = tier.guarded("contains", tier.backend.contains_many, keys)
        if limit is None:
            return await call
        task = asyncio.ensure_future(call)
        self._late.add(task)  # close() waits for it, even if this lookup is cancelled
        task.add_done_callback(self._late.discard)
        try:
            return await asyncio.wait_for(asyncio.shield(task), limit)
        except asyncio.TimeoutError:
            return None

    def _promote(self, served: Sequence[Read]) -> None:
        """Queue chunks served by slower tiers for the faster tiers that promote."""
        for targets, blobs in self._promotions(served).items():
            self.spawn(self.write_and_release(blobs, targets))

    def _promotions(self, served: Iterable[Read]) -> dict[tuple[int, ...], list[Blob]]:
        """The checked blobs of ``served`` (retained: hand them to
        :meth:`write_and_release`) by the faster tiers that promote them."""
        by_targets: dict[tuple[int, ...], list[Blob]] = {}
        for r in served:
            targets = self._promoting(r.tier)
            if targets and r.blob is not None:
                by_targets.setdefault(targets, []).append(r.blob.retain())
        return by_targets

    def _promoting(self, t: int) -> tuple[int, ...]:
        """The tiers faster than tier ``t`` that take a copy of what it serves."""
        return tuple(u for u in range(t) if self.tiers[u].config.promote)

    # -- prefetch ---------------------------------------------------------------------------

    def prefetch(self, keys: Sequence[str], found: Sequence[int]) -> int:
        """Start copying ``keys[i]``, held by tier ``found[i]``, into the faster tiers
        that promote, in the background (:meth:`drain` waits for it); return how many
        chunks were started.

        Chunks in flight already are not read again; the others start in order while
        :attr:`prefetches`' byte budget lasts (the rest are counted as dropped). Each
        chunk goes through the fetch's read path (the same ``get_many`` calls; blobs
        verified, corrupt ones counted and deleted, a failing tier skipped), checked but
        not decoded, and is then written as a promotion. A fetch of a chunk in flight
        waits for its prefetch (:meth:`fetch`)."""
        wanted = [i for i, t in enumerate(found) if self._promoting(t)]
        started = [wanted[j] for j in self.prefetches.admit([keys[i] for i in wanted])]
        if not started:
            return 0
        chosen = [keys[i] for i in started]
        by_tier: dict[int, list[int]] = {}
        for j, i in enumerate(started):
            by_tier.setdefault(found[i], []).append(j)
        self.prefetches.track(chosen, self.spawn(self._prefetch(chosen, by_tier)))
        return len(chosen)

    async def _prefetch(self, keys: list[str], by_tier: dict[int, list[int]]) -> None:
        """Read ``keys[j]`` (``j`` in ``by_tier[t]``) from each tier ``t`` and write the
        valid ones into the tiers that promote them."""
        served: dict[int, Read] = {}

        async def read(t: int, wanted: list[int]) -> list[BaseException | None]:
            async with self.prefetches.turn(t):
                parts = [
                    self._serve(t, part, keys, None, served) for part in self._parts(t, wanted)
                ]
                return await asyncio.gather(*parts, return_exceptions=True)

        try:
            results = await asyncio.gather(*(read(t, wanted) for t, wanted in by_tier.items()))
            for failure in (r for tier_results in results for r in tier_results):
                if isinstance(failure, BaseException):
                    raise failure
            self.prefetches.stats.read_bytes += sum(r.buf.nbytes for r in served.values())
            writes = self._promotions(served.values()).items()
            await asyncio.gather(*(self.write_and_release(b, targets) for targets, b in writes))
        except Exception:
            log.exception("prefetching %d chunks failed", len(keys))
        finally:
            for r in served.values():
                r.buf.release()
            self.prefetches.done(keys)

    # -- write ------------------------------------------------------------------------------

    async def write_and_release(self, blobs: Sequence[Blob], targets: Sequence[int]) -> None:
        """:meth:`write`, then release the blobs (which the caller handed over)."""
        try:
            await self.write(blobs, targets)
        finally:
            for blob in blobs:
                blob.release()

    async def write(self, blobs: Sequence[Blob], targets: Sequence[int]) -> None:
        """Write checked blobs to each target tier, in that tier's encoding. The caller
        keeps ownership of ``blobs``.

        A blob is sealed (its checksum computed, in the codec threads) once, before it
        first goes to a tier that is not ``process_local``; a process-local tier (the
        ``cpu`` tier) takes it as it is, so a chunk that never leaves the process is
        never checksummed."""
        outside = {  # the encodings written as they are to tiers outside the process
            self.tiers[t].pipeline.name
            for t in targets
            if not self.tiers[t].backend.capabilities.process_local
        }
        unsealed = [b for b in blobs if not b.sealed and b.header.pipeline in outside]
        if unsealed:
            await self.codec.run_all([partial(b.ensure_sealed, self.integrity) for b in unsealed])
        await asyncio.gather(*(self._write_tier(self.tiers[t], blobs) for t in targets))

    async def _write_tier(self, tier: Tier, blobs: Sequence[Blob]) -> None:
        """One ``put_many`` with ``CREATE`` where the backend has it (a present key is
        left alone; no ``contains_many`` first), else ``OVERWRITE``. Blobs already in
        the tier's encoding go as they are, checksum included; the others are encoded
        anew, but only those the tier lacks: encoding costs more than asking."""
        ready = [b for b in blobs if b.header.pipeline == tier.pipeline.name]
        other = [b for b in blobs if b.header.pipeline != tier.pipeline.name]
        if other:
            keys = [b.key for b in other]
            present = await tier.guarded(
                "contains", tier.backend.contains_many, keys, count=len(keys)
            )
            lacking = [] if present is None else [not ok for ok in present]  # None: skipped
            other = [b for b, lacks in zip(other, lacking, strict=False) if lacks]
        encoded = [b.retain() for b in ready]
        if other:
            try:
                encoded += await self.codec.run_all(
                    [partial(decoding.recode, b, tier.pipeline, *self._encoding) for b in other],
                    orphan=Blob.release,
                )
            except Exception as exc:
                tier.encode_failed(exc, len(other))
        if encoded and tier.name in self.quotas:
            encoded = await self._within_quota(tier, self.quotas[tier.name], encoded)
        if not encoded:
            return
        try:
            mode = PutMode.CREATE if tier.backend.capabilities.create_mode else PutMode.OVERWRITE
            items = [(b.key, b.buf) for b in encoded]
            began = time.perf_counter()
            stored = await tier.guarded("put", tier.backend.put_many, items, mode, count=len(items))
            if tier.name in self.quotas:
                outcome = stored or [False] * len(encoded)  # None: skipped, nothing stored
                self.quotas[tier.name].settle([b.key for b in encoded], outcome)
            if stored is None:
                return
            seconds = time.perf_counter() - began
            done = [b for b, ok in zip(encoded, stored, strict=True) if ok]
            nbytes = sum(b.nbytes for b in done)
            tier.stats.stored += len(done)
            tier.stats.bytes_in += nbytes
            tier.stats.rejected += len(encoded) - len(done)
            if done:
                written = tuple(b.key for b in done)
                event = TierEvent(
                    EventKind.STORED, tier.name, len(done), nbytes, seconds, keys=written
                )
                self.emit(event)
        finally:
            for blob in encoded:
                blob.release()

    async def _within_quota(
        self, tier: Tier, ledger: TenantLedger, blobs: list[Blob]
    ) -> list[Blob]:
        """The blobs their tenants' quotas admit (the others released and counted as
        rejected), after deleting the tenants' own least recently used chunks that
        must make room, counted as evictions."""
        admitted, victims = ledger.admit([(b.key, b.nbytes) for b in blobs])
        await evict(tier, victims, self.emit)
        kept = [b for b, ok in zip(blobs, admitted, strict=True) if ok]
        for blob in (b for b, ok in zip(blobs, admitted, strict=True) if not ok):
            blob.release()
        tier.stats.rejected += len(blobs) - len(kept)
        return kept
