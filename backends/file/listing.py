"""Listing the tier's folder: its chunk files, the keys of a shard, and the temp files
of dead writers. Every folder is listed through a descriptor of its own, opened
relative to the root without following links (see :mod:`~kvtier.backends.file.folder`).

Everything here is a blocking call, made in the tier's worker threads.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
import time
from dataclasses import dataclass, field

from kvtier.backends.file.folder import MISSING, SHARD_RE, TEMP_DIR, Folder, Tree, shard_of
from kvtier.core.keys import is_valid_key

TEMP_SETTLE_S = 5.0
"""A younger temp file may belong to a writer that has not taken its lock yet."""
TEMP_GRACE_S = 3600.0
"""A temp file older than this is stale even if locked (or locks are unsupported)."""

_TEMP_RE = re.compile(r"^\d+-[0-9a-f]{16}\.tmp$")
_ROOT = "."


@dataclass
class Walk:
    """What one pass over the chunk files found."""

    new: list[tuple[int, str, int]] = field(default_factory=list)
    """``(time, key, size)`` of the files not already known, least recently used first."""
    seen: set[str] = field(default_factory=set)
    """The known keys whose files are there (not ``stat``-ed)."""
    foreign: int = 0
    """Entries that are not chunk files of this layout."""


def _subfolders(tree: Tree) -> list[tuple[str, bool]]:
    """``(name, is a folder)`` of the root's entries; none if the root was deleted."""
    try:
        with tree.listing(_ROOT) as fd, os.scandir(fd) as entries:
            return [(e.name, e.is_dir(follow_symlinks=False)) for e in entries]
    except FileNotFoundError:
        return []


def walk(folder: Folder, known: set[str]) -> Walk:
    """List the chunk files, ``lstat``-ing only those whose key is not in ``known``."""
    found = Walk()
    with folder.use() as tree:
        for shard, is_dir in _subfolders(tree):
            if shard == TEMP_DIR:
                continue
            if not (SHARD_RE.match(shard) and is_dir):
                found.foreign += 1
                continue
            try:
                with tree.listing(shard) as fd:
                    _walk_shard(fd, shard, known, found)
            except OSError as exc:
                if exc.errno not in MISSING:  # deleted or replaced meanwhile
                    raise
    found.new.sort()
    return found


def _walk_shard(fd: int, shard: str, known: set[str], found: Walk) -> None:
    names = os.listdir(fd)
    found.seen.update(known.intersection(names))
    for name in set(names).difference(known):
        if not (is_valid_key(name) and shard_of(name) == shard):
            found.foreign += 1
            continue
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:  # deleted meanwhile
            continue
        if not stat.S_ISREG(st.st_mode):
            found.foreign += 1
            continue
        found.new.append((max(st.st_atime_ns, st.st_mtime_ns), name, st.st_size))


def shards(folder: Folder) -> list[str]:
    """The names of the shard folders, sorted."""
    with folder.use() as tree:
        return sorted(name for name, is_dir in _subfolders(tree) if SHARD_RE.match(name) and is_dir)


def keys_in(folder: Folder, shard: str, prefix: str) -> list[str]:
    """The keys starting with ``prefix`` whose files are in shard folder ``shard``."""
    with folder.use() as tree:
        try:
            with tree.listing(shard) as fd, os.scandir(fd) as files:
                return [
                    e.name
                    for e in files
                    if e.name.startswith(prefix)
                    and is_valid_key(e.name)
                    and shard_of(e.name) == shard
                    and e.is_file(follow_symlinks=False)
                ]
        except OSError as exc:
            if exc.errno not in MISSING:
                raise
            return []


def temp_is_stale(tmp: int, name: str, now: float) -> bool:
    """No writer holds the lock of temp file ``name`` (in folder ``tmp``; checked once
    it settled), or it is too old, or it is no regular file (no writer's)."""
    st = os.stat(name, dir_fd=tmp, follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        return not stat.S_ISDIR(st.st_mode)
    age = now - st.st_mtime
    if age > TEMP_GRACE_S:
        return True
    if age < TEMP_SETTLE_S:
        return False
    fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=tmp)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a live writer holds it, or locks are unsupported: wait for the grace
        return False
    finally:
        os.close(fd)
    return True


def remove_stale_temps(folder: Folder) -> tuple[int, int]:
    """Remove the temp files of dead writers; return ``(removed, foreign entries)``.
    A read-only folder is left as it is: ``(0, 0)``."""
    if not folder.writable:
        return 0, 0
    removed = foreign = 0
    now = time.time()
    with folder.use() as tree:
        tmp = tree.dir(TEMP_DIR)
        if tmp is None:
            return 0, 0
        with tree.listing(TEMP_DIR) as fd:
            names = os.listdir(fd)
        for name in names:
            if not _TEMP_RE.match(name):
                foreign += 1
                continue
            try:
                if temp_is_stale(tmp, name, now):
                    os.unlink(name, dir_fd=tmp)
                    removed += 1
            except FileNotFoundError:  # its writer finished meanwhile
                pass
    return removed, foreign
