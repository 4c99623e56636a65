"""Writes and deletes of one backend, zero copy from pool buffers.

* ``OVERWRITE`` is Mooncake's upsert (``batch_upsert_from``): a value of the same size
  is rewritten in place, another size is reallocated. Readers see the old or the new
  value, or a miss while it is written; a reader racing an in-place rewrite by a
  *different* value of the same size can read a mix, which the chain's checksum turns
  into a miss (kvtier rewrites a key only with the same chunk).
* ``CREATE`` reserves the keys with put sessions, which the master refuses for an
  existing key (atomic between writers, also between backends sharing a client), then
  moves the bytes and ends the sessions: like an upsert, one master call before and
  one after the transfer, with no look-up first.
* A tiny blob (see :mod:`~kvtier.backends.mooncake.objects`) also removes its other
  marker before its object is written and writes its own marker after, so readers
  see a miss until both are in place.
* Deletes force the removal of a key's object and markers: Mooncake otherwise refuses
  it for seconds after a read (its read lease).
* A buffer from outside the pool's registered memory is copied into the pool first.

All methods block: call them in the backend's worker threads.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from kvtier.backends.mooncake.codes import (
    FULL,
    INVALID_PARAMS,
    OBJECT_ALREADY_EXISTS,
    OBJECT_NOT_FOUND,
    check_reachable,
    retry_busy,
)
from kvtier.backends.mooncake.objects import TINY, Objects, all_markers, marker, other_marker
from kvtier.core.buffers import Buffer, address_of

log = logging.getLogger(__name__)
Items = Sequence[tuple[str, Buffer]]


class Writer:
    """Writes and deletes one backend's blobs (see the module docstring)."""

    def __init__(self, objects: Objects) -> None:
        self._o = objects

    def overwrite(self, items: Items) -> list[bool]:
        """Store each blob, replacing what its key held."""
        store = self._o.store()
        self._unmark(store, items)
        objects = self._objects(items)
        names = [name for name, _ in objects]
        sizes = [buf.nbytes for _, buf in objects]
        with self._staged(objects) as addresses:
            codes = self._upsert(store, names, addresses, sizes)
        return self._finish(store, items, self._written("put", names, codes))

    def create(self, items: Items) -> list[bool]:
        """Store each blob whose key holds none (``False`` for the others)."""
        store = self._o.store()
        objects = self._objects(items)
        names = [name for name, _ in objects]
        codes = store.batch_put_session_start(
            names, [buf.nbytes for _, buf in objects], self._o.config
        )
        # INVALID_PARAMS: another CREATE through this process's client holds the key.
        codes = [OBJECT_ALREADY_EXISTS if code == INVALID_PARAMS else code for code in codes]
        go = [i for i, ok in enumerate(self._written("create", names, codes)) if ok]
        stored = [False] * len(items)
        if go:
            reserved = [items[i] for i in go]
            filled = self._fill(reserved, [objects[i] for i in go], store)
            for i, ok in zip(go, self._finish(store, reserved, filled), strict=True):
                stored[i] = ok
        return stored

    def delete(self, keys: list[str]) -> list[bool]:
        """Remove each key's object and markers; whether the key held a blob."""
        self._o.sizes.forget(keys)
        return self._remove(self._o.store(), [*keys, *all_markers(keys)])[: len(keys)]

    def _objects(self, items: Items) -> list[tuple[str, Buffer]]:
        """The object to write for each blob: itself, or a zero byte for an empty one."""
        return [(key, buf if buf.nbytes else self._o.filler) for key, buf in items]

    def _fill(self, items: Items, objects: list[tuple[str, Buffer]], store: Any) -> list[bool]:
        """Move the bytes of objects reserved by put sessions and end the sessions
        (revoking those whose transfer failed); whether each object was written."""
        names = [name for name, _ in objects]
        sizes = [buf.nbytes for _, buf in objects]
        moved = [False] * len(objects)
        try:
            self._unmark(store, items)
            with self._staged(objects) as addresses:
                counts = store.batch_put_from_multi_buffer_ranges(
                    names, [[a] for a in addresses], [[n] for n in sizes], [[0]] * len(names)
                )
            moved = [count == size for count, size in zip(counts, sizes, strict=True)]
            if not all(moved):
                check_reachable("create", counts)
                failures = moved.count(False)
                log.warning("mooncake: transferring %d new keys failed: %s", failures, counts)
                self._o.counters.add(key_errors=failures)
        finally:
            failed = [name for name, ok in zip(names, moved, strict=True) if not ok]
            if failed:
                store.batch_put_session_revoke(failed)
        done = [name for name, ok in zip(names, moved, strict=True) if ok]
        ended = iter(self._written("create", done, store.batch_put_session_end(done)))
        return [ok and next(ended) for ok in moved]

    def _unmark(self, store: Any, items: Items) -> None:
        """Before tiny blobs are written: remove the marker of the other kind."""
        others = [other_marker(key, buf.nbytes) for key, buf in items if buf.nbytes <= TINY]
        if others:
            self._remove(store, others)

    def _finish(self, store: Any, items: Items, stored: list[bool]) -> list[bool]:
        """After the objects were written: write the markers of tiny blobs (where that
        fails, the object goes too, and so does the write) and remember the sizes;
        whether each blob was written."""
        tiny = [i for i, (_, buf) in enumerate(items) if stored[i] and buf.nbytes <= TINY]
        if tiny:
            names = [marker(items[i][0], items[i][1].nbytes) for i in tiny]
            filler = [address_of(self._o.filler.block)] * len(names)
            codes = self._upsert(store, names, filler, [TINY] * len(names))
            marked = self._written("put", names, codes)
            unmarked = [items[i][0] for i, ok in zip(tiny, marked, strict=True) if not ok]
            if unmarked:  # a one-byte object without its marker would be a miss
                self._remove(store, unmarked)
            stored = list(stored)
            for i, ok in zip(tiny, marked, strict=True):
                stored[i] = ok
        outcome = list(zip(items, stored, strict=True))
        self._o.sizes.remember({key: max(buf.nbytes, TINY) for (key, buf), ok in outcome if ok})
        self._o.sizes.forget(key for (key, _), ok in outcome if not ok)
        return stored

    def _upsert(
        self, store: Any, names: list[str], addresses: list[int], sizes: list[int]
    ) -> list[int]:
        """Codes of upserting each object from registered memory, retrying busy keys."""
        return retry_busy(
            lambda todo: store.batch_upsert_from(
                [names[i] for i in todo],
                [addresses[i] for i in todo],
                [sizes[i] for i in todo],
                self._o.config,
            ),
            len(names),
        )

    @contextlib.contextmanager
    def _staged(self, objects: list[tuple[str, Buffer]]) -> Iterator[list[int]]:
        """Addresses of the objects' bytes in registered memory: each buffer's own, or a
        pool copy's where it lies outside (the copies are released on exit)."""
        copies = []
        addresses = []
        for _, buf in objects:
            address = self._o.client.address(buf)
            if address is None:
                copy = self._o.pool.copy_of(buf.view)
                copies.append(copy)
                address = address_of(copy.block)
            addresses.append(address)
        try:
            yield addresses
        finally:
            for copy in copies:
                copy.release()

    def _written(self, what: str, names: Sequence[str], codes: Sequence[int]) -> list[bool]:
        """Whether each object was written; counts rejections and failures, and raises
        if the master was unreachable."""
        check_reachable(what, codes)
        for name, code in zip(names, codes, strict=True):
            if code in FULL:
                self._o.counters.add(rejected=1)
            elif code not in (0, OBJECT_ALREADY_EXISTS):
                log.warning("mooncake: writing %s failed (code %d)", name, code)
                self._o.counters.add(key_errors=1)
        return [code == 0 for code in codes]

    def _remove(self, store: Any, names: list[str]) -> list[bool]:
        """Force-remove objects; whether each existed."""
        codes = retry_busy(
            lambda todo: store.batch_remove([names[i] for i in todo], True), len(names)
        )
        check_reachable("delete", codes)
        removed = []
        for name, code in zip(names, codes, strict=True):
            if code not in (0, OBJECT_NOT_FOUND):
                log.warning("mooncake: removing %s failed (code %d)", name, code)
                self._o.counters.add(key_errors=1)
            removed.append(code == 0)
        return removed


class LentBlobs:
    """References to blobs lent to a write that runs in a worker thread, released once:
    by the write once it ran, or by its caller when it gave up before the write started
    (cancelled while queued, or the backend closed)."""

    def __init__(self, bufs: Sequence[Buffer]) -> None:
        self.bufs = [buf.retain() for buf in bufs]
        self._lock = threading.Lock()
        self._state = "lent"

    def take(self) -> bool:
        """Called by the write as it starts: ``False`` if the caller already gave up."""
        with self._lock:
            if self._state != "lent":
                return False
            self._state = "taken"
            return True

    def give_up(self) -> None:
        """Called by the caller on failure or cancellation: releases unless taken."""
        with self._lock:
            if self._state != "lent":
                return
            self._state = "dropped"
        self.release()

    def release(self) -> None:
        for buf in self.bufs:
            buf.release()
