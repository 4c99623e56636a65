"""Chunk TTL for shared tiers whose store keeps no write time (``mooncake``,
``vineyard``, ``nixl``).

Mooncake's master has no per-object expiry (its leases only delay removal after a
read, its soft-pin TTL only orders eviction), vineyardd none at all, and a nixl tier is
each process's own memory. So the backend itself records when it *met* each chunk:
when it wrote it, or, for a chunk another process wrote, when this process first found
it (read or ``contains``). A chunk is expired once ``ttl`` seconds passed since then:
a miss for ``get_many`` and ``contains_many`` (not listed by ``iter_keys``), removed
from the store when met, and by a sweep every ``ttl / 4`` seconds (at most 1 min) of
at most :data:`SWEEP_LIMIT` of the oldest ones. A chunk another process wrote thus
lives at most ``ttl`` after this process met it, never less than ``ttl`` after it was
written. The record is bounded (:data:`MAX_TIMES` keys, the oldest forgotten first:
a forgotten chunk is met anew, so it lives longer, never shorter).

:class:`ChunkExpiry` is a mixin placed before :class:`~kvtier.core.backend.Backend`
in a backend's bases; the backend's options say the TTL (``chunk_ttl()``).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TYPE_CHECKING

from kvtier.core.backend import BackendStats, PutMode
from kvtier.core.buffers import Buffer, release_all
from kvtier.core.errors import BackendError

if TYPE_CHECKING:
    from kvtier.core.backend import Backend

    _Base = Backend
else:
    _Base = object

log = logging.getLogger(__name__)

SWEEP_LIMIT = 256
"""Most expired chunks one sweep removes."""
MAX_TIMES = 1 << 20
"""Most chunks whose times one backend keeps."""


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it ended, cancelling it again every 0.1 s: a
    client library may swallow one cancellation (a sweep cancelled inside an index
    write once kept sweeping, and its backend's close waited for it for ever)."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.1)
    if not task.cancelled() and task.exception() is not None:
        log.warning("sweep task ended with %r", task.exception())


class WriteTimes:
    """When each chunk was met (oldest first), bounded; thread safe."""

    def __init__(
        self, ttl: float, clock: Callable[[], float] = time.monotonic, limit: int = MAX_TIMES
    ) -> None:
        self.ttl = ttl
        self.clock = clock
        """Seconds, monotonic; tests replace it."""
        self.limit = limit
        self.expired = 0
        """Chunks removed because they expired."""
        self._times: OrderedDict[str, float] = OrderedDict()
        self._pinned: set[str] = set()
        """Pinned keys: never stale (their times are not kept)."""
        self._lock = threading.Lock()

    @property
    def period(self) -> float:
        """Seconds between two sweeps."""
        return min(max(self.ttl / 4, 0.05), 60.0)

    def written(self, keys: Sequence[str]) -> None:
        """``keys`` were written now."""
        with self._lock:
            now = self.clock()
            for key in keys:
                if key not in self._pinned:
                    self._times[key] = now
                    self._times.move_to_end(key)
            self._trim()

    def forget(self, keys: Sequence[str]) -> None:
        with self._lock:
            for key in keys:
                self._times.pop(key, None)
                self._pinned.discard(key)

    def pin(self, keys: Sequence[str]) -> None:
        """``keys`` were pinned: they never expire until unpinned."""
        with self._lock:
            for key in keys:
                self._pinned.add(key)
                self._times.pop(key, None)

    def unpin(self, keys: Sequence[str]) -> None:
        """``keys`` were unpinned: their ``ttl`` starts now."""
        with self._lock:
            self._pinned.difference_update(keys)
        self.written(keys)

    def stale(self, keys: Sequence[str]) -> list[bool]:
        """Whether each present key is expired; a key never met is met now (fresh)."""
        with self._lock:
            now = self.clock()
            out = []
            for key in keys:
                met = self._times.get(key)
                if met is None and key not in self._pinned:
                    self._times[key] = met = now
                out.append(met is not None and now - met >= self.ttl)
            self._trim()
            return out

    def known_stale(self, key: str) -> bool:
        """Whether ``key`` is known and expired (nothing is recorded)."""
        with self._lock:
            met = self._times.get(key)
            return met is not None and self.clock() - met >= self.ttl

    def due(self, limit: int) -> list[str]:
        """Up to ``limit`` of the oldest expired keys."""
        with self._lock:
            now = self.clock()
            out: list[str] = []
            for key, met in self._times.items():
                if now - met < self.ttl or len(out) >= limit:
                    break
                out.append(key)
            return out

    def _trim(self) -> None:
        while len(self._times) > self.limit:
            self._times.popitem(last=False)


class ChunkExpiry(_Base):
    """Expired chunks are misses, removed when met and by a bounded sweep (see the
    module doc); a no-op unless :meth:`chunk_ttl` is set."""

    expiry: WriteTimes | None = None

    def chunk_ttl(self) -> float | None:
        """Seconds a chunk lives (the backend's option); ``None``: forever."""
        return getattr(self.options, "ttl", None)

    def _configure(self) -> None:
        super()._configure()
        ttl = self.chunk_ttl()
        self.expiry = None if ttl is None else WriteTimes(ttl)
        self._expiry_sweeper: asyncio.Task[None] | None = None

    async def _open(self) -> None:
        await super()._open()
        if self.expiry is not None:
            self._expiry_sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _close(self) -> None:
        if self._expiry_sweeper is not None:
            await stop(self._expiry_sweeper)
            self._expiry_sweeper = None
        await super()._close()

    async def _sweep_forever(self) -> None:
        assert self.expiry is not None
        while True:
            await asyncio.sleep(self.expiry.period)
            try:
                await self.sweep_expired()
            except BackendError as exc:
                log.warning("%s: sweeping expired chunks failed: %s", self.safe_url, exc)

    async def sweep_expired(self, limit: int = SWEEP_LIMIT) -> int:
        """Remove up to ``limit`` of the oldest expired chunks; how many went."""
        if self.expiry is None:
            return 0
        return await self._remove_expired(self.expiry.due(limit))

    async def _remove_expired(self, keys: list[str]) -> int:
        """Delete ``keys`` that are still expired (not written again meanwhile)."""
        assert self.expiry is not None
        keys = await self._unpinned([key for key in keys if self.expiry.known_stale(key)])
        if not keys:
            return 0
        gone = sum(await self._delete_unique(keys))  # not those evicted meanwhile
        self.expiry.expired += gone
        return gone

    async def _expirable(self, keys: list[str]) -> list[str]:
        """Those of the expired ``keys`` that may be removed: a backend whose pins other
        processes set leaves out the pinned ones (the store's pins; its own
        :meth:`WriteTimes.pin` ones never expire)."""
        return keys

    async def _unpinned(self, keys: list[str]) -> list[str]:
        """Those of the expired ``keys`` that are not pinned in the store; the others are
        pinned here too (they never expire while pinned). Best effort: a failure to
        ask leaves them all expired, as before pins."""
        if not keys:
            return keys
        try:
            free = await self._expirable(keys)
        except BackendError as exc:
            log.info("%s: asking for pins failed: %s", self.safe_url, exc)
            return keys
        assert self.expiry is not None
        self.expiry.pin(sorted(set(keys) - set(free)))
        return free

    async def _stale(self, keys: list[str]) -> list[bool]:
        """Whether each present key is expired (and not pinned in the store)."""
        assert self.expiry is not None
        stale = self.expiry.stale(keys)
        free = set(await self._unpinned([k for k, old in zip(keys, stale, strict=True) if old]))
        return [key in free for key in keys]

    async def _drop_met(self, keys: list[str]) -> None:
        """Remove expired chunks met by a read (best effort: the sweep retries)."""
        try:
            await self._remove_expired(keys)
        except BackendError as exc:
            log.info("%s: removing expired chunks failed: %s", self.safe_url, exc)

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        got = await super()._get_unique(keys)  # type: ignore[safe-super]
        if self.expiry is None:
            return got
        found = [i for i, buf in enumerate(got) if buf is not None]
        try:
            stale = await self._stale([keys[i] for i in found])
        except BaseException:
            release_all(got)
            raise
        gone = []
        for i, expired in zip(found, stale, strict=True):
            if expired:
                buf = got[i]
                assert buf is not None
                buf.release()
                got[i] = None
                gone.append(keys[i])
        if gone:
            await self._drop_met(gone)
        return got

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        there = await super()._contains_unique(keys)  # type: ignore[safe-super]
        if self.expiry is None:
            return there
        found = [i for i, yes in enumerate(there) if yes]
        stale = await self._stale([keys[i] for i in found])
        gone = [keys[i] for i, expired in zip(found, stale, strict=True) if expired]
        for i, expired in zip(found, stale, strict=True):
            there[i] = not expired
        if gone:
            await self._drop_met(gone)
        return there

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        if self.expiry is not None and mode is PutMode.CREATE:
            # an expired chunk must not make a CREATE fail: remove it first
            stale = [key for key, _ in items if self.expiry.known_stale(key)]
            if stale:
                await self._drop_met(stale)
        done = await super()._put_unique(items, mode)  # type: ignore[safe-super]
        if self.expiry is not None:
            self.expiry.written([key for (key, _), ok in zip(items, done, strict=True) if ok])
        return done

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        done = await super()._delete_unique(keys)  # type: ignore[safe-super]
        if self.expiry is not None:
            self.expiry.forget(keys)
        return done

    async def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        async for key in super()._iter_keys(prefix):  # type: ignore[safe-super]
            if self.expiry is None or not self.expiry.known_stale(key):
                yield key

    async def _stats(self) -> BackendStats:
        stats = await super()._stats()  # type: ignore[safe-super]
        if self.expiry is not None:
            stats.details["expired"] = self.expiry.expired
        return stats
