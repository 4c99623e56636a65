"""The ``file`` tier's URL and options."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field

from kvtier.core.config import ByteSize
from kvtier.core.errors import ConfigError


class FileOptions(BaseModel):
    """Options of the ``file`` tier."""

    model_config = ConfigDict(extra="forbid")

    eviction: str = "lru"
    """Name of the eviction policy plugin (``lru``, ``lfu``, ...)."""
    fsync: bool = False
    """fsync each file and its folder after writing: survives power loss, slower."""
    o_direct: bool = False
    """Bypass the page cache with O_DIRECT (the filesystem must support it)."""
    threads: int = Field(default=4, ge=1, le=64)
    """Threads doing the tier's blocking file I/O: a batch's chunks are read and written
    by up to this many threads at once (each moving 1 MiB of it at least), and all
    batches together use no more."""
    rescan_interval: float = Field(default=2.0, ge=0, allow_inf_nan=False)
    """Seconds between rescans of the folder, made before a write, that count the
    chunks other processes wrote or deleted; 0 turns them off (see the package doc)."""
    ttl: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds a chunk lives after it was written (by any process); expired chunks are
    misses, removed when met and by a sweep (see :mod:`kvtier.backends.file.expiry`)."""
    pinned_bytes: ByteSize = 0
    """Bytes of chunks ``pin_many`` may pin (never evicted nor expired by this process);
    at most the capacity."""
    read_only: bool = False
    """Open an existing folder to read it and change nothing: ``open()`` makes no folder
    (a missing one is a :class:`ConfigError` naming it), evicts and removes nothing,
    reads leave access times alone, and ``put_many``/``delete_many`` raise
    :class:`ConfigError`. For inspection (``kvtier ls``, ``kvtier stats``) and for
    folders other processes fill."""


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
