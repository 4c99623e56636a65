"""Reads of one backend: blobs straight into pool buffers, and existence checks.

``batch_get_into`` needs a buffer as large as the object. Each key is read with its
remembered size (keys the backend wrote or read before), else a guess (the largest of
the last sizes it saw), so a batch of equal-sized chunks is one call even when cold,
and a miss needs no second call. Before the backend saw any size, and for keys whose
object turned out larger than expected, sizes are asked from the master
(``batch_get_replica_desc``, once a batch for each case). A blob read into a buffer
much larger than itself is copied into one of the right size, so a reader never holds
more memory than its blobs need.

Malformed objects are misses that the reader removes (best effort: a failure is
logged), counted as ``malformed_removed``: a one-byte object without a marker, which
no writer leaves even for a moment (see :mod:`~kvtier.backends.mooncake.objects`),
and an object larger than any blob (never read: it would only allocate). The removal
is not atomic with the read: an ``OVERWRITE`` that replaces such an object in between
can be lost (a later miss, never wrong bytes); a ``CREATE``, what the tier chain
writes with, is refused while the object exists.

All methods block: call them in the backend's worker threads.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kvtier.backends.mooncake.codes import ABSENT, INVALID_PARAMS, UNREACHABLE, check_reachable
from kvtier.backends.mooncake.objects import TINY, Objects, all_markers
from kvtier.core.blob import MAX_BLOB_BYTES
from kvtier.core.buffers import Buffer, address_of
from kvtier.core.errors import BackendError, KVTierError

log = logging.getLogger(__name__)

WASTE_LIMIT = 2
"""A read buffer over this many times (and a page over) its blob's size is swapped for
a fitting copy."""
PAGE = 4096
MAX_OBJECT_BYTES = MAX_BLOB_BYTES
"""Larger objects are no blobs: malformed."""


class Reader:
    """Reads one backend's blobs (see the module docstring)."""

    def __init__(self, objects: Objects) -> None:
        self._o = objects

    def get(self, keys: list[str]) -> list[Buffer | None]:
        """The blobs of ``keys`` (unique), each a reference the caller owns; ``None`` for
        a miss."""
        store = self._o.store()
        found: dict[str, Buffer] = {}
        malformed: list[str] = []
        try:
            expected = zip(keys, self._o.sizes.expected(keys), strict=True)
            sizes = {key: n for key, n in expected if n is not None}
            if len(sizes) < len(keys):
                unknown = [k for k in keys if k not in sizes]
                sizes.update(self._query_sizes(store, unknown, malformed))
            # A key without a size is absent; one gone since its size was asked, too.
            outgrown = self._read_into(store, [k for k in keys if k in sizes], sizes, found)
            if outgrown:
                sizes = self._query_sizes(store, outgrown, malformed)
                again = self._read_into(store, [k for k in outgrown if k in sizes], sizes, found)
                self._o.counters.add(key_errors=len(again))  # outgrew its size twice
            tiny = [key for key, buf in found.items() if buf.nbytes == TINY]
            if tiny:
                malformed += self._resolve_tiny(store, tiny, found)
        except BaseException:
            for buf in found.values():
                buf.release()
            raise
        hits = len(found)
        self._o.counters.add(hits=hits, misses=len(keys) - hits)
        if malformed:
            self._remove(store, malformed)
        return [found.get(key) for key in keys]

    def contains(self, keys: list[str]) -> list[bool]:
        """Whether each key holds a blob."""
        return exist(self._o.store(), keys)

    def _remove(self, store: Any, keys: list[str]) -> None:
        """Remove the objects of ``keys``, found malformed; log a failure."""
        try:
            codes = self._o.remove(store, keys)
        except KVTierError as exc:
            log.warning("mooncake: could not remove %d malformed objects: %s", len(keys), exc)
            return
        self._o.sizes.forget(keys)
        removed = [key for key, code in zip(keys, codes, strict=True) if code == 0]
        if removed:
            log.warning("mooncake: removed malformed objects %s", removed)
            self._o.counters.add(malformed_removed=len(removed))

    def _query_sizes(self, store: Any, keys: list[str], malformed: list[str]) -> dict[str, int]:
        """Sizes of the stored ``keys`` from the master; absent keys are left out, and
        so are objects larger than any blob, which are added to ``malformed``."""
        self._o.counters.add(size_queries=1)
        sizes = {}
        for key, replicas in store.batch_get_replica_desc(keys).items():
            for replica in replicas:
                if replica.is_memory_replica():
                    sizes[key] = int(replica.get_memory_descriptor().buffer_descriptor.size)
                    break
                if replica.is_disk_replica():
                    sizes[key] = int(replica.get_disk_descriptor().object_size)
                    break
        for key in [k for k, n in sizes.items() if n > MAX_OBJECT_BYTES]:
            del sizes[key]
            malformed.append(key)
        return sizes

    def _read_into(
        self, store: Any, keys: list[str], sizes: Mapping[str, int], found: dict[str, Buffer]
    ) -> list[str]:
        """Read ``keys`` into pool buffers of their ``sizes`` (adding hits to ``found``);
        returns the keys whose object is larger."""
        if not keys:
            return []
        bufs = [self._o.pool.acquire(sizes[k]) for k in keys]
        try:
            codes = store.batch_get_into(
                keys, [address_of(b.block) for b in bufs], [b.capacity for b in bufs]
            )
        except BaseException:
            for buf in bufs:
                buf.release()
            raise
        outgrown, absent = [], []
        for key, buf, code in zip(keys, bufs, codes, strict=True):
            if code >= 0:
                found[key] = self._fitted(buf, code)
                continue
            buf.release()
            if code == INVALID_PARAMS:
                outgrown.append(key)
            elif code in ABSENT:
                absent.append(key)
            elif code not in UNREACHABLE:
                log.warning("mooncake: reading %s failed (code %d)", key, code)
                self._o.counters.add(key_errors=1)
        self._o.sizes.remember({k: found[k].nbytes for k in keys if k in found})
        self._o.sizes.forget(absent)
        check_reachable("get", codes)
        return outgrown

    def _fitted(self, buf: Buffer, nbytes: int) -> Buffer:
        """``buf`` holding ``nbytes``, or a fitting copy if ``buf`` is far too large."""
        buf.resize(nbytes)
        if buf.capacity <= WASTE_LIMIT * max(nbytes, PAGE):
            return buf
        try:
            return self._o.pool.copy_of(buf.view)
        finally:
            buf.release()

    def _resolve_tiny(self, store: Any, keys: list[str], found: dict[str, Buffer]) -> list[str]:
        """Turn one-byte objects into the blob their marker says, or a miss; returns
        the keys of those without a marker (malformed)."""
        marked = exist(store, all_markers(keys))
        n = len(keys)
        unmarked = []
        for key, empty, byte in zip(keys, marked[:n], marked[n:], strict=True):
            if empty == byte:  # both: a write is removing the other marker
                found.pop(key).release()
                if not empty:
                    unmarked.append(key)
            elif empty:
                found[key].resize(0)
        return unmarked


def exist(store: Any, names: list[str]) -> list[bool]:
    """Whether each object exists; raises if the master is unreachable."""
    codes = store.batch_is_exist(names)
    check_reachable("exists", codes)
    for code in codes:
        if code < 0:
            raise BackendError(f"mooncake: checking whether keys exist failed (code {code})")
    return [code == 1 for code in codes]
