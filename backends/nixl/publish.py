"""Keeps the group's index in step with the chunks this process's ``nixl`` tier holds.

Each stored chunk that peers can read in place has an entry ``key -> (gen, address,
nbytes)`` in the index (:mod:`.index`). :meth:`Publisher.changed` records every change
of the local store as it happens (under the store's lock); :meth:`Publisher.flush`
writes what is pending in one transaction, with the agent's NIXL metadata when an
entry needs a newer generation than the index has. Changes that could not be
written are kept and written by the next flush or heartbeat; a heartbeat that finds
this agent's record gone (the index restarted) publishes every entry again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable

from kvtier.backends.nixl.index import Location, PeerIndex
from kvtier.core.errors import BackendUnavailableError, KVTierError

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0
"""Longest wait for the index when closing (the entries expire anyway)."""
Metadata = Callable[[], Awaitable[tuple[int, bytes]]]
"""Reads the agent's ``(generation, metadata)`` (off the event loop)."""


class Publisher:
    """The index entries of one agent: recorded from any thread, written from the event
    loop the tier was opened in. ``counts["index_errors"]`` counts failed writes."""

    def __init__(self, url: str, counts: dict[str, int]) -> None:
        self.url = url
        self._counts = counts
        self._lock = threading.Lock()
        self._entries: dict[str, str] = {}
        """Key -> index value of every published chunk (what a full publish writes)."""
        self._pending: dict[str, str | None] = {}
        """Index changes not written yet: key -> value, or ``None`` to delete."""
        self._resync = True
        """Publish every entry and the metadata at the next flush (open, index restart)."""
        self._needed_gen = -1
        """Metadata generation the entries need in the index."""
        self._published_gen = -1
        self._index: PeerIndex | None = None
        self._metadata: Metadata | None = None
        self._flush_lock = asyncio.Lock()
        self._heartbeat: asyncio.Task[None] | None = None
        self._closing = False

    def changed(self, key: str, location: Location | None) -> None:
        """``key`` is now stored at ``location`` (``None``: gone, or not readable by
        peers). Never blocks: a :data:`~kvtier.backends.ram.Changed` callback."""
        with self._lock:
            if location is not None:
                self._entries[key] = self._pending[key] = location.entry
                self._needed_gen = max(self._needed_gen, location.gen)
            elif self._entries.pop(key, None) is not None:
                self._pending[key] = None

    @property
    def unpublished(self) -> int:
        """Changes not in the index yet (every entry while a full publish is due)."""
        with self._lock:
            return len(self._pending) + (len(self._entries) if self._resync else 0)

    async def open(self, index: PeerIndex, metadata: Metadata, ttl: float) -> None:
        """Use ``index``, publish everything, and renew the entries every ``ttl / 3``
        seconds from now on. Raises ``BackendUnavailableError`` while the index is
        unreachable; calling ``open`` again retries."""
        self._index, self._metadata = index, metadata
        await index.ping()
        await self.flush()
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat(index, ttl / 3))

    async def flush(self) -> None:
        """Write the pending changes (every entry after a resync)."""
        if self._index is None or self._metadata is None:
            raise BackendUnavailableError(f"{self.url}: not open; await backend.open() first")
        async with self._flush_lock:
            with self._lock:
                full, needed = self._resync, self._needed_gen
                pending, self._pending = self._pending, {}
                changes: dict[str, str | None] = dict(self._entries) if full else pending
            if not full and not changes:
                return
            try:
                metadata = None
                if full or needed > self._published_gen:
                    metadata = await self._metadata()
                sets = {key: value for key, value in changes.items() if value is not None}
                deletes = [key for key, value in changes.items() if value is None]
                recorded = await self._index.publish(sets, deletes, metadata, full=full)
            except BaseException:
                with self._lock:
                    for key, value in pending.items():
                        self._pending.setdefault(key, value)
                self._counts["index_errors"] += 1
                raise
            if metadata is not None:
                self._published_gen = metadata[0]
            with self._lock:
                self._resync = not recorded or (self._resync and not full)
        if not recorded:  # the index lost our record since the last heartbeat
            await self.flush()

    async def _beat(self, index: PeerIndex, interval: float) -> None:
        """Renew this agent's TTLs; publish again in full when the index lost our
        record, and write changes an earlier failure left."""
        while not self._closing:  # a redis-py pipeline may swallow a cancel: check too
            await asyncio.sleep(interval)
            try:
                if not await index.heartbeat():
                    with self._lock:
                        self._resync = True
                await self.flush()
            except KVTierError as exc:
                self._counts["index_errors"] += 1
                log.debug("%s: heartbeat failed: %s", self.url, exc)
            except Exception:  # keep beating: peers drop a silent agent after ttl
                log.exception("%s: heartbeat failed unexpectedly", self.url)

    async def close(self) -> None:
        """Stop the heartbeat and withdraw every entry (best effort: they expire anyway)."""
        self._closing = True
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.cancel()
            await asyncio.wait({heartbeat}, timeout=CLOSE_TIMEOUT_S)
        index, self._index = self._index, None
        if index is None:
            return
        try:
            await asyncio.wait_for(index.withdraw(), CLOSE_TIMEOUT_S)
        except (KVTierError, asyncio.TimeoutError) as exc:
            log.info("%s: leaving the index failed (entries expire): %r", self.url, exc)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(index.close(), CLOSE_TIMEOUT_S)
