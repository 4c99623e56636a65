"""The ``file`` tier's backend: each batch spread over the tier's worker threads.

The event loop only hands work to the threads and reads the index under its lock,
which is never held across a syscall (see :mod:`kvtier.backends.file.index`); every
syscall runs in a worker thread, in :class:`~kvtier.backends.file.batchio.BatchIO`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar

from kvtier.backends.file.batches import GROUP_BYTES, FolderSync, flat, runs
from kvtier.backends.file.batchio import BatchIO, Wake
from kvtier.backends.file.expiry import Expiry
from kvtier.backends.file.folder import Folder
from kvtier.backends.file.index import ChunkIndex
from kvtier.backends.file.options import FileOptions, root_from_url
from kvtier.backends.file.pins import FilePins
from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode, Read
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import Buffer, release_all
from kvtier.core.errors import BackendUnavailableError, ConfigError
from kvtier.core.pins import check_budget

log = logging.getLogger(__name__)
T = TypeVar("T")


async def settled(futures: Sequence[Future[Any]]) -> None:
    """Wait until every one of ``futures`` is done, whatever their outcome; a cancel
    meanwhile is raised once they are."""
    pending = [asyncio.wrap_future(f) for f in futures if not f.done()]
    if not pending:
        return
    waiting = asyncio.ensure_future(asyncio.wait(pending))
    cancelled = False
    while not waiting.done():
        try:
            await asyncio.shield(waiting)
        except asyncio.CancelledError:
            cancelled = True
    for wrapped in pending:  # their outcome is the caller's business, not the loop's
        if not wrapped.cancelled():
            wrapped.exception()
    if cancelled:
        raise asyncio.CancelledError


class FileBackend(FilePins, Backend):
    """A bounded, persistent, shareable byte store with one file per chunk."""

    capabilities = Capabilities(persistent=True, shared=True, bounded=True, listing=True,
                                create_mode=True, ranged_reads=True)  # fmt: skip
    options: FileOptions
    options_model = FileOptions

    def _configure(self) -> None:
        assert self.capacity is not None  # bounded: checked by Backend
        self.folder = Folder(root_from_url(self.url), writable=not self.options.read_only)
        policy = self.registry.eviction_policy(self.options.eviction).load()()
        self.index = ChunkIndex(self.folder, self.capacity, policy, self.options.rescan_interval)
        check_budget(self.safe_url, self.options.pinned_bytes, self.capacity)
        self.index.pinned_budget = self.options.pinned_bytes
        self._indexed = False
        ttl = self.options.ttl
        self._expiry = None if ttl is None else Expiry(ttl, self.folder, self.index)
        self.io = BatchIO(
            self.safe_url, self.folder, self.index, self.options, self.pool, self._expiry
        )
        self._sweeper: asyncio.Task[None] | None = None

    # -- the hooks (on the event loop) -------------------------------------------------

    async def _open(self) -> None:
        if self._indexed:
            return
        self._start_workers(self.options.threads)
        await self._blocking(partial(self.io.open, self._waker()))
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
        calls = [partial(self.io.get_group, group, wake) for group in groups]
        return flat(await self._pool().run_all(calls, orphan=release_all))

    async def _read_into(self, reads: list[Read]) -> list[int | None]:
        """The reads spread over the workers (``os.preadv`` of each range into its
        ``out``). Returns or raises, cancelled included, only once no worker writes into
        an ``out`` any more: a cancel or a failure stops the groups before their next
        read, and the ones running are waited for."""
        pool, wake, stop = self._pool(), self._waker(), threading.Event()
        groups = self._groups(reads, [out.nbytes for _, _, out in reads])
        futures: list[Future[list[int | None]]] = []
        try:
            for group in groups:
                futures.append(pool.submit(partial(self.io.read_group, group, stop, wake)))
            return flat(await asyncio.gather(*map(asyncio.wrap_future, futures)))
        finally:
            stop.set()
            await settled(futures)

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
        calls = [partial(self.io.put_group, group, mode, stop, sync, wake) for group in groups]
        try:
            results = await pool.run_all(calls)
        except asyncio.CancelledError:
            stop.set()  # the groups skip the keys they have not started
            raise
        return flat(results)

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        return await self._blocking(partial(self.io.contains, keys, self._waker()))

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        self._check_writable("delete_many")
        return await self._blocking(partial(self.io.delete, keys, self._waker()))

    async def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        for shard in await self._blocking(partial(self.io.shards, self._waker())):
            for key in await self._blocking(partial(self.io.keys_in, shard, prefix)):
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
