"""The file tier's blocking work: every syscall of its batches, run in the backend's
worker threads (never on the event loop).

A :class:`BatchIO` opens and follows the tier's folder (a deleted or replaced folder:
see :meth:`BatchIO._follow`), and reads, checks, deletes and writes the chunks of one
batch or one group of a batch. ``OSError`` leaves it as :class:`BackendError` (or
:class:`BackendUnavailableError` when the folder is not usable); a write that finds
no space is a ``False`` result.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from typing import TypeVar

from kvtier.backends.file.batches import FolderSync
from kvtier.backends.file.chunkio import (
    NO_SPACE,
    READ_FLAGS,
    Mover,
    create_temp,
    o_direct_works,
    read_all,
    read_at,
    write_all,
)
from kvtier.backends.file.expiry import Expiry
from kvtier.backends.file.folder import TEMP_DIR, Folder, RootState, Tree, new_temp, shard_of
from kvtier.backends.file.index import ChunkIndex, Reservation
from kvtier.backends.file.listing import keys_in, shards
from kvtier.backends.file.options import FileOptions
from kvtier.core.backend import PutMode, Read
from kvtier.core.buffers import Buffer, BufferPool, release_all
from kvtier.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    StoreNotFoundError,
)

Wake = Callable[[], None]
"""Tells the event loop, from a worker thread, that chunks were evicted."""
Item = TypeVar("Item")
Result = TypeVar("Result")


class Stopped(Exception):
    """A group of ranged reads stopped early: nobody awaits it any more."""


def _keep(results: object) -> None:
    """Nothing to release: ranged reads fill the caller's memory."""


class BatchIO:
    """The blocking operations of one file tier on its ``folder`` and ``index``; each
    method runs in a worker thread and calls ``wake`` after it evicted chunks."""

    def __init__(
        self,
        safe_url: str,
        folder: Folder,
        index: ChunkIndex,
        options: FileOptions,
        pool: BufferPool,
        expiry: Expiry | None,
    ) -> None:
        self.safe_url = safe_url
        self.folder = folder
        self.index = index
        self.options = options
        self.pool = pool
        self.expiry = expiry
        self.mover = Mover(fsync=options.fsync)
        self.read_flags = READ_FLAGS | (os.O_DIRECT if options.o_direct else 0)

    def error(self, exc: OSError, action: str) -> BackendError:
        """Translate an ``OSError``: a folder that is not a usable folder means
        unavailable."""
        if not self.folder.usable():
            return BackendUnavailableError(
                f"{self.safe_url}: folder {self.folder.root} is gone or not accessible ({exc})"
            )
        return BackendError(f"{self.safe_url}: {action} failed: {exc}")

    def open(self, wake: Wake) -> None:
        """Open the folder (made if missing, unless read-only), check ``o_direct`` on it
        and index its chunks; the folder is closed again if that fails."""
        try:
            self._open_folder(wake)
        except BaseException:
            self.folder.close()  # opened again by the next open()
            raise

    def _open_folder(self, wake: Wake) -> None:
        root = self.folder.root
        try:
            self.folder.open()
            if self.options.o_direct and not self.options.read_only:
                with self.folder.use() as tree:
                    tmp = tree.dir(TEMP_DIR, create=True)
                    assert tmp is not None
                    if not o_direct_works(tmp, self.pool):
                        raise ConfigError(
                            f"{self.safe_url}: the filesystem of {root} refuses O_DIRECT "
                            "(tmpfs and some network or FUSE filesystems do); set o_direct: "
                            "false for this tier"
                        )
            if self.index.scan():
                wake()
        except (FileNotFoundError, NotADirectoryError) as exc:
            if not self.options.read_only:
                raise BackendUnavailableError(
                    f"{self.safe_url}: cannot open {root}: {exc}"
                ) from exc
            what = "does not exist" if isinstance(exc, FileNotFoundError) else "is not a folder"
            raise StoreNotFoundError(
                f"{self.safe_url}: folder {root} {what}; a read-only tier opens an existing "
                "folder only (check the path)"
            ) from None
        except OSError as exc:
            raise BackendUnavailableError(f"{self.safe_url}: cannot open {root}: {exc}") from exc

    def _follow(self, tree: Tree, wake: Wake, missed: Iterable[str] = ()) -> RootState:
        """Check that ``tree`` still reaches the tier's folder (see :meth:`Folder.check`;
        ``missed``: keys just missed). If the folder was deleted, every key is
        forgotten (reads are misses until a write makes it again); if ``tree`` reaches a
        deleted folder, or another folder took its place, a new tree is opened and the
        folder rescanned: misses are then worth trying again."""
        state = self.folder.check(tree, map(shard_of, missed))
        if state is RootState.GONE:
            self.index.clear()
        elif state is RootState.NEW and self.folder.renew(tree) and self.index.rescan():
            wake()
        return state

    def _recover(self, tree: Tree, wake: Wake) -> None:
        """A write found a folder deleted (the root, ``.tmp`` or a shard): open the
        folder again, made anew if it is gone, and rescan it."""
        if self.folder.renew(tree) and self.index.rescan():
            wake()

    def shards(self, wake: Wake) -> list[str]:
        """The shard folders, listed afresh (the root is followed first: it counts)."""

        def listed() -> list[str]:
            with self.folder.use() as tree:
                self._follow(tree, wake)
            return shards(self.folder)

        return self._listing(listed)

    def keys_in(self, shard: str, prefix: str) -> list[str]:
        """The keys in ``shard`` that start with ``prefix``."""
        return self._listing(partial(keys_in, self.folder, shard, prefix))

    def _listing(self, call: Callable[[], list[str]]) -> list[str]:
        try:
            return call()
        except OSError as exc:
            raise self.error(exc, "listing") from exc

    def contains(self, keys: Sequence[str], wake: Wake) -> list[bool]:
        """Whether each key is stored (and not expired): indexed ones from memory, the
        others looked up on disk and adopted."""
        try:
            with self.folder.use() as tree:
                found = self._contains(keys)
                missed = [k for k, hit in zip(keys, found, strict=True) if not hit]
                state = self._follow(tree, wake, missed)  # hits from memory need it too
            if state is RootState.GONE:
                return [False] * len(keys)
            if state is RootState.NEW:
                found = self._contains(keys)
            if self.expiry is not None:
                with self.folder.use() as tree:
                    fresh = self.expiry.fresh
                    found = [hit and fresh(tree, k) for k, hit in zip(keys, found, strict=True)]
        except OSError as exc:
            raise self.error(exc, "stat") from exc
        return found

    def _contains(self, keys: Sequence[str]) -> list[bool]:
        found = self.index.knows(keys)
        for i, key in enumerate(keys):
            found[i] = found[i] or self.index.probe(key)
        return found

    def delete(self, keys: Sequence[str], wake: Wake) -> list[bool]:
        """Delete each key's file; ``True`` where one was there."""
        try:
            with self.folder.use() as tree:
                deleted = [self.index.delete(key) for key in keys]
                missed = [k for k, done in zip(keys, deleted, strict=True) if not done]
                state = self._follow(tree, wake, missed) if missed else RootState.SAME
            if state is RootState.NEW:
                deleted = [
                    done or self.index.delete(k) for k, done in zip(keys, deleted, strict=True)
                ]
        except OSError as exc:
            raise self.error(exc, "delete") from exc
        return deleted

    def get_group(self, keys: Sequence[str], wake: Wake) -> list[Buffer | None]:
        """Each key's blob in a pool buffer, or ``None``; on an error nothing read is
        kept."""
        return self._each(keys, keys, self._read, wake, release_all)

    def read_group(
        self, reads: Sequence[Read], stop: threading.Event, wake: Wake
    ) -> list[int | None]:
        """Each ``(key, offset, out)`` range of a chunk read into ``out``: the count read,
        or ``None`` for a missing chunk. Once ``stop`` is set the group raises
        :class:`Stopped` before its next read (its caller is gone)."""

        def read(tree: Tree, item: Read) -> int | None:
            if stop.is_set():
                raise Stopped
            return self._read_range(tree, *item)

        return self._each([key for key, _, _ in reads], reads, read, wake, _keep)

    def _each(
        self,
        keys: Sequence[str],
        items: Sequence[Item],
        read: Callable[[Tree, Item], Result | None],
        wake: Wake,
        drop: Callable[[list[Result | None]], None],
    ) -> list[Result | None]:
        """``read(tree, item)`` of each item (of chunk ``key``); ``None`` results are
        misses, read again if the folder turns out to be replaced. On an error ``drop``
        gets what was read."""
        out: list[Result | None] = []
        try:
            with self.folder.use() as tree:
                for item in items:
                    out.append(read(tree, item))
                missed = [k for k, got in zip(keys, out, strict=True) if got is None]
                state = self._follow(tree, wake, missed) if missed else RootState.SAME
            if state is RootState.NEW:  # the folder was replaced: read the misses from the new one
                with self.folder.use() as tree:
                    for i, item in enumerate(items):
                        if out[i] is None:
                            out[i] = read(tree, item)
        except BaseException as exc:
            drop(out)
            if isinstance(exc, OSError):
                raise self.error(exc, "read") from exc
            raise
        return out

    def _opened(self, tree: Tree, key: str, flags: int) -> tuple[int, os.stat_result] | None:
        """``key``'s file opened with ``flags`` and its ``fstat``; ``None`` if it is
        missing or expired."""
        opened = self.folder.open_chunk(tree, key, flags)
        if opened is None:
            self.index.missed(key)
            return None
        fd, st = opened
        if self.expiry is not None and self.expiry.is_expired(key, st):
            os.close(fd)
            self.expiry.drop(key)
            return None
        return opened

    def _touch(self, key: str, fd: int, st: os.stat_result) -> None:
        """``key``'s file was read: its access time (LRU order on restart) and index."""
        if not self.options.read_only:
            with contextlib.suppress(OSError):
                os.utime(fd, ns=(time.time_ns(), st.st_mtime_ns))
        self.index.read(key, fd, st.st_size)

    def _read(self, tree: Tree, key: str) -> Buffer | None:
        opened = self._opened(tree, key, self.read_flags)
        if opened is None:
            return None
        fd, st = opened
        try:
            buf = read_all(fd, st.st_size, self.pool, direct=self.options.o_direct)
            try:
                self._touch(key, fd, st)
            except BaseException:
                buf.release()
                raise
        finally:
            os.close(fd)
        return buf

    def _read_range(self, tree: Tree, key: str, offset: int, out: memoryview) -> int | None:
        # Never O_DIRECT: a range's offset, length and ``out`` need not be aligned to
        # pages, and a bounce buffer would cost the copy a ranged read saves.
        opened = self._opened(tree, key, READ_FLAGS)
        if opened is None:
            return None
        fd, st = opened
        try:
            done = read_at(fd, out, offset, min(out.nbytes, st.st_size - offset))
            self._touch(key, fd, st)
        finally:
            os.close(fd)
        return done

    def put_group(
        self,
        items: Sequence[tuple[str, Buffer]],
        mode: PutMode,
        stop: threading.Event,
        sync: FolderSync | None,
        wake: Wake,
    ) -> list[bool]:
        """Store each blob under its key (``False``: no room, present under ``CREATE``,
        or skipped once ``stop`` is set), then release the buffers; with ``sync``, the
        last group of a batch to finish fsyncs the folders it wrote to."""
        stored: list[bool] = []
        try:
            try:
                for key, buf in items:
                    stored.append(not stop.is_set() and self._put(key, buf, mode, wake))
            finally:
                release_all(buf for _, buf in items)
                placed = zip(items, stored, strict=False)
                folders = {shard_of(k) for (k, _), ok in placed if ok}
                last = sync.group_done(folders) if sync is not None else []
            if last:  # after the renames: one journal commit covers them
                with self.folder.use() as tree:
                    for name in last:
                        fd = tree.dir(name)
                        if fd is not None:
                            os.fsync(fd)
        except OSError as exc:
            raise self.error(exc, "write") from exc
        return stored

    def _put(self, key: str, buf: Buffer, mode: PutMode, wake: Wake) -> bool:
        if self.index.rescan_if_due():
            wake()
        if mode is PutMode.CREATE and self.index.knows([key])[0] and self.index.probe(key):
            return False
        room, evicted = self.index.make_room(buf.nbytes)
        if evicted:
            wake()
        if room is None:
            return False
        try:
            return self._write(key, buf, room, mode is PutMode.CREATE, wake)
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            self.index.count("rejected_no_space")
            return False
        finally:
            self.index.release(room)

    def _write(self, key: str, buf: Buffer, room: Reservation, create: bool, wake: Wake) -> bool:
        """Write ``buf`` to ``key``'s file (see :meth:`_write_in`). If a folder was
        deleted meanwhile (the whole tier folder, ``.tmp`` or the key's shard), the
        folder is opened again, made anew where needed, and the write done once more."""
        with self.folder.use() as tree:
            try:
                return self._write_in(tree, key, buf, room, create)
            except FileNotFoundError:
                pass
        self._recover(tree, wake)
        with self.folder.use() as tree:
            return self._write_in(tree, key, buf, room, create)

    def _write_in(self, tree: Tree, key: str, buf: Buffer, room: Reservation, create: bool) -> bool:
        """Write ``buf`` to a temp file and move it to ``key``'s file; ``False`` if
        ``create`` found the key present. The temp file never outlives the call. With
        ``fsync`` the data is synced before the rename; the batch syncs the folders."""
        direct = self.options.o_direct
        tmp = tree.dir(TEMP_DIR, create=True)
        assert tmp is not None  # made if missing
        temp = new_temp()
        fd = create_temp(tmp, temp, direct=direct)
        try:
            write_all(fd, buf, self.pool, direct=direct)
            now = time.time_ns()
            os.utime(fd, ns=(now, now))  # exact times order LRU on restart
            if self.options.fsync:
                os.fsync(fd)
            move = partial(self.mover.place, tree, tmp, temp, key, create=create)
            placed = self.index.place(key, room, move)
            if not placed:
                os.unlink(temp, dir_fd=tmp)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=tmp)
            raise
        finally:
            os.close(fd)  # releases the temp file's lock, after the rename
        if not placed:  # another process stored the key: count its file
            self.index.probe(key)
        return placed
