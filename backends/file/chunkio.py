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

from kvtier.backends.file.folder import Tree, new_temp, remove_odd, shard_of
from kvtier.core.buffers import Buffer, BufferPool, address_of

ALIGN = 4096
"""O_DIRECT offsets, lengths and addresses are multiples of this."""
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
"""``errno`` values that mean the disk or quota is full."""

READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY | os.O_CLOEXEC
"""How chunk files are opened for reading: a FIFO does not wait for a writer, a link
is refused (see :meth:`~kvtier.backends.file.folder.Folder.open_chunk`)."""
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})
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


def read_all(fd: int, nbytes: int, pool: BufferPool, *, direct: bool) -> Buffer:
    """The first ``nbytes`` of ``fd`` (fewer if the file is shorter) in a pool buffer."""
    buf = pool.acquire(nbytes)
    try:
        # O_DIRECT reads whole pages; the view is trimmed back to the file's length.
        target = buf.block[: padded(nbytes)] if direct else buf.view
        buf.resize(min(read_at(fd, target, 0, nbytes), nbytes))
    except BaseException:
        buf.release()
        raise
    return buf


def read_at(fd: int, out: memoryview, offset: int, want: int) -> int:
    """Read ``fd`` from ``offset`` into ``out`` until ``want`` bytes (or the end of the
    file, or of ``out``) are in; the count read."""
    done = 0
    while done < want and done < out.nbytes:
        got = os.preadv(fd, [out[done:]], offset + done)
        if got == 0:
            break
        done += got
    return done


def create_temp(tmp: int, name: str, *, direct: bool) -> int:
    """Create temp file ``name`` in folder ``tmp`` and lock it, so that cleanup in other
    processes leaves it alone while it is written."""
    fd = os.open(name, _WRITE_FLAGS | (os.O_DIRECT if direct else 0), 0o644, dir_fd=tmp)
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


def o_direct_works(tmp: int, pool: BufferPool) -> bool:
    """Whether the filesystem of folder ``tmp`` takes O_DIRECT (tried on a temp file,
    created and removed)."""
    name = new_temp()
    try:
        fd = create_temp(tmp, name, direct=True)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        return False
    try:
        with pool.acquire(ALIGN) as page:
            os.pwrite(fd, page.block[:ALIGN], 0)
    finally:
        os.close(fd)
        os.unlink(name, dir_fd=tmp)
    return True


def _rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """``renameat2(src, dst, RENAME_NOREPLACE)`` between folders ``src_dir`` and
    ``dst_dir``: ``FileExistsError`` if ``dst`` exists."""
    assert _renameat2 is not None
    if _renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), _RENAME_NOREPLACE):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code), dst)


class Mover:
    """Moves finished temp files to their chunk files, atomically.

    ``OVERWRITE`` renames; ``CREATE`` renames with ``RENAME_NOREPLACE`` (one call that
    fails if the key exists), or where the kernel or filesystem lacks it (found out
    once) hard-links and then removes the temp file. Both ends are reached through
    folder descriptors; a shard folder is made on first use (with ``fsync``, its entry
    in the root is made durable before the first file moves into it).
    """

    def __init__(self, *, fsync: bool) -> None:
        self.fsync = fsync
        self.noreplace = _renameat2 is not None

    def place(self, tree: Tree, tmp: int, temp: str, key: str, *, create: bool) -> bool:
        """Move temp file ``temp`` of folder ``tmp`` to ``key``'s file; ``False`` (the
        temp file left in place) if ``create`` found the key taken or a folder is in
        its place. Under ``CREATE``, an entry of another kind in its place (a planted
        link or FIFO) is removed first."""
        name = shard_of(key)
        shard = tree.dir(name, create=True)
        assert shard is not None  # made if missing
        if self.fsync:
            tree.make_durable(name)
        try:
            self._move(tmp, temp, shard, key, create)
        except FileExistsError:
            if not remove_odd(shard, key):
                return False
            tree.folder.count_odd()
            try:
                self._move(tmp, temp, shard, key, create)
            except FileExistsError:
                return False
        except IsADirectoryError:  # OVERWRITE of a folder: left alone
            return False
        return True

    def _move(self, tmp: int, temp: str, shard: int, key: str, create: bool) -> None:
        if not create:
            os.replace(temp, key, src_dir_fd=tmp, dst_dir_fd=shard)
            return
        if self.noreplace:
            try:
                _rename_noreplace(tmp, temp, shard, key)
                return
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    raise
                self.noreplace = False
        os.link(temp, key, src_dir_fd=tmp, dst_dir_fd=shard, follow_symlinks=False)
        os.unlink(temp, dir_fd=tmp)
