"""The ``file`` tier: one file per chunk in a local folder (disk, NVMe).

URL: ``file:///absolute/path``. Layout::

    <root>/<first 2 hex digits of the key's digest>/<key>   one file per chunk
    <root>/.tmp/<pid>-<random>.tmp                           writes in progress

Guarantees:

* Atomic writes: a blob goes to a temp file that is then renamed into place
  (``OVERWRITE``) or hard-linked (``CREATE``: the link fails if the key exists), so
  readers, crashes and cancelled writes see a key absent or complete, never partial.
* Persistence: ``open()`` rebuilds the index from the files (sizes from ``stat``,
  eviction order from the access and modification times this tier sets on every
  write and hit), so the cache survives restarts. Temp files of dead writers are
  removed; other files are ignored and counted as ``foreign_files``, never deleted.
* Capacity (required): before each write, victims chosen by the eviction policy are
  deleted until the blob fits, counting writes in flight, so a process alone never
  makes the folder exceed ``capacity`` (several: see below). A folder found over
  capacity at ``open()`` is trimmed.
* Byte store: blobs are returned exactly as stored, without parsing them. The tier
  chain checks integrity and deletes corrupt keys through ``delete_many``.
* Blocking I/O runs in a small thread pool, one thread call per batch.

Several processes may share one folder. Each keeps its own index and policy:

* A key missing from a process's index is looked up on disk by ``get_many`` and
  ``contains_many`` and adopted into the index if found; an indexed key whose file
  another process deleted is a miss and leaves the index. ``contains_many`` answers
  indexed keys from memory, so it may report a chunk another process removed since.
* Capacity holds across processes, within a bound. Each process evicts from the
  chunks it knows: those found at ``open()``, written or adopted by it. Before a
  write, once ``rescan_interval`` seconds (default 2) passed since its last rescan,
  it lists the folder again, adopts the chunks other processes wrote (oldest first,
  by file time), forgets those they deleted and evicts down to ``capacity``, telling
  its eviction listener. So after a write by any process the folder holds at most
  ``capacity`` plus what other processes wrote since that process's last rescan
  began (within one ``rescan_interval`` plus one scan and one chunk write), plus
  their temp files in flight. The excess goes at the next rescanning write; a folder
  nobody writes to does not grow. Give every process the same ``capacity`` (the
  largest applies). Rescans that race may evict a little more than needed.
* A rescan lists names and ``stat``-s only files the process does not know: about
  2 us per file (40 ms for 20k files, 0.2 s for 100k, on a warm local disk). A
  known key's size is not read again (equal keys hold equal chunks); a key another
  process rewrote with another size is counted anew when read. Raise
  ``rescan_interval`` for huge folders; ``0`` turns rescans off, and then N
  processes writing different keys can fill up to N x ``capacity``.
* A temp file is removed only when no process holds its ``flock`` (a writer holds it
  until the rename) or when it is over an hour old: this works across processes and
  pid namespaces of one host. On network filesystems it relies on their lock support.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import math
import os
import re
import secrets
import stat
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import ClassVar, TypeVar
from urllib.parse import unquote, urlsplit

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.errors import BackendError, BackendUnavailableError, ConfigError
from kvtier.core.hookspecs import hookimpl
from kvtier.core.keys import is_valid_key, validate_key
from kvtier.core.plugins import PluginRegistry
from kvtier.core.specs import BackendSpec

T = TypeVar("T")
Evicted = list[tuple[str, int]]

ALIGN = 4096
"""O_DIRECT offsets, lengths and addresses are multiples of this."""
SHARD_CHARS = 2
TEMP_DIR = ".tmp"
TEMP_SETTLE_S = 5.0
"""A younger temp file may belong to a writer that has not taken its lock yet."""
TEMP_GRACE_S = 3600.0
"""A temp file older than this is stale even if locked (or locks are unsupported)."""

_SHARD_RE = re.compile(rf"^[0-9a-f]{{{SHARD_CHARS}}}$")
_TEMP_RE = re.compile(r"^\d+-[0-9a-f]{16}\.tmp$")
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
_MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC


class FileOptions(BaseModel):
    """Options of the ``file`` tier."""

    model_config = ConfigDict(extra="forbid")

    eviction: str = "lru"
    """Name of the eviction policy plugin (``lru``, ``lfu``, ...)."""
    fsync: bool = False
    """fsync each file and its folder after writing: survives power loss, slower."""
    o_direct: bool = False
    """Bypass the page cache with O_DIRECT (the filesystem must support it)."""
    threads: int = Field(default=2, ge=1, le=64)
    """Threads doing the blocking file I/O; each batch runs in one of them."""
    rescan_interval: float = Field(default=2.0, ge=0, allow_inf_nan=False)
    """Seconds between rescans of the folder, made before a write, that count the
    chunks other processes wrote or deleted; 0 turns them off (see the module doc)."""


def root_from_url(url: str) -> str:
    """The folder of a ``file:///absolute/path`` URL; :class:`ConfigError` otherwise."""
    hint = "write it as file:///absolute/path (three slashes, e.g. file:///var/cache/kvtier)"
    parts = urlsplit(url)
    if parts.scheme.lower() != "file":
        raise ConfigError(f"{url!r} is not a file URL; {hint}")
    if parts.netloc:
        raise ConfigError(f"{url!r} names a host ({parts.netloc!r}); the tier is local: {hint}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{url!r} has a query or fragment; put options in 'options': {hint}")
    path = unquote(parts.path)
    if not path.startswith("/"):
        raise ConfigError(f"{url!r} has a relative path; {hint}")
    return os.path.normpath(path)


def _shard(key: str) -> str:
    return key.rpartition(".")[2][:SHARD_CHARS]


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _address(view: memoryview) -> int:
    return int(np.frombuffer(view, dtype=np.uint8).ctypes.data)


def _unlink(path: str) -> bool:
    """Remove ``path``; ``False`` if it did not exist."""
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno not in _MISSING:
            raise
        return False
    return True


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_is_stale(path: str, now: float) -> bool:
    """No writer holds the temp file's lock (checked once it settled), or it is too old."""
    age = now - os.stat(path, follow_symlinks=False).st_mtime
    if age > TEMP_GRACE_S:
        return True
    if age < TEMP_SETTLE_S:
        return False
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a live writer holds it, or locks are unsupported: wait for the grace
        return False
    finally:
        os.close(fd)
    return True


def _release_all(buffers: Iterable[Buffer | None]) -> None:
    for buf in buffers:
        if buf is not None:
            buf.release()


class FileBackend(Backend):
    """A bounded, persistent, shareable byte store with one file per chunk."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True, shared=True, bounded=True, listing=True, create_mode=True
    )
    options: FileOptions

    def __init__(
        self,
        url: str,
        options: BaseModel,
        *,
        capacity: int | None = None,
        pool: BufferPool | None = None,
        registry: PluginRegistry | None = None,
    ) -> None:
        super().__init__(url, options, capacity=capacity, pool=pool, registry=registry)
        if not isinstance(options, FileOptions):
            raise ConfigError(f"{url}: options must be FileOptions, got {type(options).__name__}")
        if capacity is None or capacity <= 0:
            raise ConfigError(
                f"tier {url!r} needs a positive capacity in bytes so that the folder cannot "
                f"grow without bound (got {capacity!r}); set the tier's capacity, e.g. 100 GiB"
            )
        self.root = root_from_url(url)
        self._capacity = capacity
        self._temp_dir = os.path.join(self.root, TEMP_DIR)
        self._policy = self.registry.eviction_policy(options.eviction).load()()
        self._sizes: dict[str, int] = {}
        self._used = 0
        self._reserved = 0
        self._evictions = 0
        self._counts: Counter[str] = Counter()
        self._rescan_due = math.inf
        """``time.monotonic()`` from which the next write rescans; ``inf``: none due."""
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None

    # -- async API ---------------------------------------------------------------------

    async def open(self) -> None:
        self._check_open()
        if self._executor is not None:
            return
        self._executor = ThreadPoolExecutor(self.options.threads, thread_name_prefix="kvtier-file")
        try:
            await self._offload(partial(self._open_sync, self._reporter()))
        except BaseException:
            executor, self._executor = self._executor, None
            executor.shutdown(wait=False)
            raise

    async def close(self) -> None:
        if self._closed:
            return
        await super().close()
        executor, self._executor = self._executor, None
        if executor is not None:  # waits for batches still running
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)

    async def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        self._check_open()
        if not keys:
            return []
        paths = [self._path(key) for key in keys]
        return await self._offload(partial(self._get_batch, keys, paths), _release_all)

    async def put_many(
        self, items: Sequence[tuple[str, Buffer]], mode: PutMode = PutMode.OVERWRITE
    ) -> list[bool]:
        self._check_open()
        if not items:
            return []
        paths = [self._path(key) for key, _ in items]
        stop = threading.Event()
        # Retained so that a caller releasing them after a cancel cannot recycle memory
        # a thread still writes from; the batch releases them when done.
        for _, buf in items:
            buf.retain()
        call = partial(self._put_batch, items, paths, mode, stop, self._reporter())
        try:
            return await self._offload(call)
        except asyncio.CancelledError:
            stop.set()  # the batch skips the keys it has not started
            raise

    async def contains_many(self, keys: Sequence[str]) -> list[bool]:
        self._check_open()
        paths = [self._path(key) for key in keys]
        with self._lock:
            found = [key in self._sizes for key in keys]
        unknown = [i for i, hit in enumerate(found) if not hit]
        if unknown:
            probe = partial(
                self._probe_batch, [keys[i] for i in unknown], [paths[i] for i in unknown]
            )
            for i, hit in zip(unknown, await self._offload(probe), strict=True):
                found[i] = hit
        elif keys:
            self._check_root()  # one stat of a cached folder: cheap enough for the loop
        return found

    async def delete_many(self, keys: Sequence[str]) -> list[bool]:
        self._check_open()
        if not keys:
            return []
        paths = [self._path(key) for key in keys]
        return await self._offload(partial(self._delete_batch, keys, paths))

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        self._check_open()
        for shard in await self._offload(self._list_shards):
            for key in await self._offload(partial(self._list_shard, shard, prefix)):
                yield key

    async def stats(self) -> BackendStats:
        self._check_open()
        with self._lock:
            details: dict[str, object] = {
                "root": self.root,
                "o_direct": self.options.o_direct,
                "fsync": self.options.fsync,
                "reserved_bytes": self._reserved,
            }
            for name in (
                "foreign_files",
                "stale_temps_removed",
                "adopted",
                "vanished",
                "rescans",
                "rejected_no_space",
            ):
                details[name] = self._counts[name]
            return BackendStats(
                keys=len(self._sizes),
                bytes_used=self._used,
                capacity_bytes=self._capacity,
                evictions=self._evictions,
                details=details,
            )

    # -- plumbing ----------------------------------------------------------------------

    async def _offload(
        self, call: Callable[[], T], on_orphan: Callable[[T], None] | None = None
    ) -> T:
        """Run ``call`` in the I/O pool. If the caller is cancelled, the call still
        finishes (a thread cannot be interrupted) and ``on_orphan`` gets its result."""
        if self._executor is None:
            raise BackendUnavailableError(f"{self.url}: not open; await backend.open() first")
        future = asyncio.get_running_loop().run_in_executor(self._executor, call)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if on_orphan is not None:
                future.add_done_callback(
                    lambda f: None if f.cancelled() or f.exception() else on_orphan(f.result())
                )
            raise

    def _reporter(self) -> Callable[[Evicted], None]:
        """Report evictions from I/O threads on the event loop's thread."""
        loop = asyncio.get_running_loop()

        def report(evicted: Evicted) -> None:
            loop.call_soon_threadsafe(self._evicted, evicted)

        return report

    def _path(self, key: str) -> str:
        validate_key(key)
        return f"{self.root}/{_shard(key)}/{key}"

    def _check_root(self) -> None:
        """Raise ``BackendUnavailableError`` if the folder vanished (e.g. unmounted)."""
        if not os.path.isdir(self.root):
            raise BackendUnavailableError(f"{self.url}: folder {self.root} is gone")

    def _error(self, exc: OSError, action: str) -> BackendError:
        """Translate an ``OSError``: a missing or inaccessible folder means unavailable."""
        if not os.path.isdir(self.root) or not os.access(self.root, os.R_OK | os.W_OK | os.X_OK):
            return BackendUnavailableError(
                f"{self.url}: folder {self.root} is gone or not accessible ({exc})"
            )
        return BackendError(f"{self.url}: {action} failed: {exc}")

    # -- index: changed under self._lock, together with the directory entries ----------

    def _remember(self, key: str, nbytes: int) -> None:
        self._used += nbytes - self._sizes.get(key, 0)
        self._sizes[key] = nbytes
        self._policy.insert(key)

    def _forget(self, key: str) -> int:
        nbytes = self._sizes.pop(key, 0)
        self._used -= nbytes
        self._policy.remove(key)
        return nbytes

    def _found(self, key: str, nbytes: int) -> None:
        """A read or probe found ``key``'s file: touch it, or adopt it if unknown."""
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

    def _make_room(self, nbytes: int) -> tuple[bool, Evicted]:
        """Evict until ``nbytes`` more fit, then reserve them; return whether they fit
        and what was evicted."""
        evicted: Evicted = []
        with self._lock:
            if self._reserved + nbytes > self._capacity:  # not even in an empty folder
                return False, evicted
            while self._used + self._reserved + nbytes > self._capacity:
                victim = self._policy.victim()
                if victim is None:
                    return False, evicted
                evicted.append((victim, self._forget(victim)))
                self._evictions += 1
                _unlink(self._path(victim))
            self._reserved += nbytes
        return True, evicted

    # -- blocking work, run in the I/O threads -----------------------------------------

    def _open_sync(self, report: Callable[[Evicted], None]) -> None:
        try:
            os.makedirs(self._temp_dir, exist_ok=True)
            if self.options.o_direct:
                self._probe_o_direct()
            self._remove_stale_temps()
            self._scan()
            _, evicted = self._make_room(0)
        except OSError as exc:
            raise BackendUnavailableError(f"{self.url}: cannot open {self.root}: {exc}") from exc
        self._schedule_rescan()
        if evicted:
            report(evicted)

    def _probe_o_direct(self) -> None:
        try:
            fd, temp = self._create_temp()
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            raise ConfigError(
                f"{self.url}: the filesystem of {self.root} refuses O_DIRECT (tmpfs and some "
                "network or FUSE filesystems do); set o_direct: false for this tier"
            ) from None
        try:
            with self.pool.acquire(ALIGN) as page:
                os.pwrite(fd, page.block[:ALIGN], 0)
        finally:
            os.close(fd)
            os.unlink(temp)

    def _remove_stale_temps(self) -> None:
        now = time.time()
        for entry in os.scandir(self._temp_dir):
            if not _TEMP_RE.match(entry.name):
                self._counts["foreign_files"] += 1
                continue
            with contextlib.suppress(FileNotFoundError):  # its writer finished meanwhile
                if _temp_is_stale(entry.path, now) and _unlink(entry.path):
                    self._counts["stale_temps_removed"] += 1

    def _scan(self) -> None:
        """Index every chunk file, least recently used first."""
        found, _, foreign = self._walk(set())
        with self._lock:
            self._counts["foreign_files"] += foreign
            for _, key, nbytes in found:
                self._remember(key, nbytes)

    def _walk(self, known: set[str]) -> tuple[list[tuple[int, str, int]], set[str], int]:
        """List the chunk files: ``(time, key, size)`` of those not in ``known``, least
        recently used first; the keys of ``known`` found, without ``stat``; the number of
        foreign entries."""
        new: list[tuple[int, str, int]] = []
        seen: set[str] = set()
        foreign = 0
        with os.scandir(self.root) as top:
            for shard in top:
                if shard.name == TEMP_DIR:
                    continue
                if not (_SHARD_RE.match(shard.name) and shard.is_dir(follow_symlinks=False)):
                    foreign += 1
                    continue
                names = os.listdir(shard.path)
                seen.update(known.intersection(names))
                for name in set(names).difference(known):
                    if not (is_valid_key(name) and _shard(name) == shard.name):
                        foreign += 1
                        continue
                    try:
                        st = os.lstat(f"{shard.path}/{name}")
                    except FileNotFoundError:  # deleted meanwhile
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        foreign += 1
                        continue
                    new.append((max(st.st_atime_ns, st.st_mtime_ns), name, st.st_size))
        new.sort()
        return new, seen, foreign

    def _schedule_rescan(self) -> None:
        """Make the next rescan due ``rescan_interval`` from now (never if it is 0)."""
        interval = self.options.rescan_interval
        self._rescan_due = time.monotonic() + interval if interval else math.inf

    def _rescan_if_due(self, report: Callable[[Evicted], None]) -> None:
        """:meth:`_rescan` if ``rescan_interval`` passed since the last one ended; one
        thread rescans, the others go on meanwhile. Cheap when none is due."""
        if time.monotonic() < self._rescan_due:
            return
        with self._lock:
            if time.monotonic() < self._rescan_due:  # another thread took it
                return
            self._rescan_due = math.inf
        try:
            evicted = self._rescan()
        finally:
            self._schedule_rescan()
        if evicted:
            report(evicted)

    def _rescan(self) -> Evicted:
        """Match the index to the folder: adopt the chunks other processes wrote, forget
        those they deleted, then evict down to capacity; return what was evicted.

        The walk runs unlocked, so each difference it finds is checked again with
        :meth:`_probe` under the lock, where this process's own writes and deletions
        change the index and the folder together."""
        with self._lock:
            known = set(self._sizes)
            self._counts["rescans"] += 1
        new, seen, _ = self._walk(known)
        for _, key, _ in new:
            self._probe(key, self._path(key))
        for key in known - seen:
            self._probe(key, self._path(key))
        return self._make_room(0)[1]

    def _get_batch(self, keys: Sequence[str], paths: Sequence[str]) -> list[Buffer | None]:
        out: list[Buffer | None] = []
        try:
            for key, path in zip(keys, paths, strict=True):
                out.append(self._read(key, path))
            if None in out:  # a miss may mean the whole folder is gone
                self._check_root()
        except BaseException as exc:
            _release_all(out)
            if isinstance(exc, OSError):
                raise self._error(exc, "read") from exc
            raise
        return out

    def _read(self, key: str, path: str) -> Buffer | None:
        direct = self.options.o_direct
        try:
            fd = os.open(path, _READ_FLAGS | (os.O_DIRECT if direct else 0))
        except OSError as exc:
            if exc.errno not in _MISSING:
                raise
            with self._lock:
                if key in self._sizes and not os.path.lexists(path):
                    self._lost(key)
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                return None
            buf = self.pool.acquire(st.st_size)
            try:
                # Pool blocks are page aligned and padded to a page: O_DIRECT reads
                # whole pages and the view is trimmed back to the file's length.
                target = buf.block[: _padded(buf.nbytes)] if direct else buf.view
                done = 0
                while done < buf.nbytes:
                    got = os.preadv(fd, [target[done:]], done)
                    if got == 0:
                        break
                    done += got
                buf.resize(min(done, st.st_size))
                with contextlib.suppress(OSError):  # the access time orders LRU on restart
                    os.utime(fd, ns=(time.time_ns(), st.st_mtime_ns))
                with self._lock:  # a file deleted or evicted meanwhile stays out
                    if os.fstat(fd).st_nlink:
                        self._found(key, st.st_size)
            except BaseException:
                buf.release()
                raise
        finally:
            os.close(fd)
        return buf

    def _put_batch(
        self,
        items: Sequence[tuple[str, Buffer]],
        paths: Sequence[str],
        mode: PutMode,
        stop: threading.Event,
        report: Callable[[Evicted], None],
    ) -> list[bool]:
        stored = [False] * len(items)
        try:
            for i, ((key, buf), path) in enumerate(zip(items, paths, strict=True)):
                if stop.is_set():
                    break
                stored[i] = self._put(key, path, buf, mode, report)
            if self.options.fsync:  # after the loop: one journal commit covers all renames
                placed = zip(paths, stored, strict=True)
                for folder in {os.path.dirname(path) for path, ok in placed if ok}:
                    _fsync_dir(folder)
        except OSError as exc:
            raise self._error(exc, "write") from exc
        finally:
            _release_all(buf for _, buf in items)
        return stored

    def _put(
        self, key: str, path: str, buf: Buffer, mode: PutMode, report: Callable[[Evicted], None]
    ) -> bool:
        self._rescan_if_due(report)
        if mode is PutMode.CREATE and self._probe(key, path):
            return False
        fits, evicted = self._make_room(buf.nbytes)
        if evicted:
            report(evicted)
        if not fits:
            return False
        try:
            return self._write(key, path, buf, mode)
        except OSError as exc:
            if exc.errno not in _NO_SPACE:
                raise
            with self._lock:
                self._counts["rejected_no_space"] += 1
            return False
        finally:
            with self._lock:
                self._reserved -= buf.nbytes

    def _write(self, key: str, path: str, buf: Buffer, mode: PutMode) -> bool:
        """Write ``buf`` to a temp file and move it to ``path``; ``False`` if ``CREATE``
        found the key present. The temp file never outlives the call. With ``fsync``
        the data is synced before the rename; the batch syncs the folders after."""
        fd, temp = self._create_temp()
        try:
            self._write_all(fd, buf)
            now = time.time_ns()
            os.utime(fd, ns=(now, now))
            if self.options.fsync:
                os.fsync(fd)
            with self._lock:
                placed = self._place(temp, path, mode)
                if placed:
                    self._remember(key, buf.nbytes)
            if mode is PutMode.CREATE:
                os.unlink(temp)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            raise
        finally:
            os.close(fd)  # releases the temp file's lock, after the rename
        return placed

    def _create_temp(self) -> tuple[int, str]:
        """A new temp file, locked so that ``open()`` in other processes leaves it alone."""
        temp = f"{self._temp_dir}/{os.getpid()}-{secrets.token_hex(8)}.tmp"
        flags = _WRITE_FLAGS | (os.O_DIRECT if self.options.o_direct else 0)
        fd = os.open(temp, flags, 0o644)
        with contextlib.suppress(OSError):  # no locks here: cleanup waits for the grace
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd, temp

    def _write_all(self, fd: int, buf: Buffer) -> None:
        view, bounce = buf.view, None
        if self.options.o_direct:
            view, bounce = self._aligned(buf)
        try:
            done = 0
            while done < view.nbytes:
                done += os.pwrite(fd, view[done:], done)
            if view.nbytes != buf.nbytes:
                os.ftruncate(fd, buf.nbytes)  # drop the O_DIRECT padding
        finally:
            if bounce is not None:
                bounce.release()

    def _aligned(self, buf: Buffer) -> tuple[memoryview, Buffer | None]:
        """``buf``'s bytes padded to whole pages in page-aligned memory, for O_DIRECT;
        copied into a pool buffer only if ``buf``'s own block does not qualify."""
        padded = _padded(buf.nbytes)
        block = buf.block
        if padded == 0 or (block.nbytes >= padded and _address(block) % ALIGN == 0):
            return block[:padded], None
        bounce = self.pool.copy_of(buf.view)
        return bounce.block[:padded], bounce

    def _place(self, temp: str, path: str, mode: PutMode) -> bool:
        """Rename ``temp`` to ``path``, or for ``CREATE`` hard-link it (``False`` if the
        key exists), creating the shard folder on first use."""
        move = os.link if mode is PutMode.CREATE else os.replace
        try:
            move(temp, path)
        except FileExistsError:
            return False
        except FileNotFoundError:
            if not os.path.exists(temp):
                raise
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if self.options.fsync:
                _fsync_dir(self.root)
            try:
                move(temp, path)
            except FileExistsError:
                return False
        return True

    def _probe(self, key: str, path: str) -> bool:
        """Whether ``key``'s file exists; adopts or drops it from the index to match."""
        with self._lock:
            try:
                st = os.stat(path, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in _MISSING:
                    raise
                self._lost(key)
                return False
            if stat.S_ISREG(st.st_mode):
                self._found(key, st.st_size)
            return stat.S_ISREG(st.st_mode)

    def _probe_batch(self, keys: Sequence[str], paths: Sequence[str]) -> list[bool]:
        try:
            found = [self._probe(key, path) for key, path in zip(keys, paths, strict=True)]
        except OSError as exc:
            raise self._error(exc, "stat") from exc
        if not all(found):
            self._check_root()
        return found

    def _delete_batch(self, keys: Sequence[str], paths: Sequence[str]) -> list[bool]:
        deleted = []
        try:
            for key, path in zip(keys, paths, strict=True):
                with self._lock:
                    self._forget(key)
                    deleted.append(_unlink(path))
        except OSError as exc:
            raise self._error(exc, "delete") from exc
        if not all(deleted):
            self._check_root()
        return deleted

    def _list_shards(self) -> list[str]:
        try:
            with os.scandir(self.root) as top:
                return sorted(
                    e.path
                    for e in top
                    if _SHARD_RE.match(e.name) and e.is_dir(follow_symlinks=False)
                )
        except OSError as exc:
            raise self._error(exc, "listing") from exc

    def _list_shard(self, shard: str, prefix: str) -> list[str]:
        name = os.path.basename(shard)
        try:
            with os.scandir(shard) as files:
                return [
                    e.name
                    for e in files
                    if e.name.startswith(prefix)
                    and is_valid_key(e.name)
                    and _shard(e.name) == name
                    and e.is_file(follow_symlinks=False)
                ]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._error(exc, "listing") from exc


@hookimpl
def kvtier_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="file",
            schemes=("file",),
            cls=FileBackend,
            options=FileOptions,
            description="one file per chunk in a local folder (disk, NVMe)",
        )
    ]
