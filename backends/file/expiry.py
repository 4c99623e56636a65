"""TTL of the ``file`` tier (``options: {ttl: SECONDS}``).

A chunk file's modification time is when it was written (a hit sets only its access
time), so a chunk is expired once ``ttl`` seconds passed since then, whichever process
wrote it. An expired chunk is a miss for ``get_many`` and ``contains_many`` and is
removed when met; :meth:`Expiry.sweep` removes those of a few shard folders at a
time, so that a whole pass over the folder takes about ``ttl``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time

from kvtier.backends.file.folder import Folder, Tree, shard_of
from kvtier.backends.file.index import ChunkIndex
from kvtier.backends.file.listing import keys_in, shards

log = logging.getLogger(__name__)


def stat_chunk(tree: Tree, key: str) -> os.stat_result | None:
    """The ``stat`` of ``key``'s file (not following a link); ``None`` if it is absent."""
    shard = tree.dir(shard_of(key))
    if shard is None:
        return None
    try:
        return os.stat(key, dir_fd=shard, follow_symlinks=False)
    except FileNotFoundError:
        return None


def ages(folder: Folder, keys: list[str]) -> list[float | None]:
    """Seconds since each chunk was written (its file's modification time); ``None``
    where it is absent."""
    now = time.time_ns()
    with folder.use() as tree:
        stats = [stat_chunk(tree, key) for key in keys]
    return [None if st is None else (now - st.st_mtime_ns) / 1e9 for st in stats]


class Expiry:
    """Which chunks are expired, and their removal (blocking: worker threads only)."""

    def __init__(self, ttl: float, folder: Folder, index: ChunkIndex) -> None:
        self.ttl = ttl
        self.folder = folder
        self.index = index
        self.expired = 0
        """Chunks removed because they expired."""
        self._lock = threading.Lock()
        self._next_shard = 0

    @property
    def period(self) -> float:
        """Seconds between two sweeps."""
        return min(max(self.ttl / 4, 0.05), 60.0)

    def is_expired(self, key: str, st: os.stat_result) -> bool:
        """Whether ``key``'s file (``st``) is past the ``ttl`` (a pinned chunk never is)."""
        if time.time_ns() - st.st_mtime_ns < self.ttl * 1e9:
            return False
        return not self.index.is_pinned(key)

    def drop(self, key: str) -> None:
        """Remove expired ``key`` (nothing in a read-only folder) and count it."""
        if self.folder.writable and self.index.delete(key):
            with self._lock:
                self.expired += 1

    def fresh(self, tree: Tree, key: str) -> bool:
        """Whether ``key``'s file is there and not expired (an expired one is dropped)."""
        st = stat_chunk(tree, key)
        if st is None:
            return False
        if self.is_expired(key, st):
            self.drop(key)
            return False
        return True

    def sweep(self) -> int:
        """Check the files of the next few shard folders (enough for one pass over the
        folder per ``ttl``) and remove the expired ones; how many went."""
        names = shards(self.folder)
        if not names:
            return 0
        before = self.expired
        count = max(1, math.ceil(len(names) * self.period / self.ttl))
        for _ in range(min(count, len(names))):
            shard = names[self._next_shard % len(names)]
            self._next_shard += 1
            keys = keys_in(self.folder, shard, "")
            with self.folder.use() as tree:
                for key in keys:
                    self.fresh(tree, key)
        return self.expired - before
