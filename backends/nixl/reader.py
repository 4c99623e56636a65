"""Peer reads of the ``nixl`` tier: find which agent holds a chunk, READ it, verify it.

A key is located through this reader's memory of recent locations
(:mod:`.locations`) or the group's index; the owner's NIXL metadata is loaded when
the entry needs a newer generation than the one loaded here; the chunk is READ from
the owner's memory straight into a pool buffer and verified
(:func:`kvtier.core.blob.verify`: framing, checksum, and the key in the header must
be the key asked for). A stale entry (owner gone, chunk evicted and its memory
reused, a read that fails or exceeds ``transfer_timeout``) is therefore a miss,
never wrong data; a remembered location that fails is looked up once more.

Malformed index entries are misses that the reader removes from the index (best
effort: a failure is logged), counted as ``malformed_removed``: an entry that names no
location (not ``gen:address:nbytes``, or a length no blob has; owners publish only
blobs), one whose generation is newer than any metadata its owner published (owners
publish both in one transaction, so it points nowhere), one whose memory holds no
blob of its key (stale), and an owner's record that is incomplete or whose metadata
NIXL refuses or names another agent. Each is removed only if it is still as the
reader found it, so what an owner wrote since stays. A stale entry may be one its
owner is about to withdraw (it evicted the chunk and reused the memory): removing it
first changes nothing, unless the owner stored that chunk at that very address again
meanwhile, which costs peers that chunk (a miss, never wrong bytes) until the owner
next publishes in full. An owner whose record was removed publishes it and its entries
again at its next write or heartbeat.

Transfers and verification run in the tier's worker threads, never on the event
loop. A batch for one peer is split into up to ``width`` groups read in parallel;
each group moves about :data:`PART_BYTES` per transfer, and a moved part is verified
in another worker while the next part moves.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from functools import partial

from kvtier.backends.nixl.agent import Outcome, PeerAgent
from kvtier.backends.nixl.index import Entry, Location, PeerIndex, Record
from kvtier.backends.nixl.locations import LocationCache
from kvtier.core.blob import verify
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import Buffer, BufferPool, address_of, release_all
from kvtier.core.errors import ChunkCorruptedError, KVTierError

log = logging.getLogger(__name__)

PART_BYTES = 8 << 20
"""Bytes per transfer when a group is read: verifying one part overlaps the next."""
REMEMBERED_LOCATIONS = 1 << 16
"""Peer chunk locations a reader remembers (each for ``ttl`` seconds)."""

Moved = list[tuple[str, Location, Buffer]]
"""Chunks read into pool buffers, by key and where they were read from (the holder owns
one reference to each buffer)."""


def _release_moved(moved: Moved | None) -> None:
    release_all(buf for _, _, buf in moved or ())


def _parts(located: list[tuple[str, Location]]) -> Iterator[list[tuple[str, Location]]]:
    """``located`` in runs of about :data:`PART_BYTES` (at least one chunk each)."""
    part: list[tuple[str, Location]] = []
    nbytes = 0
    for item in located:
        part.append(item)
        nbytes += item[1].nbytes
        if nbytes >= PART_BYTES:
            yield part
            part, nbytes = [], 0
    if part:
        yield part


async def _union(reads: Iterable[Awaitable[dict[str, Buffer]]]) -> dict[str, Buffer]:
    """What ``reads`` (run together) found. If one fails, the others still finish, what
    they found is released and the first failure raised."""
    results = await asyncio.gather(*reads, return_exceptions=True)
    found: dict[str, Buffer] = {}
    for result in results:
        if not isinstance(result, BaseException):
            found |= result
    failures = [result for result in results if isinstance(result, BaseException)]
    if failures:
        release_all(found.values())
        raise failures[0]
    return found


class PeerReader:
    """Reads the chunks other agents of the group hold, in ``workers``, into ``pool``
    buffers; see the module docstring. Counts into ``counts`` (``remote_hits``,
    ``remote_misses``, ``remote_bytes``, ``stale``, ``transfer_failures``,
    ``malformed_removed``)."""

    def __init__(
        self,
        agent: PeerAgent,
        index: PeerIndex,
        pool: BufferPool,
        workers: BlockingPool,
        *,
        ttl: float,
        transfer_timeout: float,
        concurrency: int,
        counts: dict[str, int],
    ) -> None:
        self._agent = agent
        self._index = index
        self._pool = pool
        self._workers = workers
        self._transfer_timeout = transfer_timeout
        self._concurrency = concurrency
        self._counts = counts
        self._locations = LocationCache(REMEMBERED_LOCATIONS, ttl)
        self._lock = threading.Lock()
        """Guards what worker threads change: ``transfer_failures`` and the quarantine."""
        self._quarantine: list[Buffer] = []
        """Buffers a transfer that could not be cancelled may still write: never reused."""
        self._stale: list[Entry] = []
        """Stale entries the checks found, to remove (guarded by ``_lock``)."""

    async def locate(
        self, keys: Sequence[str], *, remembered: bool = True
    ) -> list[tuple[Location | None, bool]]:
        """Each key's location and whether it was remembered (else the index named it)."""
        known = self._locations.get_many(keys) if remembered else [None] * len(keys)
        ask = [i for i, location in enumerate(known) if location is None]
        fresh: list[Location | None] = []
        if ask:
            fresh, malformed = await self._index.locate([keys[i] for i in ask])
            await self._drop(malformed)
        self._locations.put_many(
            (keys[i], location) for i, location in zip(ask, fresh, strict=True) if location
        )
        out = [(location, True) for location in known]
        for i, location in zip(ask, fresh, strict=True):
            out[i] = (location, False)
        return out

    async def fetch(self, keys: list[str]) -> dict[str, Buffer]:
        """Verified blobs of ``keys`` read from the peers holding them. Keys whose
        remembered location failed are located again in the index and read once more."""
        located = await self.locate(keys)
        found = await self._read_located(keys, [location for location, _ in located])
        retry = [k for k, (_, known) in zip(keys, located, strict=True) if known and k not in found]
        try:
            await self._drop_stale()
            if retry:
                self._locations.forget(retry)
                again = await self.locate(retry, remembered=False)
                found |= await self._read_located(retry, [location for location, _ in again])
                await self._drop_stale()
        except BaseException:
            release_all(found.values())
            raise
        self._counts["remote_hits"] += len(found)
        self._counts["remote_misses"] += len(keys) - len(found)
        self._counts["remote_bytes"] += sum(buf.nbytes for buf in found.values())
        return found

    async def _drop(self, entries: Sequence[Entry]) -> None:
        """Remove malformed ``entries`` from the index (those still as found)."""
        if not entries:
            return
        try:
            removed = await self._index.drop_entries(entries)
        except KVTierError as exc:
            log.warning("%s: could not remove malformed index entries: %s", self._index.url, exc)
            return
        self._locations.forget([e.key for e in entries])
        if removed:
            log.warning("%s: removed %d malformed index entries", self._index.url, removed)
            self._counts["malformed_removed"] += removed

    async def _drop_stale(self) -> None:
        with self._lock:
            stale, self._stale = self._stale, []
        await self._drop(stale)

    async def _drop_record(self, record: Record) -> None:
        """Remove an agent's malformed record from the index if it is still as found."""
        try:
            removed = await self._index.drop_record(record)
        except KVTierError as exc:
            log.warning("%s: could not remove a malformed record: %s", self._index.url, exc)
            return
        self._locations.forget_agent(record.agent)
        if removed:
            log.warning("%s: removed the malformed record of %s", self._index.url, record.agent)
            self._counts["malformed_removed"] += 1

    async def _read_located(
        self, keys: Sequence[str], locations: Sequence[Location | None]
    ) -> dict[str, Buffer]:
        """Read each located key from its peer, loading newer peer metadata first."""
        by_peer: dict[str, list[tuple[str, Location]]] = {}
        for key, location in zip(keys, locations, strict=True):
            if location is not None:
                by_peer.setdefault(location.agent, []).append((key, location))
        if not by_peer:
            return {}
        outdated = [
            peer
            for peer, items in by_peer.items()
            if max(location.gen for _, location in items) > self._agent.peer_gen(peer)
        ]
        records = await self._index.metadata(outdated) if outdated else {}
        deadline = time.monotonic() + self._transfer_timeout
        width = max(1, self._concurrency // len(by_peer))
        return await _union(
            self._read_peer(peer, records.get(peer), items, width, deadline)
            for peer, items in by_peer.items()
        )

    async def _read_peer(
        self,
        peer: str,
        record: Record | None,
        located: list[tuple[str, Location]],
        width: int,
        deadline: float,
    ) -> dict[str, Buffer]:
        """Load ``peer``'s newer metadata ``record`` if given, then read ``located`` in
        up to ``width`` groups in parallel. A malformed record, and entries newer than
        the record, are removed."""
        if record is not None:
            parsed = record.parsed
            load = None if parsed is None else partial(self._agent.load_peer, peer, *parsed)
            if load is None or not await self._workers.run(load):
                await self._drop_record(record)
                return {}
            assert parsed is not None
            await self._drop(
                [Entry.of(k, loc, below=loc.gen) for k, loc in located if loc.gen > parsed[0]]
            )
        groups = [located[i::width] for i in range(min(width, len(located)))]
        return await _union(self._read_group(peer, group, deadline) for group in groups)

    async def _read_group(
        self, peer: str, group: list[tuple[str, Location]], deadline: float
    ) -> dict[str, Buffer]:
        """Read ``group`` part after part, each verified while the next one moves (the
        last one by the thread that moved it); stop at the first failed transfer."""
        usable = [(k, loc) for k, loc in group if self._agent.peer_gen(peer) >= loc.gen]
        parts = list(_parts(usable))
        verified: Moved = []
        try:
            unchecked: Moved = []  # moved by the last transfer, not verified yet
            for i, part in enumerate(parts):
                last = i + 1 == len(parts)
                calls: list[Callable[[], Moved | None]] = [
                    partial(self._transfer, peer, part, deadline, check=last)
                ]
                if unchecked:  # handed over to the check
                    calls.append(partial(self._check, unchecked))
                moved, *checked = await self._workers.run_all(calls, orphan=_release_moved)
                for intact in checked:
                    verified += intact or []
                if moved is None:
                    break
                if last:
                    verified += moved
                unchecked = moved
        except BaseException:
            _release_moved(verified)
            raise
        return {key: buf for key, _, buf in verified}

    def _transfer(
        self, peer: str, part: list[tuple[str, Location]], deadline: float, *, check: bool
    ) -> Moved | None:
        """One READ of ``part`` into pool buffers (a worker thread), verified too with
        ``check``; ``None`` if it failed or the deadline passed."""
        if time.monotonic() >= deadline:
            return None
        bufs = [self._pool.acquire(location.nbytes) for _, location in part]
        pairs = [
            (address_of(buf.block), location.address, location.nbytes)
            for buf, (_, location) in zip(bufs, part, strict=True)
        ]
        outcome = self._agent.read(peer, pairs, deadline)
        if outcome is Outcome.DONE:
            moved = [(key, loc, buf) for (key, loc), buf in zip(part, bufs, strict=True)]
            return self._check(moved) if check else moved
        with self._lock:
            self._counts["transfer_failures"] += 1
            if outcome is Outcome.STUCK:
                self._quarantine.extend(bufs)
        if outcome is not Outcome.STUCK:
            release_all(bufs)
        self._agent.forget_peer(peer)
        self._locations.forget_agent(peer)
        return None

    def _check(self, moved: Moved) -> Moved:
        """The blobs that are intact and carry the key they were read for (a worker
        thread); the others are released, counted as stale and their entries kept for
        removal."""
        intact: Moved = []
        for key, location, buf in moved:
            try:
                verify(buf.view, expected_key=key)
            except ChunkCorruptedError:
                buf.release()
                with self._lock:
                    self._counts["stale"] += 1
                    self._stale.append(Entry.of(key, location))
                continue
            intact.append((key, location, buf))
        return intact
