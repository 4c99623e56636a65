"""The tier's folder: its layout, and the directory descriptors everything below the
root is reached through.

Layout::

    <root>/<first 2 hex digits of the key's digest>/<key>   one file per chunk
    <root>/.tmp/<pid>-<random>.tmp                           writes in progress

The root is the configured path (links in it are followed: it is the operator's
choice). Below it nothing follows a link: the shard folders and ``.tmp`` are opened
relative to a descriptor of the root with ``O_DIRECTORY | O_NOFOLLOW``, and chunk and
temp files relative to their folder's descriptor (see :mod:`~kvtier.backends.file.chunkio`),
so an entry planted in the folder (a link, a FIFO) can neither redirect a write
outside it nor block a thread. Where a shard folder or ``.tmp`` should be, a writable
tier replaces any entry that is not a folder (removing a name never touches what a
link points to) by a new folder.

A :class:`Tree` holds the descriptors of one incarnation of the folder. When the
folder is deleted, replaced or recreated behind the process's back, :meth:`Folder.renew`
opens the new one and retires the old tree, whose descriptors are closed once no
thread uses them. Everything here is a blocking call, made in the tier's worker
threads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from enum import Enum

SHARD_CHARS = 2
TEMP_DIR = ".tmp"
MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
"""``errno`` values that mean a path is not there (or is not what it should be)."""
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""How every folder below the root is opened: a link or a non-folder is refused."""
_ROOT_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NONBLOCK | os.O_CLOEXEC

MTIME_SETTLE_NS = 2_000_000_000
"""A folder's mtime this recent may be shared by a change still to come (coarse clock
ticks, clock skew): :meth:`Folder.check` does not rely on it."""

SHARD_RE = re.compile(rf"^[0-9a-f]{{{SHARD_CHARS}}}$")


def shard_of(key: str) -> str:
    """The shard folder's name of a valid key: the first digits of its digest."""
    return key.rpartition(".")[2][:SHARD_CHARS]


def new_temp() -> str:
    """A fresh temp file name (in ``.tmp``), unique across processes."""
    return f"{os.getpid()}-{secrets.token_hex(8)}.tmp"


def remove_odd(dir_fd: int, name: str, seen: os.stat_result | None = None) -> bool:
    """Remove entry ``name`` of folder ``dir_fd`` if it is neither a regular file nor a
    folder (a link, FIFO, socket or device node planted under a chunk's name) and,
    where ``seen`` is given, still the entry that was seen; ``True`` if removed.

    Unlinking removes the name only, never what a link points to. Folders are left
    alone: they may hold anything."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            return False
        if seen is not None and (st.st_dev, st.st_ino) != (seen.st_dev, seen.st_ino):
            return False
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    return True


class RootState(Enum):
    """What :meth:`Folder.check` found."""

    SAME = "same"
    """The tree reaches the tier's folder."""
    GONE = "gone"
    """Nothing is at the root's path: the folder was deleted."""
    NEW = "new"
    """Another folder is at the root's path (made again or replaced), or one of the
    tree's folders was deleted (a shard folder, say): a new tree reaches it."""


class Tree:
    """The descriptors of one incarnation of the tier folder: the root's, and those of
    its subfolders (shards and ``.tmp``), opened on first use and kept."""

    def __init__(self, root_fd: int, folder: Folder) -> None:
        st = os.fstat(root_fd)
        self.root_fd = root_fd
        self.ident = (st.st_dev, st.st_ino)
        self.folder = folder
        self.users = 0
        """Threads using the tree (changed under the :class:`Folder`'s lock)."""
        self.retired = False
        self._lock = threading.Lock()
        """Guards the maps; never held across a syscall."""
        self._dirs: dict[str, int] = {}
        self._durable: set[str] = set()
        self.checked_mtime = -1
        """The root's mtime when :meth:`Folder.check` last found every descriptor live."""

    def dir(self, name: str, *, create: bool = False) -> int | None:
        """The descriptor of subfolder ``name`` (a shard or ``.tmp``); ``None`` where it
        is missing (or not a folder) and ``create`` is false. With ``create`` (on a
        writable tree) a missing folder is made, and an entry in its place that is not
        a folder is removed first."""
        fd = self.kept(name)
        if fd is not None:
            return fd
        fd = self._open_dir(name, create=create and self.folder.writable)
        if fd is None:
            return None
        with self._lock:
            kept = self._dirs.setdefault(name, fd)
        if kept != fd:  # another thread opened it meanwhile
            os.close(fd)
        return kept

    def _open_dir(self, name: str, *, create: bool) -> int | None:
        try:
            return os.open(name, DIR_FLAGS, dir_fd=self.root_fd)
        except OSError as exc:
            if exc.errno not in MISSING:
                raise
            if not create:
                return None
            if exc.errno != errno.ENOENT:  # a link, file or FIFO where a folder belongs
                try:
                    os.unlink(name, dir_fd=self.root_fd)
                except FileNotFoundError:
                    pass
                else:
                    self.folder.count_odd()
        with contextlib.suppress(FileExistsError):  # another thread or process made it
            os.mkdir(name, 0o755, dir_fd=self.root_fd)
        return os.open(name, DIR_FLAGS, dir_fd=self.root_fd)

    def descriptors(self) -> list[int]:
        """The root's descriptor and those kept of its subfolders."""
        with self._lock:
            return [self.root_fd, *self._dirs.values()]

    def kept_of(self, names: Iterable[str]) -> list[int]:
        """The kept descriptors of those of subfolders ``names`` that were opened."""
        with self._lock:
            return [fd for fd in map(self._dirs.get, set(names)) if fd is not None]

    def kept(self, name: str) -> int | None:
        """The kept descriptor of subfolder ``name``, if it was opened."""
        with self._lock:
            return self._dirs.get(name)

    def make_durable(self, name: str) -> None:
        """fsync the root once per subfolder, so the subfolder's entry survives power
        loss before the first file moves into it."""
        with self._lock:
            if name in self._durable:
                return
        os.fsync(self.root_fd)
        with self._lock:
            self._durable.add(name)

    @contextmanager
    def listing(self, name: str) -> Iterator[int]:
        """A new descriptor of subfolder ``name`` (``"."``: the root) to list it with
        ``os.scandir``/``os.listdir``, closed afterwards. (Listing through a kept
        descriptor would share its read offset with other threads' listings.)"""
        fd = os.open(name, DIR_FLAGS, dir_fd=self.root_fd)
        try:
            yield fd
        finally:
            os.close(fd)

    def close(self) -> None:
        fds = self.descriptors()
        with self._lock:
            self._dirs = {}
        for fd in fds:
            os.close(fd)


class Folder:
    """The folder of one ``file`` tier (an absolute, normalised path) and the
    :class:`Tree` of descriptors currently used to reach into it. A read-only folder
    (``writable`` false) is never changed: nothing is made or removed."""

    def __init__(self, root: str, *, writable: bool = True) -> None:
        self.root = root
        self.writable = writable
        self._tree: Tree | None = None
        self._odd_removed = 0
        self._lock = threading.Lock()
        """Guards ``_tree``, the trees' user counts and the counter; never held across
        a syscall."""
        self._renewing = threading.Lock()
        """Held by the one worker thread opening a new tree."""

    def path(self, key: str) -> str:
        """The file of a valid ``key``, for tools and tests (the tier itself reaches
        below the root through descriptors only)."""
        return f"{self.root}/{shard_of(key)}/{key}"

    def usable(self) -> bool:
        """The folder is there and this process may list and read it (and write it,
        unless read-only)."""
        mode = os.R_OK | os.X_OK | (os.W_OK if self.writable else 0)
        return os.path.isdir(self.root) and os.access(self.root, mode)

    # -- the current tree --------------------------------------------------------------

    def open(self) -> None:
        """Open the root (made, with its parents, if missing and writable) and, if
        writable, ``.tmp``. Raises ``FileNotFoundError`` or ``NotADirectoryError`` where
        a read-only folder is not there."""
        with self._renewing:
            if self._tree is None:
                tree = self._open_tree()
                with self._lock:
                    self._tree = tree
        if self.writable:
            with self.use() as tree:
                tree.dir(TEMP_DIR, create=True)

    def _open_tree(self) -> Tree:
        if self.writable:
            os.makedirs(self.root, exist_ok=True)
        fd = os.open(self.root, _ROOT_FLAGS)
        try:
            return Tree(fd, self)
        except BaseException:
            os.close(fd)
            raise

    @contextmanager
    def use(self) -> Iterator[Tree]:
        """The current tree, kept open while the block runs."""
        with self._lock:
            tree = self._tree
            if tree is None:
                raise FileNotFoundError(errno.ENOENT, "the tier folder is not open", self.root)
            tree.users += 1
        try:
            yield tree
        finally:
            with self._lock:
                tree.users -= 1
                done = tree.retired and not tree.users
            if done:
                tree.close()

    def check(self, tree: Tree, shards: Iterable[str] = ()) -> RootState:
        """Whether ``tree`` still reaches the tier's folder: the root's path leads to
        its root, and none of its descriptors is of a deleted folder. ``shards`` are
        the shard folders of keys just missed, checked while the root's entries change.
        Costs one ``stat`` while they do not (its mtime stays the one last checked).
        Raises ``NotADirectoryError`` where something else than a folder is at the
        root's path (an outage: it cannot be made again)."""
        try:
            st = os.stat(self.root)
        except FileNotFoundError:
            return RootState.GONE
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", self.root)
        if (st.st_dev, st.st_ino) != tree.ident:
            return RootState.NEW
        if st.st_mtime_ns == tree.checked_mtime:  # no entry of the root changed since
            return RootState.SAME
        # A change this recent may share its mtime with one still to come: then check
        # the shards of the misses only, and again next time; else every descriptor.
        settled = st.st_mtime_ns < time.time_ns() - MTIME_SETTLE_NS
        fds = tree.descriptors() if settled else [tree.root_fd, *tree.kept_of(shards)]
        if not all(os.fstat(fd).st_nlink for fd in fds):
            return RootState.NEW  # (a deleted folder's inode number may come back)
        if settled:
            tree.checked_mtime = st.st_mtime_ns
        return RootState.SAME

    def renew(self, seen: Tree) -> bool:
        """Open the folder at the root's path again (made if missing and writable) in
        place of tree ``seen``, unless another thread did since; ``True`` if this call
        did."""
        with self._renewing:
            with self._lock:
                if self._tree is not seen:
                    return False
            tree = self._open_tree()
            with self._lock:
                old, self._tree = self._tree, tree
            self._retire(old)
        return True

    def close(self) -> None:
        """Close the descriptors (once no thread uses them)."""
        with self._lock:
            tree, self._tree = self._tree, None
        self._retire(tree)

    def _retire(self, tree: Tree | None) -> None:
        if tree is None:
            return
        with self._lock:
            tree.retired = True
            done = not tree.users
        if done:
            tree.close()

    # -- chunk files -------------------------------------------------------------------

    def stat(self, key: str) -> os.stat_result | None:
        """``lstat`` of ``key``'s file; ``None`` unless it is a regular file (an entry of
        another kind is removed, see :meth:`discard`)."""
        with self.use() as tree:
            shard = tree.dir(shard_of(key))
            if shard is None:
                return None
            try:
                st = os.stat(key, dir_fd=shard, follow_symlinks=False)
            except OSError as exc:
                if exc.errno not in MISSING:
                    raise
                return None
            if stat.S_ISREG(st.st_mode):
                return st
            self.discard(shard, key, st)
            return None

    def open_chunk(self, tree: Tree, key: str, flags: int) -> tuple[int, os.stat_result] | None:
        """A descriptor of ``key``'s file, opened with ``flags`` (which must not block or
        follow links: ``O_NONBLOCK | O_NOFOLLOW``), and its ``fstat``; ``None`` unless
        it is a regular file (an entry of another kind is removed, see :meth:`discard`)."""
        shard = tree.dir(shard_of(key))
        if shard is None:
            return None
        try:
            fd = os.open(key, flags, dir_fd=shard)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            try:  # ELOOP (a link), ENXIO (a socket), EINVAL (a FIFO with O_DIRECT), ...
                st = os.stat(key, dir_fd=shard, follow_symlinks=False)
            except FileNotFoundError:
                return None
            if stat.S_ISREG(st.st_mode):
                raise
            self.discard(shard, key, st)
            return None
        try:
            st = os.fstat(fd)
        except BaseException:
            os.close(fd)
            raise
        if stat.S_ISREG(st.st_mode):
            return fd, st
        os.close(fd)
        self.discard(shard, key, st)
        return None

    def discard(self, shard: int, key: str, seen: os.stat_result) -> None:
        """Remove entry ``key`` of folder ``shard``, seen as ``seen``, which is not a
        regular file, if the folder is writable and it is no folder (see
        :func:`remove_odd`): a planted link or FIFO is a miss, never a chunk, and would
        keep ``CREATE`` from ever storing the key."""
        if self.writable and remove_odd(shard, key, seen):
            self.count_odd()

    def unlink(self, key: str) -> bool:
        """Remove ``key``'s file; ``False`` if there was none."""
        with self.use() as tree:
            shard = tree.dir(shard_of(key))
            if shard is None:
                return False
            try:
                os.unlink(key, dir_fd=shard)
            except OSError as exc:
                if exc.errno not in MISSING and exc.errno != errno.EISDIR:
                    raise
                return False
        return True

    def count_odd(self) -> None:
        with self._lock:
            self._odd_removed += 1

    def odd_removed(self) -> int:
        """How many entries of the wrong kind were removed (see :func:`remove_odd`)."""
        with self._lock:
            return self._odd_removed
