"""The tier's folder: where chunk files and temp files live, and listing them.

Layout::

    <root>/<first 2 hex digits of the key's digest>/<key>   one file per chunk
    <root>/.tmp/<pid>-<random>.tmp                           writes in progress

Everything here is a blocking call, made in the tier's worker threads.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import time
from dataclasses import dataclass, field

from kvtier.core.keys import is_valid_key

SHARD_CHARS = 2
TEMP_DIR = ".tmp"
TEMP_SETTLE_S = 5.0
"""A younger temp file may belong to a writer that has not taken its lock yet."""
TEMP_GRACE_S = 3600.0
"""A temp file older than this is stale even if locked (or locks are unsupported)."""
MISSING = frozenset({errno.ENOENT, errno.ENOTDIR, errno.ELOOP})
"""``errno`` values that mean a path is not there."""

_SHARD_RE = re.compile(rf"^[0-9a-f]{{{SHARD_CHARS}}}$")
_TEMP_RE = re.compile(r"^\d+-[0-9a-f]{16}\.tmp$")


def shard_of(key: str) -> str:
    """The shard folder's name of a valid key: the first digits of its digest."""
    return key.rpartition(".")[2][:SHARD_CHARS]


def unlink(path: str) -> bool:
    """Remove ``path``; ``False`` if it did not exist."""
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno not in MISSING:
            raise
        return False
    return True


def fsync_dir(path: str) -> None:
    """Make the entries of folder ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_is_stale(path: str, now: float) -> bool:
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


@dataclass
class Walk:
    """What one pass over the chunk files found."""

    new: list[tuple[int, str, int]] = field(default_factory=list)
    """``(time, key, size)`` of the files not already known, least recently used first."""
    seen: set[str] = field(default_factory=set)
    """The known keys whose files are there (not ``stat``-ed)."""
    foreign: int = 0
    """Entries that are not chunk files of this layout."""


@dataclass(frozen=True)
class Folder:
    """The folder of one ``file`` tier (an absolute, normalised path)."""

    root: str

    @property
    def temp_dir(self) -> str:
        return os.path.join(self.root, TEMP_DIR)

    def path(self, key: str) -> str:
        """The file of a valid ``key``."""
        return f"{self.root}/{shard_of(key)}/{key}"

    def new_temp(self) -> str:
        """A fresh temp file name, unique across processes."""
        return f"{self.temp_dir}/{os.getpid()}-{secrets.token_hex(8)}.tmp"

    def exists(self) -> bool:
        return os.path.isdir(self.root)

    def usable(self) -> bool:
        """The folder is there and this process may list, read and write it."""
        return self.exists() and os.access(self.root, os.R_OK | os.W_OK | os.X_OK)

    def remove_stale_temps(self) -> tuple[int, int]:
        """Remove the temp files of dead writers; return ``(removed, foreign entries)``."""
        removed = foreign = 0
        now = time.time()
        for entry in os.scandir(self.temp_dir):
            if not _TEMP_RE.match(entry.name):
                foreign += 1
                continue
            with contextlib.suppress(FileNotFoundError):  # its writer finished meanwhile
                if temp_is_stale(entry.path, now) and unlink(entry.path):
                    removed += 1
        return removed, foreign

    def walk(self, known: set[str]) -> Walk:
        """List the chunk files, ``stat``-ing only those whose key is not in ``known``."""
        found = Walk()
        with os.scandir(self.root) as top:
            for shard in top:
                if shard.name == TEMP_DIR:
                    continue
                if not (_SHARD_RE.match(shard.name) and shard.is_dir(follow_symlinks=False)):
                    found.foreign += 1
                    continue
                names = os.listdir(shard.path)
                found.seen.update(known.intersection(names))
                for name in set(names).difference(known):
                    if not (is_valid_key(name) and shard_of(name) == shard.name):
                        found.foreign += 1
                        continue
                    try:
                        st = os.lstat(f"{shard.path}/{name}")
                    except FileNotFoundError:  # deleted meanwhile
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        found.foreign += 1
                        continue
                    found.new.append((max(st.st_atime_ns, st.st_mtime_ns), name, st.st_size))
        found.new.sort()
        return found

    def shards(self) -> list[str]:
        """The shard folders, sorted."""
        with os.scandir(self.root) as top:
            return sorted(
                e.path for e in top if _SHARD_RE.match(e.name) and e.is_dir(follow_symlinks=False)
            )

    def keys_in(self, shard: str, prefix: str) -> list[str]:
        """The keys starting with ``prefix`` whose files are in ``shard``."""
        name = os.path.basename(shard)
        try:
            with os.scandir(shard) as files:
                return [
                    e.name
                    for e in files
                    if e.name.startswith(prefix)
                    and is_valid_key(e.name)
                    and shard_of(e.name) == name
                    and e.is_file(follow_symlinks=False)
                ]
        except FileNotFoundError:
            return []
