"""Zero-copy reads that stay valid: pins in vineyardd for every blob this process views.

vineyardd frees a deleted blob at once, even while clients still map it (its own client
says "the deletion does not respect the reference count"), and reuses the memory for
the next blob. A view handed out by ``get_many`` (which the tier chain may keep, e.g. as
a promoted blob in the ``cpu`` tier) would then change under its reader. So:

* a reader pins each object before it trusts its bytes: it names it ``P pin/<object>/
  <holder>``, then checks that no ``P gc/<object>`` mark exists (a deleter may not have
  seen the pin otherwise: the view is dropped and the read is a miss);
* a deleter first takes the chunk's name away, marks the object ``P gc/<object>``, then
  lists its pins and frees it only when there are none
  (:mod:`~kvtier.backends.vineyard.reclaim`);
* the holder that drops the last pin of a marked object frees it.

One pin per object and process, counted here; it is dropped (by a worker thread) when the
last view of the object in this process is released. Pins of a process that died are
dropped by the next sweep on the host (:func:`~kvtier.backends.vineyard.names.holder_alive`).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kvtier.backends.vineyard.client import (
    MISSING,
    UNREACHABLE,
    VINEYARD_ERRORS,
    Client,
    Connection,
    ObjectID,
)
from kvtier.backends.vineyard.names import Names
from kvtier.core.buffers import Buffer

log = logging.getLogger(__name__)
_views_lock = threading.Lock()
Submit = Callable[[Callable[[], None]], None]
"""Runs a blocking call in a worker thread, without waiting for it."""


class LeasedView(Buffer):
    """A read-only, zero-copy view of one blob in vineyardd's shared memory.

    Keeps the blob's client alive (its mapping of the shared memory) and, with its
    :class:`Leases`, the pin that stops other processes from freeing the blob. Releasing
    the last reference lets the pin go.
    """

    __slots__ = ("_blob", "_client", "_leases", "_object_id")

    def __init__(self, blob: Any, client: Client, leases: Leases, object_id: int) -> None:
        view = memoryview(blob).cast("B")
        super().__init__(view, view.nbytes, None)
        self._blob = blob
        self._client = client
        self._leases = leases
        self._object_id = object_id

    def release(self) -> None:
        with _views_lock:
            super().release()
            last = self.refcount == 0
        if last:
            self._leases.release(self._object_id)


class Leases:
    """The objects this backend instance holds views of, and their pins in vineyardd.

    :meth:`acquire` runs in worker threads; :meth:`release` on any thread (it never
    blocks: the pin is dropped by ``submit``).
    """

    def __init__(self, connection: Connection, names: Names, holder: str) -> None:
        self.connection = connection
        self.names = names
        self.holder = holder
        self.submit: Submit | None = None
        """Where pins are dropped; ``None`` after the backend closed (then a thread of
        its own drops each)."""
        self._counts: dict[int, int] = {}
        """Object -> views in this process, plus acquisitions in flight."""
        self._pinned: set[int] = set()
        """Objects whose pin exists and passed the gc check."""
        self._counts_lock = threading.Lock()  # never held across a vineyard call
        self._pins_lock = threading.Lock()  # held across pin and unpin round trips

    @property
    def held(self) -> int:
        """Objects this instance holds views of."""
        with self._counts_lock:
            return len(self._counts)

    def acquire(self, client: Client, object_ids: list[int]) -> list[bool]:
        """Count a view of each object, pinning it first where this process has none;
        ``False`` where the object is being deleted (nothing is counted then)."""
        ok: list[bool] = []
        with self._pins_lock:
            for object_id in object_ids:
                with self._counts_lock:
                    self._counts[object_id] = self._counts.get(object_id, 0) + 1
                    pinned = object_id in self._pinned
                if pinned or self._pin(client, object_id):
                    ok.append(True)
                    continue
                ok.append(False)
                if self._uncount(object_id):
                    self._unpin(client, object_id)
        return ok

    def _pin(self, client: Client, object_id: int) -> bool:
        try:
            client.put_name(ObjectID(object_id), self.names.pin(object_id, self.holder))
        except MISSING:
            return False  # deleted since its name was read
        try:
            client.get_name(self.names.gc(object_id))
            return False  # marked for deletion: its deleter may not have seen the pin
        except MISSING:
            pass
        with self._counts_lock:
            self._pinned.add(object_id)
        return True

    def _uncount(self, object_id: int) -> bool:
        """Drop one count; whether it was the last (the pin should go)."""
        with self._counts_lock:
            left = self._counts[object_id] - 1
            if left:
                self._counts[object_id] = left
                return False
            del self._counts[object_id]
            self._pinned.discard(object_id)
            return True

    def release(self, object_id: int) -> None:
        """A view of ``object_id`` was released (any thread; does not block)."""
        with self._counts_lock:
            left = self._counts[object_id] - 1
            self._counts[object_id] = left
        if left == 0:
            submit = self.submit
            job = lambda: self._drop(object_id)  # noqa: E731
            if submit is not None:
                try:
                    submit(job)
                    return
                except Exception:  # closed meanwhile
                    pass
            threading.Thread(target=job, name="kvtier-vineyard-unpin", daemon=True).start()

    def _drop(self, object_id: int) -> None:
        """Unpin ``object_id`` unless it was viewed again meanwhile (worker thread)."""
        with self._pins_lock:
            with self._counts_lock:
                if self._counts.get(object_id, 0) > 0:
                    return
                self._counts.pop(object_id, None)
                self._pinned.discard(object_id)
            try:
                self._unpin(self.connection.client(), object_id)
            except Exception as exc:  # vineyardd gone: so are its pins; else the sweep
                log.debug("vineyard: dropping the pin of %x failed: %s", object_id, exc)

    def _unpin(self, client: Client, object_id: int) -> None:
        """Drop this holder's pin; free the object if it is marked and nobody else pins
        it (call under the pins lock)."""
        try:
            client.drop_name(self.names.pin(object_id, self.holder))
            client.get_name(self.names.gc(object_id))
        except MISSING:
            return  # not marked: nothing to free
        except UNREACHABLE:
            return
        if not client.list_names(self.names.pins_pattern(object_id), False, 1):
            free(client, self.names, object_id)


def free(client: Client, names: Names, object_id: int) -> None:
    """Delete a marked object with its blob, then its mark."""
    try:
        client.delete(ObjectID(object_id), False, True)
    except MISSING:
        pass
    except VINEYARD_ERRORS as exc:
        log.warning("vineyard: freeing object %x failed: %s", object_id, exc)
        return
    client.drop_name(names.gc(object_id))
