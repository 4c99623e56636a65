"""A bounded in-RAM store of blobs: the state behind the ``cpu`` and ``nixl`` tiers.

:class:`RamStore` maps chunk keys to :class:`~kvtier.core.buffers.Buffer` s, zero
copy: it keeps the very buffer it is given (one ``retain()``) and hands it back
retained, so a hit costs a dictionary lookup. Overwrite, delete, eviction and
:meth:`RamStore.clear` drop only the store's reference: a reader still holding a
returned buffer keeps valid bytes. When a blob does not fit, the eviction policy picks
victims until it does; a blob larger than the whole capacity is rejected. Capacity
counts ``Buffer.nbytes``. With a ``ttl``, a blob older than ``ttl`` seconds (since it
was written) is a miss and is removed when met, and :meth:`RamStore.sweep` (run at
each ``put_many`` and by its backend's timer) removes a bounded number of them.
:meth:`RamStore.pin_many` pins stored blobs, up to ``pinned_bytes`` in all: a pinned
blob is never evicted nor expired (its ``ttl`` restarts when it is unpinned); a blob
that only fits by evicting pinned ones is rejected. :meth:`RamStore.ages` says how long
ago each blob was written (for ``kvtier purge --older-than``; pinned blobs have none).

The store neither validates keys nor knows about open or closed: its backend does.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from kvtier.core.backend import BackendStats, Capabilities, PutMode
from kvtier.core.buffers import Buffer
from kvtier.core.eviction import EvictionPolicy

if TYPE_CHECKING:
    from kvtier.core.backend import Backend

    _Base = Backend
else:
    _Base = object

Evicted = Callable[[Sequence[tuple[str, int]], Sequence[Buffer]], None]
"""Takes ``(key, nbytes)`` of evicted blobs and one reference to each of them
(:meth:`kvtier.core.backend.Backend._evicted`)."""
CAPABILITIES = Capabilities(
    persistent=False,
    shared=False,
    bounded=True,
    listing=True,
    create_mode=True,
    hands_over_evictions=True,
    verified_reads=True,
)
"""What a backend that keeps its blobs in a :class:`RamStore` can do: its hits are the
very buffers the tier chain checked or sealed before storing them."""
Changed = Callable[[str, Buffer | None], None]
"""Told, under the store's lock, that ``key`` now holds a buffer, or ``None`` when it
left the store (deleted, evicted, overwritten, cleared). Must not block."""
SWEEP_LIMIT = 256
"""Most expired blobs one :meth:`RamStore.sweep` removes."""


class RamStore:
    """Blobs by key within ``capacity`` bytes; thread safe.

    :attr:`blobs` is the mapping itself and :attr:`lock` guards it (with the policy
    and the counters); the lock is never held across a syscall or a callback other
    than ``changed``. Evicted blobs are passed to ``evicted`` after the lock is
    released.
    """

    def __init__(
        self,
        capacity: int,
        policy: EvictionPolicy,
        evicted: Evicted,
        *,
        changed: Changed | None = None,
        ttl: float | None = None,
        pinned_bytes: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.capacity = capacity
        self.pinned_budget = pinned_bytes
        self._pinned: set[str] = set()
        self._pinned_bytes = 0
        self.ttl = ttl
        self._clock = clock
        self._written: OrderedDict[str, float] = OrderedDict()
        """Key -> when it was written, oldest first (kept only with a ``ttl``)."""
        self._born: dict[str, float] = {}
        """Key -> when it was written (always kept: its age)."""
        self._expired = 0
        self.lock = threading.Lock()
        self.blobs: dict[str, Buffer] = {}
        """Key -> the stored buffer (the store holds one reference to each)."""
        self._policy = policy
        self._evicted = evicted
        self._changed = changed
        self._bytes = 0
        self._evictions = 0
        self._rejected = 0
        self._hits = 0
        self._misses = 0

    def _drop(self, key: str) -> Buffer:
        """Forget stored ``key``; returns its buffer, for the caller to release once it
        let go of the lock (a release may unmap memory). Call under the lock."""
        buf = self.blobs.pop(key)
        self._written.pop(key, None)
        self._born.pop(key, None)
        if key in self._pinned:
            self._pinned.discard(key)
            self._pinned_bytes -= buf.nbytes
        self._policy.remove(key)
        self._bytes -= buf.nbytes
        if self._changed is not None:
            self._changed(key, None)
        return buf

    def _expire(self, key: str, now: float, dropped: list[Buffer]) -> bool:
        """Whether stored ``key`` is past its ``ttl``; if so it is dropped into
        ``dropped`` (to release after the lock). Call under the lock."""
        if key in self._pinned or not self._expired_at(key, now):
            return False
        dropped.append(self._drop(key))
        self._expired += 1
        return True

    def sweep(self, limit: int = SWEEP_LIMIT) -> int:
        """Remove up to ``limit`` expired blobs (the oldest); how many went."""
        if self.ttl is None:
            return 0
        dropped: list[Buffer] = []
        with self.lock:
            now = self._clock()
            while self._written and len(dropped) < limit:
                if not self._expire(next(iter(self._written)), now, dropped):
                    break
        for buf in dropped:
            buf.release()
        return len(dropped)

    def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        """A new reference to each stored blob, ``None`` for a miss; counts hits and misses."""
        out: list[Buffer | None] = []
        expired: list[Buffer] = []
        with self.lock:
            now = self._clock()
            for key in keys:
                buf = self.blobs.get(key)
                if buf is not None and self._expire(key, now, expired):
                    buf = None
                if buf is None:
                    self._misses += 1
                    out.append(None)
                else:
                    self._hits += 1
                    self._policy.touch(key)
                    out.append(buf.retain())
        for old in expired:
            old.release()
        return out

    def put_many(self, items: Sequence[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        """Keep each buffer (retained); ``False`` where ``CREATE`` found the key or the
        blob is larger than the capacity (an overwrite keeps the old value then)."""
        results: list[bool] = []
        evicted: list[tuple[str, int]] = []
        handed: list[Buffer] = []  # the store's references to evicted blobs
        replaced: list[Buffer] = []
        self.sweep()
        with self.lock:
            now = self._clock()
            for key, buf in items:
                exists = key in self.blobs and not self._expire(key, now, replaced)
                if exists and mode is PutMode.CREATE:
                    results.append(False)
                    continue
                room = self.capacity - self._pinned_bytes
                if exists and key in self._pinned:
                    room += self.blobs[key].nbytes
                if buf.nbytes > room:  # larger than the capacity, or only pinned to evict
                    self._rejected += 1
                    results.append(False)
                    continue
                buf.retain()
                if exists:
                    replaced.append(self._drop(key))
                while self._bytes + buf.nbytes > self.capacity:
                    victim = self._policy.victim()
                    assert victim is not None, "policy is empty while bytes are in use"
                    handed.append(self._drop(victim))
                    evicted.append((victim, handed[-1].nbytes))
                self.blobs[key] = buf
                self._born[key] = now
                if self.ttl is not None:
                    self._written[key] = now
                self._bytes += buf.nbytes
                self._policy.insert(key)
                if self._changed is not None:
                    self._changed(key, buf)
                results.append(True)
            self._evictions += len(evicted)
        for old in replaced:
            old.release()
        self._evicted(evicted, handed)
        return results

    def contains_many(self, keys: Sequence[str]) -> list[bool]:
        expired: list[Buffer] = []
        with self.lock:
            now = self._clock()
            found = [key in self.blobs and not self._expire(key, now, expired) for key in keys]
        for old in expired:
            old.release()
        return found

    def delete_many(self, keys: Sequence[str]) -> list[bool]:
        """Drop each key; ``True`` where it was stored."""
        with self.lock:
            dropped = [self._drop(key) if key in self.blobs else None for key in keys]
        for buf in dropped:
            if buf is not None:
                buf.release()
        return [buf is not None for buf in dropped]

    def pin_many(self, keys: Sequence[str]) -> list[bool]:
        """Pin each stored key while the pinned bytes stay within ``pinned_bytes``;
        ``True`` where it is pinned now (also if it was already)."""
        out: list[bool] = []
        with self.lock:
            for key in keys:
                buf = self.blobs.get(key)
                if key in self._pinned:
                    out.append(True)
                elif buf is None or self._pinned_bytes + buf.nbytes > self.pinned_budget:
                    out.append(False)
                else:
                    self._pinned.add(key)
                    self._pinned_bytes += buf.nbytes
                    self._policy.remove(key)  # never a victim
                    self._written.pop(key, None)  # never expires
                    out.append(True)
        return out

    def unpin_many(self, keys: Sequence[str]) -> list[bool]:
        """Unpin each key; ``True`` where it was pinned. It is then most recently used,
        and its ``ttl`` starts again."""
        out: list[bool] = []
        with self.lock:
            now = self._clock()
            for key in keys:
                out.append(key in self._pinned)
                if key in self._pinned:
                    self._pinned.discard(key)
                    self._pinned_bytes -= self.blobs[key].nbytes
                    self._policy.insert(key)
                    if self.ttl is not None:
                        self._written[key] = now
        return out

    def ages(self, keys: Sequence[str]) -> list[float | None]:
        """Seconds since each blob was written; ``None`` where it is absent (or put in
        :attr:`blobs` directly), expired or pinned (a pin exempts a blob from ``purge
        --older-than`` as from its ``ttl``)."""
        with self.lock:
            now = self._clock()
            return [
                None
                if key not in self._born or key in self._pinned or self._expired_at(key, now)
                else now - self._born[key]
                for key in keys
            ]

    def _expired_at(self, key: str, now: float) -> bool:
        """Whether stored, unpinned ``key`` is past its ``ttl`` (not removed here)."""
        return self.ttl is not None and now - self._written[key] >= self.ttl

    def keys(self, prefix: str = "") -> list[str]:
        """A snapshot of the stored keys starting with ``prefix``."""
        with self.lock:
            now = self._clock()
            return [
                key
                for key in self.blobs
                if key.startswith(prefix)
                and (key in self._pinned or not self._expired_at(key, now))
            ]

    def stats(self, **details: Any) -> BackendStats:
        """A snapshot; its ``details`` are ``details`` plus the counters ``hits``,
        ``misses`` (of :meth:`get_many`), ``rejected`` (blobs over the capacity) and, with
        a ``ttl``, ``expired``."""
        with self.lock:
            return BackendStats(
                keys=len(self.blobs),
                bytes_used=self._bytes,
                capacity_bytes=self.capacity,
                evictions=self._evictions,
                details={
                    **details,
                    "hits": self._hits,
                    "misses": self._misses,
                    "rejected": self._rejected,
                    **({} if self.ttl is None else {"expired": self._expired}),
                    **({} if not self.pinned_budget else {"pinned_bytes": self._pinned_bytes}),
                },
            )

    def clear(self) -> None:
        """Drop every blob (nothing is evicted or handed over)."""
        with self.lock:
            blobs, self.blobs = self.blobs, {}
            self._written.clear()
            self._born.clear()
            self._pinned.clear()
            self._pinned_bytes = 0
            for key in blobs:
                self._policy.remove(key)
                if self._changed is not None:
                    self._changed(key, None)
            self._bytes = 0
        for buf in blobs.values():
            buf.release()


async def iterate(keys: Iterable[str]) -> AsyncIterator[str]:
    """``keys`` as an async iterator (``iter_keys`` of a backend over a snapshot)."""
    for key in keys:
        yield key


class RamPins(_Base):
    """Pins and ages of a backend whose chunks are its :class:`RamStore` (``cpu``,
    ``nixl``): a mixin placed before :class:`~kvtier.core.backend.Backend`."""

    store: RamStore

    async def pin_many(self, keys: list[str]) -> list[bool]:
        """Pin stored chunks (never evicted nor expired) within ``pinned_bytes``."""
        self._check_open()
        return self.store.pin_many(keys)

    async def unpin_many(self, keys: list[str]) -> list[bool]:
        """Unpin chunks; ``True`` where one was pinned."""
        self._check_open()
        return self.store.unpin_many(keys)

    async def ages(self, keys: list[str]) -> list[float | None]:
        """Seconds since each chunk was written here (``kvtier purge --older-than``);
        ``None`` where absent or pinned."""
        self._check_open()
        return self.store.ages(keys)
