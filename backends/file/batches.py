"""How the ``file`` tier cuts a batch over its worker threads, and the bookkeeping
shared by the groups of one batch."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")
GROUP_BYTES = 1 << 20
"""Bytes a thread moves at least of a batch: for less, handing work to another thread
costs more than it saves."""


def runs(items: Sequence[T], count: int) -> list[Sequence[T]]:
    """``items`` cut into at most ``count`` runs of nearly equal length, in order."""
    n = min(count, len(items))
    return [items[i * len(items) // n : (i + 1) * len(items) // n] for i in range(n)]


def flat(groups: Iterable[Sequence[T]]) -> list[T]:
    return [item for group in groups for item in group]


class FolderSync:
    """Collects the folders the groups of one ``fsync`` batch placed files in; the group
    that ends last syncs them (once each, after every rename of the batch)."""

    def __init__(self, groups: int) -> None:
        self._lock = threading.Lock()
        self._left = groups
        self._folders: set[str] = set()

    def group_done(self, folders: Iterable[str]) -> list[str]:
        """Record a group's folders; all folders to sync if it was the last group."""
        with self._lock:
            self._folders.update(folders)
            self._left -= 1
            return sorted(self._folders) if not self._left else []
