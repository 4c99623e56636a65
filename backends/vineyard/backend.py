"""The ``vineyard`` tier's backend (options and URL: :mod:`kvtier.backends.vineyard`).

* Writes copy each blob once, from the caller's buffer into a blob vineyardd allocates
  in its shared memory (over RPC: sent from the caller's buffer), then publish it by
  naming its object (:mod:`~kvtier.backends.vineyard.names`): a reader sees the whole
  chunk or nothing. ``OVERWRITE`` renames the key to the new object and reclaims the
  old one; ``CREATE`` is a check then a write (vineyard has no put-if-absent for names).
* Reads on the host (IPC) return zero-copy :class:`~kvtier.backends.vineyard.leases.
  LeasedView` s of the shared memory, pinned so that no process frees them while they
  live; the tier chain verifies each blob's checksum once, on that view. Reads over
  RPC, or of a blob held by another host's vineyardd (a distributed deployment), are
  copies fetched over RPC.
* Capacity: the tier's chunks (all processes together) are kept within ``capacity``;
  a write that would exceed it first evicts the oldest chunks (by creation time) down
  to ``evict_to`` of it. vineyardd's own ``--size`` also bounds the store: a write it
  cannot hold evicts the oldest chunks and tries again once, then is ``False``.
* Errors: vineyardd unreachable (stopped, restarted, socket gone) is
  :class:`BackendUnavailableError`, and the next call connects again; a restarted
  vineyardd is empty. Anything else vineyard refuses is :class:`BackendError`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any, TypeVar

from kvtier.backends.expiring import ChunkExpiry
from kvtier.backends.vineyard import VineyardOptions
from kvtier.backends.vineyard import objects as obj
from kvtier.backends.vineyard import reclaim as rec
from kvtier.backends.vineyard.client import FULL, Client, Connection, ObjectID
from kvtier.backends.vineyard.leases import LeasedView, Leases
from kvtier.backends.vineyard.names import Names, new_holder
from kvtier.backends.vineyard.pins import VineyardPins, drop_pins
from kvtier.backends.vineyard.url import Target, parse_url
from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode
from kvtier.core.buffers import Buffer, release_all
from kvtier.core.errors import BackendError
from kvtier.core.pins import check_budget

T = TypeVar("T")
Read = list[Buffer | None]


class VineyardStoreBackend(Backend):
    """A tier in a vineyardd's shared memory; see the module doc.

    Capabilities, and why:

    * ``persistent``: chunks live in vineyardd, not in this process: closing and
      reopening the tier finds them (a vineyardd restart loses them).
    * ``shared``: every process connected to the vineyardd (and, with etcd metadata,
      every host) reads and writes the same names.
    * ``bounded``: kvtier evicts the oldest chunks to keep the tier within ``capacity``
      (vineyardd never evicts by itself; it only refuses blobs when its memory is full).
    * ``create_mode`` is False: vineyard's ``put_name`` replaces names silently, so a
      ``CREATE`` is a check then a write, and two processes racing to create one key can
      both succeed (the last name wins; keys name content, so both wrote the same bytes).
    * ``process_local`` is False: other processes read what this one writes.
    * ``verified_reads`` is False: the bytes come from shared memory that other processes
      write, so the tier chain verifies each blob (once, on the zero-copy view).
    """

    capabilities = Capabilities(
        persistent=True,
        shared=True,
        bounded=True,
        listing=True,
        create_mode=False,
        hands_over_evictions=False,
        process_local=False,
        verified_reads=False,
    )
    options: VineyardOptions
    options_model = VineyardOptions

    def _configure(self) -> None:
        assert self.capacity is not None  # bounded: checked by Backend
        check_budget(self.safe_url, self.options.pinned_bytes, self.capacity)
        self.target = parse_url(self.url)
        self.names = Names(self.options.key_prefix)
        self.typename = obj.typename(self.options.key_prefix)
        o = self.options
        self.connection = Connection(self.target, o.connect_timeout, o.rpc_compression)
        self.leases = Leases(self.connection, self.names, new_holder())
        self._peers: dict[int, Connection] = {}
        self._others = 0
        """vineyardd memory that is not this tier's chunks, as of the last inventory."""
        self._evictions = 0
        self._full_evictions: list[tuple[str, int]] = []
        """Chunks evicted by worker threads because vineyardd was full, not yet reported."""
        self._counts = dict.fromkeys(("hits", "misses", "rejected_full", "stale_views"), 0)
        self.swept: dict[str, int] = {}
        """What the sweep at ``open()`` repaired (see :func:`reclaim.sweep`)."""

    # -- plumbing ---------------------------------------------------------------------

    async def _open(self) -> None:
        """Connect (:class:`BackendUnavailableError` if vineyardd does not answer) and
        sweep up what crashed processes left."""
        self._start_workers(self.options.threads)
        self.leases.submit = self._submit
        self.swept = await self._call("open", self._sweep)

    def _submit(self, job: Callable[[], None]) -> None:
        if self.workers is None:
            raise BackendError(f"{self.safe_url}: closed")
        self.workers.submit(job)

    def _sweep(self, client: Client) -> dict[str, int]:
        return rec.sweep(client, self.names, self.typename, self.options.reclaim_after)

    async def _call(self, op: str, fn: Callable[[Client], T], *, orphan: Any = None) -> T:
        """``fn(client)`` in a worker thread, vineyard's errors translated."""
        return await self._blocking(lambda: self.connection.call(op, fn), orphan=orphan)

    async def _close(self) -> None:
        """Forget the client; views still held keep their pins and mappings until
        released (vineyard's Python client keeps one connection per socket and process,
        shared by every user of it there, so it stays open)."""
        self.leases.submit = None
        self.connection.close()
        for peer in self._peers.values():
            peer.close()

    # -- reads ------------------------------------------------------------------------

    async def _get_unique(self, keys: list[str]) -> Read:
        got = await self._call("get", lambda c: self._read(c, keys), orphan=release_all)
        hits = sum(buf is not None for buf in got)
        self._counts["hits"] += hits
        self._counts["misses"] += len(got) - hits
        return got

    def _read(self, client: Client, keys: list[str]) -> Read:
        found = obj.lookup(client, [self.names.key(key) for key in keys])
        present = [object_id for object_id in found if object_id is not None]
        chunks = dict(zip(present, obj.describe(client, self.typename, present), strict=True))
        out: Read = [None] * len(keys)
        local: list[tuple[int, obj.Chunk]] = []
        remote: list[tuple[int, obj.Chunk]] = []
        for i, object_id in enumerate(found):
            chunk = None if object_id is None else chunks[object_id]
            if chunk is None:
                continue
            if chunk.nbytes == 0:
                out[i] = Buffer.wrap(b"")
            elif self.target.ipc and chunk.instance_id == client.instance_id:
                local.append((i, chunk))
            else:
                remote.append((i, chunk))
        try:
            if local:
                self._read_local(client, local, out)
            if remote:
                self._read_remote(client, remote, out)
        except BaseException:
            release_all(out)
            raise
        return out

    def _read_local(self, client: Client, wanted: list[tuple[int, obj.Chunk]], out: Read) -> None:
        """Zero-copy views of blobs in this host's vineyardd, each pinned first."""
        pinned = self.leases.acquire(client, [chunk.object_id for _, chunk in wanted])
        self._counts["stale_views"] += pinned.count(False)
        wanted = [w for w, ok in zip(wanted, pinned, strict=True) if ok]
        views: list[LeasedView] = []
        try:
            blobs = client.get_blobs([ObjectID(chunk.blob_id) for _, chunk in wanted])
            for (_, chunk), blob in zip(wanted, blobs, strict=True):
                views.append(LeasedView(blob, client, self.leases, chunk.object_id))
        except BaseException:
            for _, chunk in wanted[len(views) :]:
                self.leases.release(chunk.object_id)
            release_all(views)
            raise
        for (i, _), view in zip(wanted, views, strict=True):
            out[i] = view

    def _read_remote(self, client: Client, wanted: list[tuple[int, obj.Chunk]], out: Read) -> None:
        """Copies fetched over RPC: from the URL's vineyardd, or from the vineyardd of
        another host that holds the blob."""
        by_instance: dict[int, list[tuple[int, obj.Chunk]]] = {}
        for item in wanted:
            by_instance.setdefault(item[1].instance_id, []).append(item)
        for instance, items in by_instance.items():
            peer = self.connection if not self.target.ipc else self._peer(client, instance)
            ids = [ObjectID(chunk.blob_id) for _, chunk in items]

            def fetch(rpc: Client, ids: list[ObjectID] = ids) -> list[Any]:
                return list(rpc.get_remote_blobs(ids))

            blobs = peer.call("get", fetch)
            for (i, _), blob in zip(items, blobs, strict=True):
                out[i] = Buffer.wrap(memoryview(blob))

    def _peer(self, client: Client, instance: int) -> Connection:
        """An RPC connection to the vineyardd ``instance`` of a distributed deployment."""
        peer = self._peers.get(instance)
        if peer is None:
            host, _, port = str(client.meta[instance]["rpc_endpoint"]).rpartition(":")
            o = self.options
            peer = Connection(
                Target(host=host, port=int(port)), o.connect_timeout, o.rpc_compression
            )
            self._peers[instance] = peer
        return peer

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        def contains(client: Client) -> list[bool]:
            found = obj.lookup(client, [self.names.key(key) for key in keys])
            present = [o for o in found if o is not None]
            live = {c.object_id for c in obj.describe(client, self.typename, present) if c}
            return [o is not None and o in live for o in found]

        return await self._call("contains", contains)

    # -- writes -----------------------------------------------------------------------

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        """Room is made for the batch first; then its blobs are written in up to ``threads``
        groups at once, so that one group's copies overlap another's round trips."""
        assert self.capacity is not None and self.workers is not None
        fits = [buf.nbytes <= self.capacity for _, buf in items]
        wanted = [item for item, ok in zip(items, fits, strict=True) if ok]
        if not wanted:
            return fits
        incoming = sum(buf.nbytes for _, buf in wanted)
        evicted = await self._call("put", lambda c: self._make_room(c, incoming))
        self._report(evicted)
        step = -(-len(wanted) // self.options.threads)
        groups = [wanted[i : i + step] for i in range(0, len(wanted), step)]
        calls = [
            partial(self.connection.call, "put", partial(self._write, items=group, mode=mode))
            for group in groups
        ]
        self._check_open()
        stored = [ok for done in await self.workers.run_all(calls) for ok in done]
        self._report([])
        results = iter(stored)
        return [next(results) if ok else False for ok in fits]

    def _write(self, client: Client, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        names = [self.names.key(key) for key, _ in items]
        old = obj.lookup(client, names)
        limit = int(client.status.memory_limit)
        todo = []
        for i, object_id in enumerate(old):
            if items[i][1].nbytes > limit:
                self._counts["rejected_full"] += 1  # larger than vineyardd's memory
            elif mode is PutMode.OVERWRITE or object_id is None:
                todo.append(i)
        stored = [False] * len(items)
        for i, object_id in self._store(client, [items[i] for i in todo], todo):
            client.put_name(ObjectID(object_id), names[i])
            stored[i] = True
        replaced = [o for i, o in enumerate(old) if o is not None and stored[i]]
        rec.reclaim(client, self.names, replaced)
        return stored

    def _store(
        self, client: Client, items: list[tuple[str, Buffer]], where: list[int]
    ) -> list[tuple[int, int]]:
        """Write the blobs (unnamed): ``(index, object)`` of each one stored. When
        vineyardd is full, evict the oldest chunks and try each blob once more."""
        if not items:
            return []
        write = obj.write_local if self.target.ipc else obj.write_remote
        try:
            return list(zip(where, write(client, self.typename, items), strict=True))
        except FULL:
            pass
        done = []
        for i, item in zip(where, items, strict=True):
            try:
                done.append((i, write(client, self.typename, [item])[0]))
            except FULL:
                self._full_evictions += self._free_memory(client, item[1].nbytes)
                try:
                    done.append((i, write(client, self.typename, [item])[0]))
                except FULL:
                    self._counts["rejected_full"] += 1
        return done

    def _make_room(self, client: Client, incoming: int) -> list[tuple[str, int]]:
        """Evict the oldest chunks if ``incoming`` bytes would take the tier over its
        capacity; returns what was evicted. Takes an inventory only when vineyardd's
        memory use says the tier may be that full."""
        assert self.capacity is not None
        usage = int(client.status.memory_usage)
        if usage - self._others + incoming <= self.capacity:
            return []
        inventory = rec.inventory(client, self.names, self.typename)
        self._others = max(0, usage - inventory.nbytes)
        total = inventory.nbytes
        if total + incoming <= self.capacity:
            return []
        target = max(0, int(self.capacity * self.options.evict_to) - incoming)
        return rec.evict(client, self.names, inventory.victims(total - target))

    def _free_memory(self, client: Client, incoming: int) -> list[tuple[str, int]]:
        """vineyardd is full: sweep, then evict the oldest chunks until ``incoming`` bytes
        may fit."""
        rec.sweep(client, self.names, self.typename, self.options.reclaim_after)
        status = client.status
        short = int(status.memory_usage) + incoming - int(status.memory_limit)
        victims = rec.inventory(client, self.names, self.typename).victims(short)
        return rec.evict(client, self.names, victims)

    def _report(self, evicted: list[tuple[str, int]]) -> None:
        """Count evictions and tell the listener (on the event loop), with those a full
        vineyardd forced since the last report."""
        full, self._full_evictions = self._full_evictions, []
        evicted = evicted + full
        if evicted:
            self._evictions += len(evicted)
            self._evicted(evicted)

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        def delete(client: Client) -> list[bool]:
            names = [self.names.key(key) for key in keys]
            found = obj.lookup(client, names)
            for name, object_id in zip(names, found, strict=True):
                if object_id is not None:
                    client.drop_name(name)
            drop_pins(client, self.names, [k for k, o in zip(keys, found, strict=True) if o])
            rec.reclaim(client, self.names, [o for o in found if o is not None])
            return [o is not None for o in found]

        return await self._call("delete", delete)

    # -- listing and stats ------------------------------------------------------------

    async def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        """A snapshot of the tier's names starting with ``prefix`` (one listing)."""
        pattern = self.names.keys_pattern(prefix)
        listed = await self._call("list", lambda c: c.list_names(pattern, False, rec.LIST_LIMIT))
        for name in listed:
            key = self.names.key_of(name)
            if key is not None:
                yield key

    async def _stats(self) -> BackendStats:
        """An inventory of the tier (one listing of names and one of objects) and
        vineyardd's memory figures."""

        def take(client: Client) -> tuple[rec.Inventory, Any]:
            return rec.inventory(client, self.names, self.typename), client.status

        inventory, status = await self._call("stats", take)
        return BackendStats(
            keys=len(inventory.chunks),
            bytes_used=inventory.nbytes,
            capacity_bytes=self.capacity,
            evictions=self._evictions,
            details={
                **self._counts,
                "views_held": self.leases.held,
                "data_path": "ipc" if self.target.ipc else "rpc",
                "instance_id": int(status.instance_id),
                "vineyard_memory_usage": int(status.memory_usage),
                "vineyard_memory_limit": int(status.memory_limit),
                "swept_at_open": dict(self.swept),
            },
        )


class VineyardBackend(VineyardPins, ChunkExpiry, VineyardStoreBackend):
    """The tier with its ``ttl`` option: expired chunks are misses, removed when met and
    by a bounded sweep (:mod:`kvtier.backends.expiring`)."""
