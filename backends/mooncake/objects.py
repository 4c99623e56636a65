"""How one backend's blobs map onto Mooncake objects, and what reads and writes share.

* A blob of two bytes or more is stored verbatim as the object named by its key.
* Mooncake stores no zero-length object, and a one-byte object cannot tell an empty
  blob from a one-byte one. So a *tiny* blob (0 or 1 byte) is a one-byte object under
  its key (``\\0`` for an empty blob) plus a one-byte marker object saying which it is:
  ``<key>#empty`` or ``<key>#byte`` (never chunk keys). Every stored blob thus has an
  object under its own key: ``CREATE`` reserves that one name, and a miss costs no
  look-up of markers.
* A tiny blob is written marker first: its marker, then its object, then the removal
  of the other marker. So a one-byte object with exactly one marker is that blob; with
  both it is a miss, left alone (a writer between its object and the removal); with
  none it is malformed, a state no writer passes through (a marker evicted, a writer of
  an older layout, a forged object), and a reader removes it. Objects larger than any
  blob are malformed too (:mod:`~kvtier.backends.mooncake.reads`).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kvtier.backends.mooncake.clients import SharedClient
from kvtier.backends.mooncake.codes import OBJECT_NOT_FOUND, check_reachable, retry_busy
from kvtier.core.buffers import Buffer, BufferPool

log = logging.getLogger(__name__)

EMPTY_MARKER = "#empty"
BYTE_MARKER = "#byte"
MARKERS = (EMPTY_MARKER, BYTE_MARKER)
TINY = 1
"""Objects of this size need a marker to be read."""
MAX_REMEMBERED_SIZES = 1 << 16
RECENT_SIZES = 32
"""How many of the last remembered sizes the guess for an unknown key looks at."""


def marker(key: str, nbytes: int) -> str:
    """The marker object of ``key`` holding a tiny blob of ``nbytes``."""
    return key + (EMPTY_MARKER if nbytes == 0 else BYTE_MARKER)


def other_marker(key: str, nbytes: int) -> str:
    """The marker object that must not exist while ``key`` holds a tiny blob of ``nbytes``."""
    return key + (BYTE_MARKER if nbytes == 0 else EMPTY_MARKER)


def all_markers(keys: Sequence[str]) -> list[str]:
    """Every marker name of ``keys``: first the ``#empty`` ones, then the ``#byte`` ones."""
    return [key + suffix for suffix in MARKERS for key in keys]


class SizeMemory:
    """Remembered object sizes (thread safe, bounded: the oldest entries go first), and
    a guess for keys never seen: the largest of the last few sizes (none before the
    first)."""

    def __init__(self, limit: int = MAX_REMEMBERED_SIZES) -> None:
        self._sizes: dict[str, int] = {}
        self._recent: deque[int] = deque(maxlen=RECENT_SIZES)
        self._limit = limit
        self._lock = threading.Lock()

    def expected(self, keys: Sequence[str]) -> list[int | None]:
        """The size to read each key with: remembered, else the guess."""
        with self._lock:
            guess = max(self._recent, default=None)
            return [self._sizes.get(k, guess) for k in keys]

    def remember(self, sizes: Mapping[str, int]) -> None:
        with self._lock:
            self._sizes.update(sizes)
            self._recent.extend(sizes.values())
            if len(self._sizes) > self._limit:
                for old in list(self._sizes)[: self._limit // 8]:
                    del self._sizes[old]

    def forget(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._sizes.pop(key, None)


@dataclass
class Counters:
    """What a backend counts, reported in ``stats().details`` (thread safe)."""

    hits: int = 0
    misses: int = 0
    rejected: int = 0
    key_errors: int = 0
    size_queries: int = 0
    """Batches with keys larger than expected, whose sizes were asked from the master."""
    malformed_removed: int = 0
    """Malformed objects a reader found and removed."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


@dataclass
class Objects:
    """What one backend's reads and writes share: its client, pool and bookkeeping."""

    client: SharedClient
    pool: BufferPool
    config: Any
    """The ``ReplicateConfig`` of every write."""
    filler: Buffer
    """One registered zero byte: an empty blob's object and every marker's content."""
    sizes: SizeMemory
    counters: Counters

    def store(self) -> Any:
        """The client's store after a health check; call in a worker thread."""
        return self.client.healthy()

    def remove(self, store: Any, names: list[str]) -> list[int]:
        """Force-remove objects (Mooncake otherwise refuses it for seconds after a read,
        its read lease); each one's code: ``0`` removed, ``OBJECT_NOT_FOUND`` absent,
        another code a failure (logged and counted)."""
        codes = retry_busy(
            lambda todo: store.batch_remove([names[i] for i in todo], True), len(names)
        )
        check_reachable("delete", codes)
        for name, code in zip(names, codes, strict=True):
            if code not in (0, OBJECT_NOT_FOUND):
                log.warning("mooncake: removing %s failed (code %d)", name, code)
                self.counters.add(key_errors=1)
        return codes
