"""The ``nixl`` tier: a bounded RAM store whose chunks peers read through NIXL.

Local half, like ``cpu://``: a :class:`~kvtier.backends.ram.RamStore` that keeps the
buffer ``put_many`` is given (retained, no copy) when it is a block of the tier's
pool, else a copy in one (made in the tier's worker threads); eviction by the
configured policy within ``capacity``; evicted blobs go to ``demotion_sink``. Local
hits are trusted like the ``cpu`` tier's: they are the buffers the chain stored.

Shared half: the pool's memory is registered with this process's NIXL agent
(:mod:`.agent`), and each stored chunk is published in the group's index
(:mod:`.publish`, :mod:`.index`), withdrawn on delete, eviction and close. A key
missing here is read from the peer holding it and verified (:mod:`.reader`); remote
hits are returned, not stored here (the chain promotes them). Index entries a reader
finds malformed (naming no location, or no memory of its owner, or memory that holds
no blob of their key) are misses that it removes from the index, counted as
``malformed_removed`` (:mod:`.reader` says why that is safe).

Failures: an operation that needs the index raises ``BackendUnavailableError`` when it
is unreachable (the chain then skips the tier for a while); local hits need no index.
``iter_keys`` and ``stats`` cover this process's chunks.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import socket
from collections.abc import AsyncIterator
from functools import partial

from kvtier.backends.expiring import stop
from kvtier.backends.nixl import NixlOptions, group_from_url
from kvtier.backends.nixl.agent import PeerAgent
from kvtier.backends.nixl.index import Location, PeerIndex
from kvtier.backends.nixl.publish import Publisher
from kvtier.backends.nixl.reader import PeerReader
from kvtier.backends.ram import CAPABILITIES, RamPins, RamStore, iterate
from kvtier.core.backend import Backend, BackendStats, PutMode
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import Buffer, BufferPool, release_all
from kvtier.core.errors import BackendError, BackendUnavailableError
from kvtier.core.pins import check_budget
from kvtier.core.urls import redact

log = logging.getLogger(__name__)

_COUNTERS = (
    "remote_hits",
    "remote_misses",
    "remote_bytes",
    "stale",
    "transfer_failures",
    "index_errors",
    "copied_in",
    "malformed_removed",
)
"""Counters of the tier beyond its store's (``hits``, ``misses``, ``rejected``)."""


def agent_name() -> str:
    """A name no other agent of the group has: host, pid and a random part."""
    host = "".join(c if c.isalnum() or c in "-_." else "-" for c in socket.gethostname())
    return f"kvtier-{host[:40]}-{os.getpid()}-{secrets.token_hex(4)}"


def _close_agent(pool: BufferPool, agent: PeerAgent) -> None:
    pool.remove_registrar(agent)
    agent.close()


class NixlBackend(RamPins, Backend):
    """The ``nixl`` tier; see the module docstring. :attr:`store` holds this process's
    chunks; index writes are serialised on the event loop it is opened in."""

    # Not ``shared``: peers read each other's chunks, but each process owns its own
    # (a CREATE or delete acts on this process's chunks only).
    capabilities = CAPABILITIES
    options: NixlOptions
    options_model = NixlOptions

    def _configure(self) -> None:
        self.group = group_from_url(self.url)
        assert self.capacity is not None  # bounded: checked by Backend
        self.name = agent_name()
        self._counts = dict.fromkeys(_COUNTERS, 0)
        self._publisher = Publisher(self.url, self._counts)
        policy = self.registry.eviction_policy(self.options.eviction).load()()
        check_budget(self.safe_url, self.options.pinned_bytes, self.capacity)
        self.store = RamStore(
            self.capacity,
            policy,
            self._evicted,
            changed=self._changed,
            ttl=self.options.chunk_ttl,
            pinned_bytes=self.options.pinned_bytes,
        )
        """This process's chunks; :attr:`RamStore.blobs` is the mapping itself."""
        self._agent: PeerAgent | None = None
        self._index: PeerIndex | None = None
        self._reader: PeerReader | None = None
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifetime ----------------------------------------------------------------------

    async def _open(self) -> None:
        """Create the agent and register the pool (once), then connect to the index and
        publish. Raises ``BackendUnavailableError`` while the index is unreachable;
        calling ``open`` again retries."""
        workers = self._start_workers(2 * self.options.concurrency)
        if self._agent is None:
            agent = await self._blocking(
                partial(
                    PeerAgent,
                    self.name,
                    net_devices=self.options.net_devices,
                    workers=workers.threads,  # one UCX worker per thread that reads
                    progress_thread=self.options.progress_thread,
                ),
                orphan=PeerAgent.close,
            )
            await self._blocking(partial(self.pool.add_registrar, agent))
            self._agent = agent
        if self._index is None:
            self._index = PeerIndex(self.options.index, self.group, self.name, self.options.ttl)
        if self._reader is None:
            self._reader = PeerReader(
                self._agent,
                self._index,
                self.pool,
                workers,
                ttl=self.options.ttl,
                transfer_timeout=self.options.transfer_timeout,
                concurrency=self.options.concurrency,
                counts=self._counts,
            )
        await self._publisher.open(
            self._index, partial(self._blocking, self._agent.metadata), self.options.ttl
        )
        if self.options.chunk_ttl is not None and self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        """Every ``chunk_ttl / 4`` s (at most 1 min), remove the oldest expired chunks."""
        assert self.options.chunk_ttl is not None
        while True:
            await asyncio.sleep(min(max(self.options.chunk_ttl / 4, 0.05), 60.0))
            await self.sweep_expired()

    async def sweep_expired(self) -> int:
        """Remove up to 256 of the oldest expired chunks and withdraw them from the
        index; how many went."""
        gone = self.store.sweep()
        await self._flush_dropped()
        return gone

    async def _flush_dropped(self) -> None:
        """Publish what expiry changed (expired chunks leave the index); if the index
        fails, the changes stay pending for the next flush or heartbeat."""
        if self.options.chunk_ttl is not None and self._publisher.unpublished:
            try:
                await self._publisher.flush()
            except BackendError as exc:
                log.info("%s: publishing expired chunks failed: %s", self.safe_url, exc)

    async def _close(self) -> None:
        """Withdraw from the index (best effort: entries expire anyway), release every
        stored buffer, deregister the pool and drop the agent (no read is running)."""
        if self._sweeper is not None:
            await stop(self._sweeper)
            self._sweeper = None
        await self._publisher.close()
        self.store.clear()
        agent, self._agent = self._agent, None
        if agent is not None:
            await asyncio.to_thread(_close_agent, self.pool, agent)

    def _ready(self) -> tuple[PeerAgent, PeerReader, BlockingPool]:
        if self._agent is None or self._reader is None or self.workers is None:
            raise BackendUnavailableError(f"{self.safe_url}: not open; await backend.open() first")
        return self._agent, self._reader, self.workers

    # -- the Backend hooks -------------------------------------------------------------

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        _, reader, _ = self._ready()
        out = self.store.get_many(keys)
        await self._flush_dropped()
        missing = [key for key, buf in zip(keys, out, strict=True) if buf is None]
        if not missing:
            return out
        try:
            fetched = await reader.fetch(missing)
        except BaseException:
            release_all(out)
            raise
        return [
            fetched.get(key) if buf is None else buf for key, buf in zip(keys, out, strict=True)
        ]

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        agent, _, workers = self._ready()
        owned = await self._owned(agent, workers, items, mode)
        try:
            results = self.store.put_many(owned, mode)
        finally:
            copies = zip(owned, items, strict=True)
            release_all(mine for (_, mine), (_, given) in copies if mine is not given)
        if any(results):  # evictions happen only when something is stored
            await self._publisher.flush()
        return results

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        """Whether each key is stored here or, as far as this process knows, by a peer."""
        _, reader, _ = self._ready()
        found = self.store.contains_many(keys)
        await self._flush_dropped()
        unknown = [i for i, hit in enumerate(found) if not hit]
        if unknown:
            where = await reader.locate([keys[i] for i in unknown])
            for i, (location, _) in zip(unknown, where, strict=True):
                found[i] = location is not None
        return found

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        self._ready()
        results = self.store.delete_many(keys)
        if any(results):
            await self._publisher.flush()
        return results

    def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        """A snapshot of the keys stored in this process, taken at the call."""
        return iterate(self.store.keys(prefix))

    async def _stats(self) -> BackendStats:
        return self.store.stats(
            agent=self.name,
            group=self.group,
            index=redact(self.options.index),
            eviction=self.options.eviction,
            unpublished=self._publisher.unpublished,
            **self._counts,
        )

    # -- local store -------------------------------------------------------------------

    async def _owned(
        self,
        agent: PeerAgent,
        workers: BlockingPool,
        items: list[tuple[str, Buffer]],
        mode: PutMode,
    ) -> list[tuple[str, Buffer]]:
        """``items`` with each blob that peers cannot read in place (not a registered
        pool block) replaced by a copy in the pool, made in the workers; the caller
        releases the copies. Blobs the store will refuse are not copied."""
        refused = [False] * len(items)
        if mode is PutMode.CREATE:
            refused = self.store.contains_many([key for key, _ in items])
        copy = [
            i
            for i, ((_, buf), skip) in enumerate(zip(items, refused, strict=True))
            if not skip and buf.nbytes <= self.store.capacity and agent.region_of(buf) is None
        ]
        if not copy:
            return items
        self._counts["copied_in"] += len(copy)
        copies = await workers.run_all(
            [partial(self.pool.copy_of, items[i][1].view) for i in copy], orphan=Buffer.release
        )
        owned = list(items)
        for i, buf in zip(copy, copies, strict=True):
            owned[i] = (items[i][0], buf)
        return owned

    def _changed(self, key: str, buf: Buffer | None) -> None:
        """The store changed ``key`` (under its lock): record the index entry (none for
        a value no peer could read as a blob)."""
        region = None if buf is None or self._agent is None else self._agent.region_of(buf)
        location = None
        if buf is not None and region is not None:
            location = Location(self.name, region[0], region[1], buf.nbytes)
        self._publisher.changed(key, location if location and location.readable else None)
