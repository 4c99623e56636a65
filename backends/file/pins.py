"""Pins and ages of the ``file`` tier (a mixin of its backend).

Pins are this process's: its :class:`~kvtier.backends.file.index.ChunkIndex` never
evicts nor expires a pinned chunk, within ``pinned_bytes``; other processes sharing
the folder do not know them. A chunk's age is its file's modification time (any
process's writes); unpinning sets it to now, so the chunk's ``ttl`` starts again.
"""

from __future__ import annotations

import contextlib
import os
from functools import partial
from typing import TYPE_CHECKING

from kvtier.backends.file.batchio import BatchIO
from kvtier.backends.file.expiry import Expiry, ages
from kvtier.backends.file.folder import Folder, shard_of
from kvtier.backends.file.index import ChunkIndex
from kvtier.backends.file.options import FileOptions

if TYPE_CHECKING:
    from kvtier.core.backend import Backend

    _Base = Backend
else:
    _Base = object


class FilePins(_Base):
    """``ages``, ``pin_many`` and ``unpin_many`` of
    :class:`~kvtier.backends.file.backend.FileBackend`."""

    folder: Folder
    index: ChunkIndex
    options: FileOptions
    io: BatchIO
    _expiry: Expiry | None

    async def ages(self, keys: list[str]) -> list[float | None]:
        """Seconds since each chunk was written (for ``kvtier purge --older-than``),
        ``None`` where absent or pinned by this process."""
        self._check_open()
        try:
            found = await self._blocking(partial(ages, self.folder, keys))
        except OSError as exc:
            raise self.io.error(exc, "stat") from exc
        pinned = self.index.is_pinned
        return [None if pinned(key) else age for key, age in zip(keys, found, strict=True)]

    async def pin_many(self, keys: list[str]) -> list[bool]:
        """Pin stored chunks within ``pinned_bytes``: this process never evicts nor
        expires them (other processes sharing the folder do not know the pins)."""
        self._check_open()
        try:
            return await self._blocking(partial(self._pin_batch, keys))
        except OSError as exc:
            raise self.io.error(exc, "stat") from exc

    def _pin_batch(self, keys: list[str]) -> list[bool]:
        for key, known in zip(keys, self.index.knows(keys), strict=True):
            if not known:
                self.index.probe(key)  # written by another process: adopt it
        return self.index.pin(keys)

    async def unpin_many(self, keys: list[str]) -> list[bool]:
        """Unpin chunks; ``True`` where one was pinned. It is then most recently used,
        and its ``ttl`` starts again."""
        self._check_open()
        done = self.index.unpin(keys)
        if self._expiry is not None and not self.options.read_only:
            again = [key for key, was in zip(keys, done, strict=True) if was]
            try:
                await self._blocking(partial(self._restart_ttl, again))
            except OSError as exc:
                raise self.io.error(exc, "utime") from exc
        return done

    def _restart_ttl(self, keys: list[str]) -> None:
        """Set the files' modification time to now (their ``ttl`` starts again)."""
        with self.folder.use() as tree:
            for key in keys:
                shard = tree.dir(shard_of(key))
                if shard is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.utime(key, dir_fd=shard, follow_symlinks=False)
