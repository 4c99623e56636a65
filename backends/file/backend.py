"""The ``file`` tier's backend: each batch spread over the tier's worker threads.

The event loop only hands work to the threads and reads the index under its lock,
which is never held across a syscall (see :mod:`kvtier.backends.file.index`); every
syscall runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from functools import partial
from typing import Any, TypeVar

from kvtier.backends.file.batches import GROUP_BYTES, FolderSync, flat, runs
from kvtier.backends.file.chunkio import (
    NO_SPACE,
    READ_FLAGS,
    Mover,
    create_temp,
    o_direct_works,
    read_all,
    write_all,
)
from kvtier.backends.file.expiry import Expiry
from kvtier.backends.file.folder import TEMP_DIR, Folder, RootState, Tree, new_temp, shard_of
from kvtier.backends.file.index import ChunkIndex, Reservation
from kvtier.backends.file.listing import keys_in, shards
from kvtier.backends.file.options import FileOptions, root_from_url
from kvtier.backends.file.pins import FilePins
from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import Buffer, release_all
from kvtier.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    StoreNotFoundError,
)
from kvtier.core.pins import check_budget

log = logging.getLogger(__name__)
T = TypeVar("T")
Wake = Callable[[], None]
"""Tells the event loop, from a worker thread, that chunks were evicted."""


class FileBackend(FilePins, Backend):
    """A bounded, persistent, shareable byte store with one file per chunk."""

    capabilities = Capabilities(
        persistent=True, shared=True, bounded=True, listing=True, create_mode=True
    )
    options: FileOptions
    options_model = FileOptions

    def _configure(self) -> None:
        assert self.capacity is not None  # bounded: checked by Backend
        self.folder = Folder(root_from_url(self.url), writable=not self.options.read_only)
        policy = self.registry.eviction_policy(self.options.eviction).load()()
        self.index = ChunkIndex(self.folder, self.capacity, policy, self.options.rescan_interval)
        check_budget(self.safe_url, self.options.pinned_bytes, self.capacity)
        self.index.pinned_budget = self.options.pinned_bytes
        self._mover = Mover(fsync=self.options.fsync)
        self._read_flags = READ_FLAGS | (os.O_DIRECT if self.options.o_direct else 0)
        self._indexed = False
        ttl = self.options.ttl
        self._expiry = None if ttl is None else Expiry(ttl, self.folder, self.index)
        self._sweeper: asyncio.Task[None] | None = None

    # -- the hooks (on the event loop) -------------------------------------------------

    async def _open(self) -> None:
        if self._indexed:
            return
        self._start_workers(self.options.threads)
        await self._blocking(partial(self._open_sync, self._waker()))
        self._indexed = True
        if self._expiry is not None and not self.options.read_only:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        assert self._expiry is not None
        while True:
            await asyncio.sleep(self._expiry.period)
            try:
                await self._blocking(self._expiry.sweep)
            except OSError as exc:
                log.warning("%s: sweeping expired chunks failed: %s", self.safe_url, exc)

    async def _close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        await asyncio.to_thread(self.folder.close)  # the event loop makes no syscall

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        groups = self._groups(keys, self.index.sizes(keys))
        wake = self._waker()
        calls = [partial(self._get_group, group, wake) for group in groups]
        return flat(await self._pool().run_all(calls, orphan=release_all))

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        self._check_writable("put_many")
        pool, wake = self._pool(), self._waker()
        groups = self._groups(items, [buf.nbytes for _, buf in items])
        sync = FolderSync(len(groups)) if self.options.fsync else None
        stop = threading.Event()
        # Retained so that a caller releasing them after a cancel cannot recycle memory
        # a thread still writes from; each group releases its own. Nothing awaits
        # between here and run_all's submissions.
        for _, buf in items:
            buf.retain()
        calls = [partial(self._put_group, group, mode, stop, sync, wake) for group in groups]
        try:
            results = await pool.run_all(calls)
        except asyncio.CancelledError:
            stop.set()  # the groups skip the keys they have not started
            raise
        return flat(results)

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        return await self._blocking(partial(self._contains_batch, keys, self._waker()))

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        self._check_writable("delete_many")
        return await self._blocking(partial(self._delete_batch, keys, self._waker()))

    async def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        folders = partial(self._listing, partial(self._shards, self._waker()))
        for shard in await self._blocking(folders):
            listing = partial(self._listing, partial(keys_in, self.folder, shard, prefix))
            for key in await self._blocking(listing):
                yield key

    async def _stats(self) -> BackendStats:
        keys, used, reserved, evictions, counts = self.index.snapshot()
        details: dict[str, Any] = {
            "root": self.folder.root,
            "o_direct": self.options.o_direct,
            "fsync": self.options.fsync,
            "threads": self.options.threads,
            "read_only": self.options.read_only,
            "reserved_bytes": reserved,
            **counts,
        }
        if self._expiry is not None:
            details["expired"] = self._expiry.expired
        if self.options.pinned_bytes:
            details["pinned_bytes"] = self.index.pinned_bytes
        return BackendStats(
            keys=keys,
            bytes_used=used,
            capacity_bytes=self.index.capacity,
            evictions=evictions,
            details=details,
        )

    # -- plumbing ----------------------------------------------------------------------

    def _groups(self, items: Sequence[T], sizes: Sequence[int | None]) -> list[Sequence[T]]:
        """A batch of blobs of ``sizes`` (``None``: unknown) cut into one run per thread,
        fewer where a thread would move less than :data:`GROUP_BYTES`."""
        nbytes = sum(GROUP_BYTES if size is None else size for size in sizes)
        return runs(items, max(1, min(self.options.threads, nbytes // GROUP_BYTES)))

    def _pool(self) -> BlockingPool:
        """The workers, for a batch spread over them."""
        self._check_open()
        if self.workers is None:
            raise BackendUnavailableError(f"{self.safe_url}: not open; await backend.open() first")
        return self.workers

    def _check_writable(self, what: str) -> None:
        if self.options.read_only:
            raise ConfigError(
                f"{self.safe_url}: {what} refused: the tier is open read-only (read_only: true), "
                "so nothing in its folder is written or deleted"
            )

    def _waker(self) -> Wake:
        """A :data:`Wake` for this event loop: it reports the evictions there, in the
        order they happened (or at the next wake, should this loop be closed)."""
        loop = asyncio.get_running_loop()

        def wake() -> None:
            with contextlib.suppress(RuntimeError):  # closed: a batch nobody awaits
                loop.call_soon_threadsafe(self._report_evictions)

        return wake

    def _report_evictions(self) -> None:
        self._evicted(self.index.take_evicted())

    def _error(self, exc: OSError, action: str) -> BackendError:
        """Translate an ``OSError``: a folder that is not a usable folder means
        unavailable."""
        if not self.folder.usable():
            return BackendUnavailableError(
                f"{self.safe_url}: folder {self.folder.root} is gone or not accessible ({exc})"
            )
        return BackendError(f"{self.safe_url}: {action} failed: {exc}")

    # -- blocking work, in the worker threads ------------------------------------------

    def _open_sync(self, wake: Wake) -> None:
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

    def _shards(self, wake: Wake) -> list[str]:
        with self.folder.use() as tree:  # shard folders are listed afresh: the root counts
            self._follow(tree, wake)
        return shards(self.folder)

    def _listing(self, call: Callable[[], list[str]]) -> list[str]:
        try:
            return call()
        except OSError as exc:
            raise self._error(exc, "listing") from exc

    def _contains_batch(self, keys: Sequence[str], wake: Wake) -> list[bool]:
        try:
            with self.folder.use() as tree:
                found = self._contains(keys)
                missed = [k for k, hit in zip(keys, found, strict=True) if not hit]
                state = self._follow(tree, wake, missed)  # hits from memory need it too
            if state is RootState.GONE:
                return [False] * len(keys)
            if state is RootState.NEW:
                found = self._contains(keys)
            if self._expiry is not None:
                with self.folder.use() as tree:
                    fresh = self._expiry.fresh
                    found = [hit and fresh(tree, k) for k, hit in zip(keys, found, strict=True)]
        except OSError as exc:
            raise self._error(exc, "stat") from exc
        return found

    def _contains(self, keys: Sequence[str]) -> list[bool]:
        found = self.index.knows(keys)
        for i, key in enumerate(keys):
            found[i] = found[i] or self.index.probe(key)
        return found

    def _delete_batch(self, keys: Sequence[str], wake: Wake) -> list[bool]:
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
            raise self._error(exc, "delete") from exc
        return deleted

    def _get_group(self, keys: Sequence[str], wake: Wake) -> list[Buffer | None]:
        out: list[Buffer | None] = []
        try:
            with self.folder.use() as tree:
                for key in keys:
                    out.append(self._read(tree, key))
                missed = [k for k, buf in zip(keys, out, strict=True) if buf is None]
                state = self._follow(tree, wake, missed) if missed else RootState.SAME
            if state is RootState.NEW:  # the folder was replaced: read the misses from the new one
                with self.folder.use() as tree:
                    for i, key in enumerate(keys):
                        if out[i] is None:
                            out[i] = self._read(tree, key)
        except BaseException as exc:
            release_all(out)
            if isinstance(exc, OSError):
                raise self._error(exc, "read") from exc
            raise
        return out

    def _read(self, tree: Tree, key: str) -> Buffer | None:
        opened = self.folder.open_chunk(tree, key, self._read_flags)
        if opened is None:
            self.index.missed(key)
            return None
        fd, st = opened
        if self._expiry is not None and self._expiry.is_expired(key, st):
            os.close(fd)
            self._expiry.drop(key)
            return None
        try:
            buf = read_all(fd, st.st_size, self.pool, direct=self.options.o_direct)
            try:
                if not self.options.read_only:  # the access time orders LRU on restart
                    with contextlib.suppress(OSError):
                        os.utime(fd, ns=(time.time_ns(), st.st_mtime_ns))
                self.index.read(key, fd, st.st_size)
            except BaseException:
                buf.release()
                raise
        finally:
            os.close(fd)
        return buf

    def _put_group(
        self,
        items: Sequence[tuple[str, Buffer]],
        mode: PutMode,
        stop: threading.Event,
        sync: FolderSync | None,
        wake: Wake,
    ) -> list[bool]:
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
            raise self._error(exc, "write") from exc
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
            move = partial(self._mover.place, tree, tmp, temp, key, create=create)
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
