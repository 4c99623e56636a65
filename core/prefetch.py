"""Prefetch bookkeeping: the chunks being promoted ahead of the load that will want
them, and the byte budget they hold.

A lookup asked with ``prefetch`` (:meth:`TierChain.lookup_by_tier`) starts reading the
leading chunks it found only in slower tiers, in the background, and writes them into
the faster tiers that promote (:meth:`TierChain.prefetch`). This module only keeps the
books: no I/O happens here.

Each chunk holds ``chunk_bytes`` (its unencoded size, what it takes in a raw ``cpu``
tier) of the ``budget`` from the moment its read is started until its writes are done.
A chunk already in flight is not started again; chunks that do not fit the budget are
not prefetched (counted as dropped) and are read by the load as usual. At most
:data:`READERS` prefetches read from one tier at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

READERS = 2
"""Prefetches reading from one tier at once; the others wait their turn, in lookup
order, so that of a burst of lookups the first get their chunks first (as the loads
would, two at a time) rather than all of them at the end."""


@dataclass
class PrefetchStats:
    """Counters of the prefetches since the chain was opened."""

    started: int = 0
    """Chunks whose prefetch was started."""
    read_bytes: int = 0
    """Encoded bytes the prefetches read from slower tiers (valid blobs only)."""
    dropped: int = 0
    """Chunks a lookup would have prefetched, left to the load: the budget was full."""
    joined: int = 0
    """Chunks a load found in flight and waited for instead of reading them again."""


class Prefetches:
    """Chunks in flight and the budget, owned by the chain's I/O loop."""

    def __init__(self, budget: int = 0, chunk_bytes: int = 0) -> None:
        self.budget = budget
        """Bytes of chunks in flight at most (``0``: prefetch is off)."""
        self.chunk_bytes = chunk_bytes
        """What one chunk holds of the budget."""
        self.stats = PrefetchStats()
        self._tasks: dict[str, asyncio.Future[None]] = {}
        self._turns: dict[int, asyncio.Semaphore] = {}

    @property
    def in_flight_bytes(self) -> int:
        """The budget held now: every chunk tracked and not done."""
        return len(self._tasks) * self.chunk_bytes

    def turn(self, tier: int) -> asyncio.Semaphore:
        """Held by a prefetch while it reads from tier ``tier`` (:data:`READERS`)."""
        return self._turns.setdefault(tier, asyncio.Semaphore(READERS))

    def admit(self, keys: Sequence[str]) -> list[int]:
        """The indexes of the ``keys`` to start now: those not in flight already, in
        order, while the budget lasts (they hold it once :meth:`track` ed, which the
        caller does before anything else can admit); the others not in flight are
        counted as dropped."""
        if self.budget <= 0:
            return []
        admitted: list[int] = []
        for i, key in enumerate(keys):
            if key in self._tasks:
                continue
            if self.in_flight_bytes + (len(admitted) + 1) * self.chunk_bytes > self.budget:
                self.stats.dropped += sum(1 for k in keys[i:] if k not in self._tasks)
                break
            admitted.append(i)
        self.stats.started += len(admitted)
        return admitted

    def track(self, keys: Sequence[str], task: asyncio.Future[None]) -> None:
        """``task`` prefetches ``keys`` (admitted); :meth:`done` when it ends."""
        for key in keys:
            self._tasks[key] = task

    def done(self, keys: Sequence[str]) -> None:
        """The prefetch of ``keys`` ended (written, or failed): free their budget."""
        for key in keys:
            self._tasks.pop(key, None)

    async def settled(self, keys: Sequence[str]) -> None:
        """Wait until no prefetch of ``keys`` is in flight (so that a load reads them
        from the tier they were promoted into, not once more from the slow tier)."""
        found = [task for key in keys if (task := self._tasks.get(key)) is not None]
        if found:
            self.stats.joined += len(found)
            await asyncio.wait(set(found))
