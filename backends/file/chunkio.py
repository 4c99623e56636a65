"""The blocking I/O of one chunk file: read it into a pool buffer, write a temp file,
move the temp file into place atomically.

With O_DIRECT, offsets, lengths and addresses are multiples of :data:`ALIGN`: pool
buffers are page aligned and padded to whole pages, so reads land in them directly;
a write copies its blob only if the blob's memory does not qualify. Everything here
runs in the tier's worker threads.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import threading

from kvtier.backends.file.folder import MISSING, fsync_dir
from kvtier.core.buffers import Buffer, BufferPool, address_of

ALIGN = 4096
"""O_DIRECT offsets, lengths and addresses are multiples of this."""
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
"""``errno`` values that mean the disk or quota is full."""

_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1

_libc = ctypes.CDLL(None, use_errno=True)
_renameat2 = getattr(_libc, "renameat2", None)  # glibc >= 2.28
if _renameat2 is not None:
    _renameat2.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    _renameat2.restype = ctypes.c_int


def padded(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages."""
    return -(-nbytes // ALIGN) * ALIGN


def open_chunk(path: str, *, direct: bool) -> int | None:
    """A read-only descriptor of chunk file ``path``; ``None`` if there is none."""
    try:
        return os.open(path, _READ_FLAGS | (os.O_DIRECT if direct else 0))
    except OSError as exc:
        if exc.errno not in MISSING:
            raise
        return None


def read_all(fd: int, nbytes: int, pool: BufferPool, *, direct: bool) -> Buffer:
    """The first ``nbytes`` of ``fd`` (fewer if the file is shorter) in a pool buffer."""
    buf = pool.acquire(nbytes)
    try:
        # O_DIRECT reads whole pages; the view is trimmed back to the file's length.
        target = buf.block[: padded(nbytes)] if direct else buf.view
        done = 0
        while done < nbytes:
            got = os.preadv(fd, [target[done:]], done)
            if got == 0:
                break
            done += got
        buf.resize(min(done, nbytes))
    except BaseException:
        buf.release()
        raise
    return buf


def create_temp(path: str, *, direct: bool) -> int:
    """Create temp file ``path`` and lock it, so that cleanup in other processes
    leaves it alone while it is written."""
    fd = os.open(path, _WRITE_FLAGS | (os.O_DIRECT if direct else 0), 0o644)
    with contextlib.suppress(OSError):  # no locks here: cleanup waits for the grace
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def write_all(fd: int, buf: Buffer, pool: BufferPool, *, direct: bool) -> None:
    """Write ``buf``'s bytes to the empty file ``fd``."""
    view, bounce = buf.view, None
    if direct:
        view, bounce = _aligned(buf, pool)
    try:
        done = 0
        while done < view.nbytes:
            done += os.pwrite(fd, view[done:], done)
        if view.nbytes != buf.nbytes:
            os.ftruncate(fd, buf.nbytes)  # drop the O_DIRECT padding
    finally:
        if bounce is not None:
            bounce.release()


def _aligned(buf: Buffer, pool: BufferPool) -> tuple[memoryview, Buffer | None]:
    """``buf``'s bytes padded to whole pages in page-aligned memory, for O_DIRECT;
    copied into a pool buffer only if ``buf``'s own block does not qualify."""
    size = padded(buf.nbytes)
    block = buf.block
    if size == 0 or (
        block.nbytes >= size and not block.readonly and address_of(block) % ALIGN == 0
    ):
        return block[:size], None
    bounce = pool.copy_of(buf.view)
    return bounce.block[:size], bounce


def o_direct_works(temp: str, pool: BufferPool) -> bool:
    """Whether the filesystem of temp file ``temp`` (created and removed) takes O_DIRECT."""
    try:
        fd = create_temp(temp, direct=True)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    try:
        with pool.acquire(ALIGN) as page:
            os.pwrite(fd, page.block[:ALIGN], 0)
    finally:
        os.close(fd)
        os.unlink(temp)
    return True


def _rename_noreplace(src: str, dst: str) -> None:
    """``renameat2(src, dst, RENAME_NOREPLACE)``: ``FileExistsError`` if ``dst`` exists."""
    assert _renameat2 is not None
    if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)


class Mover:
    """Moves finished temp files to their chunk paths, atomically.

    ``OVERWRITE`` renames; ``CREATE`` renames with ``RENAME_NOREPLACE`` (one call that
    fails if the key exists), or where the kernel or filesystem lacks it (found out
    once) hard-links and then removes the temp file. Shard folders are made on first
    use; with ``fsync``, each one's entry in the root folder is made durable before
    the first file moves into it.
    """

    def __init__(self, root: str, *, fsync: bool) -> None:
        self.root = root
        self.fsync = fsync
        self.noreplace = _renameat2 is not None
        self._lock = threading.Lock()
        """Held by worker threads while they make a shard folder (durable)."""
        self._durable: set[str] = set()
        """Shard folders made durable (with ``fsync``)."""

    def place(self, temp: str, path: str, *, create: bool) -> bool:
        """Move ``temp`` to ``path``; ``False`` (``temp`` left in place) if ``create``
        found ``path`` taken."""
        folder = os.path.dirname(path)
        if self.fsync and folder not in self._durable:
            self._make_folder(folder, again=False)
        try:
            self._move(temp, path, create)
        except FileExistsError:
            return False
        except FileNotFoundError:
            if not os.path.exists(temp):
                raise
            self._make_folder(folder, again=True)
            try:
                self._move(temp, path, create)
            except FileExistsError:
                return False
        return True

    def _make_folder(self, folder: str, *, again: bool) -> None:
        """Make shard ``folder`` (durable with ``fsync``) unless ``again`` is false and
        another thread did."""
        with self._lock:
            if not again and folder in self._durable:
                return
            os.makedirs(folder, exist_ok=True)
            if self.fsync:
                fsync_dir(self.root)
                self._durable.add(folder)

    def _move(self, temp: str, path: str, create: bool) -> None:
        if not create:
            os.replace(temp, path)
            return
        if self.noreplace:
            try:
                _rename_noreplace(temp, path)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self.noreplace = False
        os.link(temp, path)
        os.unlink(temp)
