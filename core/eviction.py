"""Eviction policies for bounded tiers, and the built-in ``lru`` and ``lfu`` plugins.

A policy only orders keys; the backend owns the data and the byte accounting. Bounded
backends ask :meth:`EvictionPolicy.victim` for the next key to drop until a new blob
fits. Policies are not thread safe: backends call them under their own lock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable

from kvtier.core.hookspecs import hookimpl
from kvtier.core.specs import EvictionPolicySpec


class EvictionPolicy(ABC):
    """Tracks the keys of one bounded store and picks eviction victims."""

    @abstractmethod
    def insert(self, key: str) -> None:
        """A key was stored (or overwritten)."""

    @abstractmethod
    def touch(self, key: str) -> None:
        """A stored key was read; unknown keys are ignored."""

    @abstractmethod
    def remove(self, key: str) -> None:
        """A key left the store; unknown keys are ignored."""

    @abstractmethod
    def victim(self) -> str | None:
        """The key to evict next (it stays tracked until :meth:`remove`); ``None`` if empty."""

    @abstractmethod
    def __len__(self) -> int: ...


class LRUPolicy(EvictionPolicy):
    """Least recently used first."""

    def __init__(self) -> None:
        self._order: OrderedDict[str, None] = OrderedDict()

    def insert(self, key: str) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def touch(self, key: str) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def remove(self, key: str) -> None:
        self._order.pop(key, None)

    def victim(self) -> str | None:
        return next(iter(self._order), None)

    def __len__(self) -> int:
        return len(self._order)


class LFUPolicy(EvictionPolicy):
    """Least frequently used first, least recently used among equals; O(1) per call.

    Counts start at 1 on insert and saturate at ``max_count`` so that a key that was
    hot long ago cannot stay forever.
    """

    def __init__(self, max_count: int = 255) -> None:
        self.max_count = max_count
        self._count: dict[str, int] = {}
        self._buckets: dict[int, OrderedDict[str, None]] = {}
        self._min = 0

    def _place(self, key: str, count: int) -> None:
        self._count[key] = count
        self._buckets.setdefault(count, OrderedDict())[key] = None

    def _unplace(self, key: str) -> int:
        count = self._count.pop(key)
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]
        return count

    def insert(self, key: str) -> None:
        if key in self._count:
            self.touch(key)
            return
        self._place(key, 1)
        self._min = 1

    def touch(self, key: str) -> None:
        if key not in self._count:
            return
        count = self._unplace(key)
        self._place(key, min(count + 1, self.max_count))
        if count == self._min and count not in self._buckets:
            self._min = min(self._buckets)

    def remove(self, key: str) -> None:
        if key not in self._count:
            return
        self._unplace(key)
        self._min = min(self._buckets) if self._buckets else 0

    def victim(self) -> str | None:
        if not self._count:
            return None
        return next(iter(self._buckets[self._min]))

    def __len__(self) -> int:
        return len(self._count)


@hookimpl
def kvtier_eviction_policies() -> Iterable[EvictionPolicySpec]:
    return [
        EvictionPolicySpec(name="lru", cls=LRUPolicy, description="least recently used"),
        EvictionPolicySpec(
            name="lfu", cls=LFUPolicy, description="least frequently used, LRU among equals"
        ),
    ]
