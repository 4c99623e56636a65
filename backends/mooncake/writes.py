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
* A tiny blob (see :mod:`~kvtier.backends.mooncake.objects`) writes its marker before
  its object and removes the other marker after, so that no write ever passes through
  a one-byte object without a marker (which readers remove as malformed); readers see
  the old value or a miss until the new one is whole. A tiny blob whose object or
  removal fails after its marker was written leaves its key absent, never with both
  markers.
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
        marked = self._mark(store, items)
        go = [i for i, ok in enumerate(marked) if ok]
        objects = self._objects([items[i] for i in go])
        names = [name for name, _ in objects]
        sizes = [buf.nbytes for _, buf in objects]
        with self._staged(objects) as addresses:
            codes = self._upsert(store, names, addresses, sizes)
        stored = [False] * len(items)
        for i, ok in zip(go, self._written("put", names, codes), strict=True):
            stored[i] = ok
        return self._finish(store, items, stored, marked)

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
            filled, marked = self._fill(reserved, [objects[i] for i in go], store)
            for i, ok in zip(go, self._finish(store, reserved, filled, marked), strict=True):
                stored[i] = ok
        return stored

    def delete(self, keys: list[str]) -> list[bool]:
        """Remove each key's object and markers; whether the key held a blob."""
        self._o.sizes.forget(keys)
        codes = self._o.remove(self._o.store(), [*keys, *all_markers(keys)])
        return [code == 0 for code in codes[: len(keys)]]

    def _objects(self, items: Items) -> list[tuple[str, Buffer]]:
        """The object to write for each blob: itself, or a zero byte for an empty one."""
        return [(key, buf if buf.nbytes else self._o.filler) for key, buf in items]

    def _fill(
        self, items: Items, objects: list[tuple[str, Buffer]], store: Any
    ) -> tuple[list[bool], list[bool]]:
        """Write the markers of tiny blobs, move the bytes of objects reserved by put
        sessions and end the sessions (revoking those not moved); whether each object
        was written, and whether each blob's marker was (see :meth:`_mark`)."""
        names = [name for name, _ in objects]
        sizes = [buf.nbytes for _, buf in objects]
        moved = [False] * len(objects)
        try:
            marked = self._mark(store, items)
            go = [i for i, ok in enumerate(marked) if ok]
            with self._staged([objects[i] for i in go]) as addresses:
                counts = store.batch_put_from_multi_buffer_ranges(
                    [names[i] for i in go],
                    [[a] for a in addresses],
                    [[sizes[i]] for i in go],
                    [[0]] * len(go),
                )
            for i, count in zip(go, counts, strict=True):
                moved[i] = count == sizes[i]
            failures = len(go) - sum(moved)
            if failures:
                check_reachable("create", counts)
                log.warning("mooncake: transferring %d new keys failed: %s", failures, counts)
                self._o.counters.add(key_errors=failures)
        finally:
            failed = [name for name, ok in zip(names, moved, strict=True) if not ok]
            if failed:
                store.batch_put_session_revoke(failed)
        done = [name for name, ok in zip(names, moved, strict=True) if ok]
        ended = iter(self._written("create", done, store.batch_put_session_end(done)))
        return [ok and next(ended) for ok in moved], marked

    def _mark(self, store: Any, items: Items) -> list[bool]:
        """Before the objects are written: write the marker of each tiny blob; whether
        each blob may be written (``False`` where its marker could not be)."""
        marked = [True] * len(items)
        tiny = [i for i, (_, buf) in enumerate(items) if buf.nbytes <= TINY]
        if tiny:
            names = [marker(items[i][0], items[i][1].nbytes) for i in tiny]
            filler = [address_of(self._o.filler.block)] * len(names)
            codes = self._upsert(store, names, filler, [TINY] * len(names))
            for i, ok in zip(tiny, self._written("put", names, codes), strict=True):
                marked[i] = ok
        return marked

    def _finish(
        self, store: Any, items: Items, stored: list[bool], marked: list[bool]
    ) -> list[bool]:
        """After the objects were written: remove the other marker of each tiny blob;
        where that fails, or the object was not written after its marker was, remove the
        key's object and markers (so no key is left with both markers), and the write
        fails. Remember the sizes; whether each blob was written."""
        stored = list(stored)
        tiny = [i for i, (_, buf) in enumerate(items) if buf.nbytes <= TINY and marked[i]]
        done = [i for i in tiny if stored[i]]
        if done:
            others = [other_marker(items[i][0], items[i][1].nbytes) for i in done]
            for i, code in zip(done, self._o.remove(store, others), strict=True):
                stored[i] = code in (0, OBJECT_NOT_FOUND)
        broken = [items[i][0] for i in tiny if not stored[i]]
        if broken:
            self._o.remove(store, [*broken, *all_markers(broken)])
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
