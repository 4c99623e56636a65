"""What one process knows of the tier's folder: each chunk's size, the eviction order,
the bytes used and reserved, and the rescans that keep capacity across processes.

Locking, so that no thread waits for a lock held across a syscall unless it does
file I/O itself:

* :attr:`ChunkIndex.lock` guards the index and is never held across a syscall; the
  event loop takes it (``stats``, the sizes of a batch to read, evictions to report).
* A key lock (:class:`KeyLocks`) serialises the syscalls that create, remove or look
  at one key's file with the index change that matches them, so the index and the
  folder change together. Only worker threads take key locks, one at a time, and
  take :attr:`ChunkIndex.lock` inside one, never the reverse.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

from kvtier.backends.file.folder import Folder
from kvtier.backends.file.listing import remove_stale_temps, walk
from kvtier.core.eviction import EvictionPolicy

Evicted = list[tuple[str, int]]
"""``(key, nbytes)`` of evicted chunks, in eviction order."""
COUNTERS = (
    "foreign_files",
    "stale_temps_removed",
    "adopted",
    "vanished",
    "rescans",
    "rejected_no_space",
    "odd_entries_removed",
)
"""The counters :meth:`ChunkIndex.snapshot` reports."""


class Reservation:
    """Room held for one write: released by :meth:`ChunkIndex.release`, or turned into
    the stored chunk's bytes by :meth:`ChunkIndex.place` in the same step, so that the
    room is never counted twice (as used and as reserved)."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


class KeyLocks:
    """One lock per key in use, made on demand and dropped when nobody holds it."""

    def __init__(self) -> None:
        self._mutex = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}

    @contextmanager
    def __call__(self, key: str) -> Iterator[None]:
        with self._mutex:
            entry = self._locks.get(key)
            if entry is None:
                entry = self._locks[key] = (threading.Lock(), [0])
            lock, users = entry
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._mutex:
                users[0] -= 1
                if not users[0]:
                    del self._locks[key]


class ChunkIndex:
    """The chunks of ``folder`` this process knows, bounded by ``capacity`` bytes.

    Its methods that touch the folder are blocking (worker threads only); the others
    only take :attr:`lock`. Over a read-only folder it never evicts (the folder may
    hold more than ``capacity``).
    """

    def __init__(
        self, folder: Folder, capacity: int, policy: EvictionPolicy, rescan_interval: float
    ) -> None:
        self.folder = folder
        self.capacity = capacity
        self._trims = folder.writable
        self.lock = threading.Lock()
        self.key_lock = KeyLocks()
        self._room = threading.Condition(self.lock)
        """Notified when reservations end."""
        self._policy = policy
        self._rescan_interval = rescan_interval
        self._rescan_due = math.inf
        """``time.monotonic()`` from which the next write rescans; ``inf``: none due."""
        self._sizes: dict[str, int] = {}
        self._used = 0
        self._reserved = 0
        self._evictions = 0
        self._evicted: Evicted = []
        """Evicted and not yet taken by :meth:`take_evicted`, in eviction order."""
        self._counts: Counter[str] = Counter()
        self.pinned_budget = 0
        """Bytes :meth:`pin` may pin (the tier's ``pinned_bytes``)."""
        self._pinned: dict[str, int] = {}
        """Pinned key -> its size; pinned keys are not in the eviction policy."""
        self._pinned_bytes = 0

    # -- reading the index (any thread) ------------------------------------------------

    def knows(self, keys: Sequence[str]) -> list[bool]:
        with self.lock:
            return [key in self._sizes for key in keys]

    def sizes(self, keys: Sequence[str]) -> list[int | None]:
        """The size of each key's chunk; ``None`` where the key is unknown."""
        with self.lock:
            return [self._sizes.get(key) for key in keys]

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self._counts[name] += n

    def take_evicted(self) -> Evicted:
        """The chunks evicted since the last call, in eviction order."""
        with self.lock:
            evicted, self._evicted = self._evicted, []
            return evicted

    def is_pinned(self, key: str) -> bool:
        with self.lock:
            return key in self._pinned

    @property
    def pinned_bytes(self) -> int:
        with self.lock:
            return self._pinned_bytes

    def pin(self, keys: Sequence[str]) -> list[bool]:
        """Pin each known key while the pinned bytes stay within :attr:`pinned_budget`:
        it is then never evicted (nor expired); ``True`` where it is pinned now."""
        out = []
        with self.lock:
            for key in keys:
                nbytes = self._sizes.get(key)
                if key in self._pinned:
                    out.append(True)
                elif nbytes is None or self._pinned_bytes + nbytes > self.pinned_budget:
                    out.append(False)
                else:
                    self._pinned[key] = nbytes
                    self._pinned_bytes += nbytes
                    self._policy.remove(key)
                    out.append(True)
        return out

    def unpin(self, keys: Sequence[str]) -> list[bool]:
        """Unpin each key; ``True`` where it was pinned. It is then most recently used."""
        out = []
        with self.lock:
            for key in keys:
                nbytes = self._pinned.pop(key, None)
                out.append(nbytes is not None)
                if nbytes is not None:
                    self._pinned_bytes -= nbytes
                    if key in self._sizes:
                        self._policy.insert(key)
        return out

    def snapshot(self) -> tuple[int, int, int, int, dict[str, int]]:
        """``(keys, bytes used, bytes reserved, evictions, counters)``."""
        with self.lock:
            counts = {name: self._counts[name] for name in COUNTERS}
            counts["odd_entries_removed"] = self.folder.odd_removed()
            return len(self._sizes), self._used, self._reserved, self._evictions, counts

    # -- keeping it in step with the folder (worker threads) ---------------------------

    def place(self, key: str, room: Reservation, move: Callable[[], bool]) -> bool:
        """Run ``move()`` (which puts ``key``'s file in place) under the key's lock and,
        if it returns ``True``, record the key with the reserved room's size and end
        the reservation in the same step."""
        with self.key_lock(key):
            placed = move()
            if placed:
                with self._room:
                    self._remember(key, room.nbytes)
                    self._end(room)
        return placed

    def probe(self, key: str) -> bool:
        """Whether ``key``'s file exists; adopts or drops the key to match."""
        with self.key_lock(key):
            st = self.folder.stat(key)
            with self.lock:
                if st is None:
                    self._lost(key)
                else:
                    self._found(key, st.st_size)
            return st is not None

    def read(self, key: str, fd: int, nbytes: int) -> None:
        """``key``'s file (open as ``fd``, ``nbytes`` long) was read: touch or adopt the
        key, unless the file was deleted or replaced meanwhile."""
        with self.key_lock(key):
            if os.fstat(fd).st_nlink:
                with self.lock:
                    self._found(key, nbytes)

    def missed(self, key: str) -> None:
        """``key``'s file was not there: drop the key if another process deleted it."""
        with self.lock:
            if key not in self._sizes:
                return
        with self.key_lock(key):
            if self.folder.stat(key) is None:
                with self.lock:
                    self._lost(key)

    def delete(self, key: str) -> bool:
        """Remove ``key``'s file and forget the key; ``False`` if there was no file."""
        with self.key_lock(key):
            with self.lock:
                self._forget(key)
            return self.folder.unlink(key)

    def make_room(self, nbytes: int) -> tuple[Reservation | None, int]:
        """Evict until ``nbytes`` more fit, then reserve them; return the reservation
        (``None`` if they can never fit; :meth:`release` it unless :meth:`place` used
        it) and how many chunks were evicted (see :meth:`take_evicted`). Waits while
        the writes of other threads hold the room it needs."""
        evicted = 0
        while True:
            with self._room:
                victim = self._reserve_or_pick(nbytes)
            if isinstance(victim, bool):
                return (Reservation(nbytes) if victim else None), evicted
            with self.key_lock(victim):
                with self.lock:
                    if victim not in self._sizes:  # deleted or evicted meanwhile
                        continue
                    self._evicted.append((victim, self._forget(victim)))
                    self._evictions += 1
                self.folder.unlink(victim)
            evicted += 1

    def _reserve_or_pick(self, nbytes: int) -> bool | str:
        """Under the lock: ``True`` once ``nbytes`` are reserved, ``False`` if they can
        never fit, else the key to evict next."""
        while True:
            if nbytes > self.capacity:
                return False
            if self._used + self._reserved + nbytes <= self.capacity:
                self._reserved += nbytes
                return True
            victim = self._policy.victim() if self._reserved + nbytes <= self.capacity else None
            if victim is not None:
                return victim
            if not self._reserved:
                return False
            self._room.wait()  # writes in flight hold the room; one of them ends soon

    def release(self, room: Reservation) -> None:
        """End the reservation if :meth:`place` did not (a no-op if it did)."""
        with self._room:
            self._end(room)

    def _end(self, room: Reservation) -> None:
        """Under the lock: give the room back and wake the writes waiting for room."""
        if room.nbytes:
            self._reserved -= room.nbytes
            room.nbytes = 0
            self._room.notify_all()

    # -- scans -------------------------------------------------------------------------

    def scan(self) -> int:
        """Index the folder at open: remove dead writers' temp files, index every chunk
        file (least recently used first), trim to capacity; return how many chunks were
        evicted."""
        removed, foreign = remove_stale_temps(self.folder)
        found = walk(self.folder, set())
        with self.lock:
            self._counts["stale_temps_removed"] += removed
            self._counts["foreign_files"] += foreign + found.foreign
            for _, key, nbytes in found.new:
                self._remember(key, nbytes)
        evicted = self._trim()
        self._schedule_rescan()
        return evicted

    def rescan_if_due(self) -> int:
        """Rescan if ``rescan_interval`` passed since the last one ended; one thread
        rescans, the others go on meanwhile. Cheap when none is due. Returns how many
        chunks were evicted."""
        now = time.monotonic()
        with self.lock:
            if now < self._rescan_due:
                return 0
            self._rescan_due = math.inf
        return self.rescan()

    def rescan(self) -> int:
        """Rescan now; return how many chunks were evicted. Also how the index follows
        a folder that was recreated or replaced."""
        with self.lock:
            known = set(self._sizes)
            self._counts["rescans"] += 1
        try:
            return self._rescan(known)
        finally:
            self._schedule_rescan()

    def _rescan(self, known: set[str]) -> int:
        """Match the index to the folder: adopt the chunks other processes wrote, forget
        those they deleted, then evict down to capacity.

        The walk holds no lock, so each difference it finds is checked again with
        :meth:`probe`, under the key's lock."""
        found = walk(self.folder, known)
        for _, key, _ in found.new:
            self.probe(key)
        for key in known - found.seen:
            self.probe(key)
        return self._trim()

    def _trim(self) -> int:
        """Evict down to capacity (never in a read-only folder); how many were evicted."""
        return self.make_room(0)[1] if self._trims else 0

    def clear(self) -> None:
        """The folder is gone: forget every key (each counts as vanished)."""
        with self.lock:
            for key in list(self._sizes):
                self._lost(key)

    def _schedule_rescan(self) -> None:
        """Make the next rescan due ``rescan_interval`` from now (never if it is 0)."""
        interval = self._rescan_interval
        due = time.monotonic() + interval if interval else math.inf
        with self.lock:
            self._rescan_due = due

    # -- the fields, changed under self.lock -------------------------------------------

    def _remember(self, key: str, nbytes: int) -> None:
        self._used += nbytes - self._sizes.get(key, 0)
        self._sizes[key] = nbytes
        if key in self._pinned:  # rewritten while pinned: stays pinned, at its new size
            self._pinned_bytes += nbytes - self._pinned[key]
            self._pinned[key] = nbytes
        else:
            self._policy.insert(key)

    def _forget(self, key: str) -> int:
        nbytes = self._sizes.pop(key, 0)
        self._used -= nbytes
        self._policy.remove(key)
        self._pinned_bytes -= self._pinned.pop(key, 0)
        return nbytes

    def _found(self, key: str, nbytes: int) -> None:
        """``key``'s file is there: touch the key, or adopt it if unknown or resized."""
        if self._sizes.get(key) == nbytes:
            self._policy.touch(key)
            return
        if key not in self._sizes:
            self._counts["adopted"] += 1
        self._remember(key, nbytes)

    def _lost(self, key: str) -> None:
        """``key``'s file is missing: another process deleted it."""
        if key in self._sizes:
            self._forget(key)
            self._counts["vanished"] += 1
