"""The ``nixl`` tier: a bounded RAM store whose chunks peers read through NIXL.

Local half, like ``cpu://``: ``put_many`` keeps the buffer it is given (retained, no
copy) when it is a block of the tier's pool, else copies it into one; eviction by the
configured policy within ``capacity``; evicted blobs go to ``demotion_sink``.

Shared half: the pool's memory is registered with this process's NIXL agent, and
each stored chunk is published in the group's index (:mod:`.index`) as
``key -> (agent, address, length)``, withdrawn on delete, eviction and close. A key
missing here is looked up in the index (locations are remembered for ``ttl`` seconds,
:mod:`.locations`) and READ from the owner's memory straight into a pool buffer, then
verified: framing, checksum, and the key in the blob header must equal the key asked
for. A stale entry (owner gone, chunk evicted and memory reused, a read that fails or
exceeds ``transfer_timeout``) is therefore a miss, never wrong data; a remembered
location that fails is looked up once more. Remote hits are returned, not stored
here (the chain promotes them).

Failures: an operation that needs the index raises ``BackendUnavailableError`` when it
is unreachable (the chain then skips the tier for a while); local hits need no index.
Index changes that could not be written are kept and written by the next operation
or heartbeat; a heartbeat that finds this agent's record gone (the index restarted)
publishes everything again. ``iter_keys`` and ``stats`` cover this process's chunks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import TypeVar

from kvtier.backends.nixl import NixlOptions, group_from_url, redact
from kvtier.backends.nixl.agent import Outcome, PeerAgent
from kvtier.backends.nixl.index import Location, PeerIndex
from kvtier.backends.nixl.locations import LocationCache
from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode
from kvtier.core.blob import MAX_HEADER_BYTES, MAX_STAGE_BYTES, verify
from kvtier.core.buffers import Buffer, BufferPool, address_of
from kvtier.core.errors import (
    BackendUnavailableError,
    ChunkCorruptedError,
    ConfigError,
    KVTierError,
)
from kvtier.core.keys import validate_keys
from kvtier.core.plugins import PluginRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")

MIN_BLOB_BYTES = 28
"""No valid blob is shorter (prefix + checksum): shorter entries are not read."""
MAX_BLOB_BYTES = MIN_BLOB_BYTES + MAX_HEADER_BYTES + MAX_STAGE_BYTES
"""No valid blob is longer: longer entries are not read."""
CLOSE_TIMEOUT_S = 5.0
"""Longest wait for the index when closing (the entries expire anyway)."""
PART_BYTES = 8 << 20
"""Bytes per transfer when a batch is read: verifying one part overlaps the next."""
REMEMBERED_LOCATIONS = 1 << 16
"""Peer chunk locations a reader remembers (each for ``ttl`` seconds)."""
_COUNTERS = (
    "hits",
    "misses",
    "rejected",
    "remote_hits",
    "remote_misses",
    "remote_bytes",
    "stale",
    "transfer_failures",
    "index_errors",
    "copied_in",
)


def _release_all(buffers: Iterable[Buffer | None]) -> None:
    for buf in buffers:
        if buf is not None:
            buf.release()


def _release_found(found: dict[str, Buffer]) -> None:
    _release_all(found.values())


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


async def _iterate(keys: Iterable[str]) -> AsyncIterator[str]:
    for key in keys:
        yield key


def agent_name() -> str:
    """A name no other agent of the group has: host, pid and a random part."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())
    return f"kvtier-{host[:40]}-{os.getpid()}-{secrets.token_hex(4)}"


class NixlBackend(Backend):
    """The ``nixl`` tier; see the module docstring. Thread safe (one lock around the
    local store); index writes are serialised on the event loop it is opened in."""

    capabilities = Capabilities(
        persistent=False,
        shared=True,
        bounded=True,
        listing=True,
        create_mode=True,
        hands_over_evictions=True,
    )
    options: NixlOptions

    def __init__(
        self,
        url: str,
        options: NixlOptions,
        *,
        capacity: int | None = None,
        pool: BufferPool | None = None,
        registry: PluginRegistry | None = None,
    ) -> None:
        super().__init__(url, options, capacity=capacity, pool=pool, registry=registry)
        self.group = group_from_url(url)
        if capacity is None or capacity <= 0:
            raise ConfigError(
                f"the nixl tier {url!r} needs a positive capacity (RAM shared with peers): "
                "set e.g. 'capacity: 4GiB' on the tier"
            )
        self._capacity = capacity
        self._policy = self.registry.eviction_policy(options.eviction).load()()
        self.name = agent_name()
        self._lock = threading.Lock()
        self._blobs: dict[str, Buffer] = {}
        self._entries: dict[str, str] = {}
        """Key -> index value of every stored chunk (what a full publish writes)."""
        self._pending: dict[str, str | None] = {}
        """Index changes not written yet: key -> value, or ``None`` to delete."""
        self._resync = True
        """Publish every entry and the metadata at the next flush (open, index restart)."""
        self._needed_gen = -1
        """Metadata generation the stored entries need in the index."""
        self._published_gen = -1
        self._bytes = 0
        self._evictions = 0
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._quarantine: list[Buffer] = []
        """Buffers a transfer that could not be cancelled may still write: never reused."""
        self._locations = LocationCache(REMEMBERED_LOCATIONS, options.ttl)
        self._agent: PeerAgent | None = None
        self._index: PeerIndex | None = None
        self._executor: ThreadPoolExecutor | None = None
        """Threads for NIXL calls other than transfers."""
        self._transfers: ThreadPoolExecutor | None = None
        """One thread per UCX worker: NIXL binds each transferring thread to a worker."""
        self._verifiers: ThreadPoolExecutor | None = None
        """Threads verifying what the transfer threads moved."""
        self._flush_lock: asyncio.Lock | None = None
        self._heartbeat: asyncio.Task[None] | None = None

    # -- lifetime ----------------------------------------------------------------------

    async def open(self) -> None:
        """Create the agent and register the pool (once), then connect to the index and
        publish. Raises ``BackendUnavailableError`` while the index is unreachable;
        calling ``open`` again retries."""
        self._check_open()
        if self._executor is None:
            concurrency = self.options.concurrency
            self._executor = ThreadPoolExecutor(2, thread_name_prefix="kvtier-nixl")
            self._transfers = ThreadPoolExecutor(concurrency, thread_name_prefix="kvtier-nixl-read")
            self._verifiers = ThreadPoolExecutor(concurrency, thread_name_prefix="kvtier-nixl-ok")
        if self._agent is None:
            agent = await self._offload(
                partial(
                    PeerAgent,
                    self.name,
                    net_devices=self.options.net_devices,
                    workers=self.options.concurrency,
                    progress_thread=self.options.progress_thread,
                )
            )
            await self._offload(partial(self.pool.add_registrar, agent))
            self._agent = agent
        if self._index is None:
            self._index = PeerIndex(self.options.index, self.group, self.name, self.options.ttl)
            self._flush_lock = asyncio.Lock()
        await self._index.ping()
        await self._flush()
        if self._heartbeat is None:
            self._heartbeat = asyncio.get_running_loop().create_task(self._beat())

    async def close(self) -> None:
        """Withdraw from the index (best effort: entries expire anyway), release every
        stored buffer, deregister the pool and drop the agent."""
        if self._closed:
            return
        await super().close()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._index is not None:
            try:
                await asyncio.wait_for(self._index.withdraw(), CLOSE_TIMEOUT_S)
            except (KVTierError, asyncio.TimeoutError) as exc:
                log.info("%s: leaving the index failed (entries expire): %r", self.url, exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._index.close(), CLOSE_TIMEOUT_S)
        with self._lock:
            blobs, self._blobs = self._blobs, {}
            for key in blobs:
                self._policy.remove(key)
            self._entries.clear()
            self._pending.clear()
            self._bytes = 0
        _release_all(blobs.values())
        agent, self._agent = self._agent, None
        executor, self._executor = self._executor, None
        transfers, self._transfers = self._transfers, None
        verifiers, self._verifiers = self._verifiers, None
        loop = asyncio.get_running_loop()
        for pool in (transfers, verifiers):  # waits for reads still running
            if pool is not None:
                await loop.run_in_executor(None, pool.shutdown)
        if executor is not None:
            if agent is not None:
                await loop.run_in_executor(executor, self.pool.remove_registrar, agent)
                await loop.run_in_executor(executor, agent.close)
            await loop.run_in_executor(None, executor.shutdown)

    def _ready(self) -> tuple[PeerAgent, PeerIndex]:
        self._check_open()
        if self._agent is None or self._index is None:
            raise BackendUnavailableError(f"{self.url}: not open; await backend.open() first")
        return self._agent, self._index

    # -- the Backend API ---------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        validate_keys(keys)
        self._ready()
        out: list[Buffer | None] = []
        missing: list[str] = []
        with self._lock:
            for key in keys:
                buf = self._blobs.get(key)
                if buf is None:
                    self._counts["misses"] += 1
                    missing.append(key)
                    out.append(None)
                else:
                    self._counts["hits"] += 1
                    self._policy.touch(key)
                    out.append(buf.retain())
        if not missing:
            return out
        try:
            fetched = await self._fetch(list(dict.fromkeys(missing)))
        except BaseException:
            _release_all(out)
            raise
        seen: set[str] = set()
        for i, key in enumerate(keys):
            buf = fetched.get(key)
            if out[i] is None and buf is not None:
                out[i] = buf.retain() if key in seen else buf
                seen.add(key)
        return out

    async def put_many(
        self, items: Sequence[tuple[str, Buffer]], mode: PutMode = PutMode.OVERWRITE
    ) -> list[bool]:
        validate_keys(key for key, _ in items)
        agent, _ = self._ready()
        results: list[bool] = []
        evicted: list[tuple[str, int]] = []
        handed: list[Buffer] = []
        with self._lock:
            self._check_open()
            for key, buf in items:
                exists = key in self._blobs
                if exists and mode is PutMode.CREATE:
                    results.append(False)
                    continue
                if buf.nbytes > self._capacity:
                    self._counts["rejected"] += 1
                    results.append(False)
                    continue
                owned, location = self._own(agent, buf)
                if exists:
                    self._drop(key)
                while self._bytes + owned.nbytes > self._capacity:
                    victim = self._policy.victim()
                    assert victim is not None, "policy is empty while bytes are in use"
                    handed.append(self._blobs[victim].retain())
                    evicted.append((victim, self._drop(victim)))
                self._blobs[key] = owned
                self._bytes += owned.nbytes
                self._policy.insert(key)
                if location is not None:
                    self._entries[key] = self._pending[key] = location.entry
                    self._needed_gen = max(self._needed_gen, location.gen)
                results.append(True)
            self._evictions += len(evicted)
        self._evicted(evicted, handed)
        if any(results) or evicted:
            await self._flush()
        return results

    async def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored here or, as far as this process knows, by a peer."""
        validate_keys(keys)
        self._ready()
        with self._lock:
            found = [key in self._blobs for key in keys]
        unknown = [i for i, hit in enumerate(found) if not hit]
        if unknown:
            where = await self._locate([keys[i] for i in unknown])
            for i, (location, _) in zip(unknown, where, strict=True):
                found[i] = location is not None
        return found

    async def delete_many(self, keys: Sequence[str]) -> list[bool]:
        validate_keys(keys)
        self._ready()
        results = []
        with self._lock:
            self._check_open()
            for key in keys:
                exists = key in self._blobs
                if exists:
                    self._drop(key)
                results.append(exists)
        if any(results):
            await self._flush()
        return results

    def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        """A snapshot of the keys stored in this process, taken at the call."""
        with self._lock:
            self._check_open()
            return _iterate([key for key in self._blobs if key.startswith(prefix)])

    async def stats(self) -> BackendStats:
        with self._lock:
            self._check_open()
            return BackendStats(
                keys=len(self._blobs),
                bytes_used=self._bytes,
                capacity_bytes=self._capacity,
                evictions=self._evictions,
                details={
                    "agent": self.name,
                    "group": self.group,
                    "index": redact(self.options.index),
                    "eviction": self.options.eviction,
                    "unpublished": len(self._pending) + (len(self._entries) if self._resync else 0),
                    **self._counts,
                },
            )

    # -- local store -------------------------------------------------------------------

    def _own(self, agent: PeerAgent, buf: Buffer) -> tuple[Buffer, Location | None]:
        """A reference to a buffer with ``buf``'s bytes that peers can read (``buf``
        itself if it is a registered pool block, else a copy in one) and its location;
        ``None`` if the pool's memory could not be registered (the chunk stays local)."""
        region = agent.region_of(buf)
        if region is None:
            self._counts["copied_in"] += 1
            buf = self.pool.copy_of(buf.view)
            region = agent.region_of(buf)
        else:
            buf.retain()
        if region is None:
            return buf, None
        gen, address = region
        return buf, Location(self.name, gen, address, buf.nbytes)

    def _drop(self, key: str) -> int:
        """Forget stored ``key``, withdraw its entry and release its buffer; returns its
        size. Call under the lock."""
        buf = self._blobs.pop(key)
        if self._entries.pop(key, None) is not None:
            self._pending[key] = None
        self._policy.remove(key)
        self._bytes -= buf.nbytes
        buf.release()
        return buf.nbytes

    # -- index -------------------------------------------------------------------------

    async def _flush(self) -> None:
        """Write the pending index changes (all entries after a resync), with the
        agent's metadata when an entry needs a newer generation than the index has."""
        agent, index = self._ready()
        assert self._flush_lock is not None
        async with self._flush_lock:
            with self._lock:
                full, needed = self._resync, self._needed_gen
                pending, self._pending = self._pending, {}
                changes: dict[str, str | None] = dict(self._entries) if full else pending
            if not full and not changes:
                return
            metadata = None
            if full or needed > self._published_gen:
                metadata = await self._offload(agent.metadata)
            sets = {key: value for key, value in changes.items() if value is not None}
            deletes = [key for key, value in changes.items() if value is None]
            try:
                recorded = await index.publish(sets, deletes, metadata, full=full)
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
            await self._flush()

    async def _beat(self) -> None:
        """Renew this agent's TTLs every ``ttl / 3`` seconds; publish again in full when
        the index lost our record, and write changes an earlier failure left."""
        assert self._index is not None
        while True:
            await asyncio.sleep(self.options.ttl / 3)
            try:
                if not await self._index.heartbeat():
                    with self._lock:
                        self._resync = True
                await self._flush()
            except KVTierError as exc:
                with self._lock:
                    self._counts["index_errors"] += 1
                log.debug("%s: heartbeat failed: %s", self.url, exc)
            except Exception:  # keep beating: peers drop a silent agent after ttl
                log.exception("%s: heartbeat failed unexpectedly", self.url)

    # -- peer reads --------------------------------------------------------------------

    async def _locate(
        self, keys: Sequence[str], *, remembered: bool = True
    ) -> list[tuple[Location | None, bool]]:
        """Each key's location and whether it was remembered (else the index named it)."""
        _, index = self._ready()
        known = self._locations.get_many(keys) if remembered else [None] * len(keys)
        ask = [i for i, location in enumerate(known) if location is None]
        fresh = await index.locate([keys[i] for i in ask]) if ask else []
        self._locations.put_many(
            (keys[i], location) for i, location in zip(ask, fresh, strict=True) if location
        )
        out = [(location, True) for location in known]
        for i, location in zip(ask, fresh, strict=True):
            out[i] = (location, False)
        return out

    async def _fetch(self, keys: list[str]) -> dict[str, Buffer]:
        """Verified blobs of ``keys`` read from the peers holding them. Keys whose
        remembered location failed are located again in the index and read once more."""
        agent, _ = self._ready()
        located = await self._locate(keys)
        found = await self._read_located(agent, keys, [loc for loc, _ in located])
        retry = [k for k, (_, known) in zip(keys, located, strict=True) if known and k not in found]
        if retry:
            self._locations.forget(retry)
            again = await self._locate(retry, remembered=False)
            found |= await self._read_located(agent, retry, [loc for loc, _ in again])
        with self._lock:
            self._counts["remote_hits"] += len(found)
            self._counts["remote_misses"] += len(keys) - len(found)
            self._counts["remote_bytes"] += sum(buf.nbytes for buf in found.values())
        return found

    async def _read_located(
        self, agent: PeerAgent, keys: Sequence[str], locations: Sequence[Location | None]
    ) -> dict[str, Buffer]:
        """Read each located key from its peer, loading newer peer metadata first."""
        _, index = self._ready()
        by_peer: dict[str, list[tuple[str, Location]]] = {}
        for key, location in zip(keys, locations, strict=True):
            if location is not None and MIN_BLOB_BYTES <= location.nbytes <= MAX_BLOB_BYTES:
                by_peer.setdefault(location.agent, []).append((key, location))
        if not by_peer:
            return {}
        outdated = [
            peer
            for peer, items in by_peer.items()
            if max(loc.gen for _, loc in items) > agent.peer_gen(peer)
        ]
        records = await index.metadata(outdated) if outdated else {}
        deadline = time.monotonic() + self.options.transfer_timeout
        width = max(1, self.options.concurrency // len(by_peer))
        parts = await asyncio.gather(
            *(
                self._fetch_peer(agent, peer, records.get(peer), items, width, deadline)
                for peer, items in by_peer.items()
            )
        )
        return {key: buf for part in parts for key, buf in part.items()}

    async def _fetch_peer(
        self,
        agent: PeerAgent,
        peer: str,
        record: tuple[int, bytes] | None,
        located: list[tuple[str, Location]],
        width: int,
        deadline: float,
    ) -> dict[str, Buffer]:
        """Load ``peer``'s newer metadata ``record`` if given, then read ``located`` in
        up to ``width`` parallel transfers."""
        if record is not None and not await self._offload(partial(agent.load_peer, peer, *record)):
            return {}
        groups = [located[i::width] for i in range(min(width, len(located)))]
        parts = await asyncio.gather(
            *(
                self._offload(
                    partial(self._read, agent, peer, group, deadline),
                    _release_found,
                    transfers=True,
                )
                for group in groups
            )
        )
        return {key: buf for part in parts for key, buf in part.items()}

    def _read(
        self, agent: PeerAgent, peer: str, group: list[tuple[str, Location]], deadline: float
    ) -> dict[str, Buffer]:
        """Read ``group``'s chunks from ``peer`` (a transfer thread), about
        :data:`PART_BYTES` per transfer; each part is verified in the verify threads
        while the next one moves. Stops at the first failed transfer."""
        usable = [(k, loc) for k, loc in group if agent.peer_gen(peer) >= loc.gen]
        parts = list(_parts(usable))
        checks: list[Future[dict[str, Buffer]]] = []
        found: dict[str, Buffer] = {}
        try:
            for i, part in enumerate(parts):
                moved = self._transfer(agent, peer, part, deadline)
                if moved is None:
                    break
                if i + 1 == len(parts):  # nothing left to overlap with
                    found = self._verify(moved)
                else:
                    assert self._verifiers is not None
                    checks.append(self._verifiers.submit(self._verify, moved))
        finally:
            for check in checks:
                found |= check.result()
        return found

    def _transfer(
        self, agent: PeerAgent, peer: str, part: list[tuple[str, Location]], deadline: float
    ) -> list[tuple[str, Buffer]] | None:
        """One READ of ``part`` into pool buffers; ``None`` if it failed or timed out."""
        if time.monotonic() >= deadline:
            return None
        bufs = [self.pool.acquire(loc.nbytes) for _, loc in part]
        pairs = [
            (address_of(buf.block), loc.address, loc.nbytes)
            for buf, (_, loc) in zip(bufs, part, strict=True)
        ]
        outcome = agent.read(peer, pairs, deadline)
        if outcome is Outcome.DONE:
            return [(key, buf) for (key, _), buf in zip(part, bufs, strict=True)]
        if outcome is Outcome.STUCK:
            with self._lock:
                self._quarantine.extend(bufs)
        else:
            _release_all(bufs)
        agent.forget_peer(peer)
        self._locations.forget_agent(peer)
        with self._lock:
            self._counts["transfer_failures"] += 1
        return None

    def _verify(self, moved: list[tuple[str, Buffer]]) -> dict[str, Buffer]:
        """The blobs that are intact and carry the key they were read for; the others
        are released and counted as stale."""
        out = {}
        for key, buf in moved:
            try:
                intact = verify(buf.view).key == key
            except ChunkCorruptedError:
                intact = False
            if intact:
                out[key] = buf
            else:
                buf.release()
                with self._lock:
                    self._counts["stale"] += 1
        return out

    # -- plumbing ----------------------------------------------------------------------

    async def _offload(
        self,
        call: Callable[[], T],
        on_orphan: Callable[[T], None] | None = None,
        *,
        transfers: bool = False,
    ) -> T:
        """Run ``call`` in the tier's threads (its transfer threads with ``transfers``).
        If the caller is cancelled, the call still finishes (a thread cannot be
        interrupted) and ``on_orphan`` gets its result."""
        executor = self._transfers if transfers else self._executor
        if executor is None:
            raise BackendUnavailableError(f"{self.url}: not open; await backend.open() first")
        future = asyncio.get_running_loop().run_in_executor(executor, call)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            if on_orphan is not None:
                future.add_done_callback(
                    lambda f: None if f.cancelled() or f.exception() else on_orphan(f.result())
                )
            raise
