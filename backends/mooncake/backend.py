"""The ``mooncake`` tier's backend (options and URL: :mod:`kvtier.backends.mooncake`).

Each process using the tier is a Mooncake client lending memory to the store; backends
with the same settings share one client (:mod:`~kvtier.backends.mooncake.clients`).
The backend's :class:`~kvtier.core.buffers.BufferPool` memory is registered with the
client, every block mapped now and later, so ``put_many`` writes from the caller's
buffers and ``get_many`` reads straight into pool buffers (zero copy; reads and
writes: :mod:`~kvtier.backends.mooncake.reads`, :mod:`~kvtier.backends.mooncake.writes`,
how blobs map onto objects: :mod:`~kvtier.backends.mooncake.objects`).

* Malformed objects (a one-byte object without a marker, an object larger than any
  blob) are misses that readers remove, counted as ``malformed_removed``
  (:mod:`~kvtier.backends.mooncake.reads` says why that is safe).
* Errors. An RPC failure (master down or not answering) raises
  :class:`BackendUnavailableError` for the batch; as soon as the client's heartbeat
  has noticed, calls fail at once. Other failures are per key: ``False`` from
  ``put_many`` and a miss from ``get_many``, counted in ``stats().details``.
* Threads. Client calls block; each batch runs as one call sequence in the backend's
  :class:`~kvtier.core.blocking.BlockingPool` of ``threads`` workers, which bounds the
  calls in flight. A cancelled ``put_many`` finishes in the background, holding its
  buffers until then.
* Closing the last backend of a client closes the client, which takes about 2 s. After
  a master restart the client mounts its segment again by itself within about 2 s;
  the master's objects are lost.
"""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Sequence
from typing import Any

from kvtier.backends.expiring import ChunkExpiry
from kvtier.backends.mooncake import MooncakeOptions, parse_mooncake_url
from kvtier.backends.mooncake.clients import (
    PoolRegistrar,
    Settings,
    SharedClient,
    acquire_client,
    release_client,
)
from kvtier.backends.mooncake.objects import Counters, Objects, SizeMemory
from kvtier.backends.mooncake.pins import MooncakePins, replicate_config
from kvtier.backends.mooncake.reads import Reader
from kvtier.backends.mooncake.writes import LentBlobs, Writer
from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode
from kvtier.core.buffers import Buffer
from kvtier.core.errors import BackendUnavailableError, ConfigError
from kvtier.core.keys import is_valid_key


class MooncakeStoreBackend(Backend):
    """A Mooncake Store tier (see the module docstring for the semantics)."""

    capabilities = Capabilities(
        persistent=False,
        shared=True,
        bounded=False,
        listing=True,
        create_mode=True,
        hands_over_evictions=False,
    )
    options: MooncakeOptions
    options_model = MooncakeOptions

    def _configure(self) -> None:
        self._settings = Settings(
            master=parse_mooncake_url(self.url),
            metadata_server=self.options.metadata_server,
            local_hostname=self.options.local_hostname,
            protocol=self.options.protocol,
            rdma_devices=self.options.rdma_devices,
            global_segment_size=self.options.global_segment_size,
            local_buffer_size=self.options.local_buffer_size,
        )
        self._config = replicate_config(self.options)
        self._pinned: dict[str, int] = {}
        self._counters = Counters()
        self._objects: Objects | None = None
        self._registrar: PoolRegistrar | None = None
        self._reader: Reader | None = None
        self._writer: Writer | None = None

    @property
    def _client(self) -> SharedClient | None:
        """The Mooncake client this backend uses while open."""
        return None if self._objects is None else self._objects.client

    # -- lifetime ---------------------------------------------------------------------

    async def _open(self) -> None:
        """Connect (or join this process's client with the same settings) and register
        the pool's memory; :class:`BackendUnavailableError` if the master or metadata
        server cannot be reached within ``connect_timeout``."""
        self._start_workers(self.options.threads)
        if self._objects is None:
            await self._blocking(self._attach)

    def _attach(self) -> None:
        client = acquire_client(self._settings, self.options.connect_timeout)
        registrar = PoolRegistrar(client)
        try:
            self.pool.add_registrar(registrar)
        except BaseException:
            release_client(client)
            raise
        filler = self.pool.acquire(1)
        filler.view[0] = 0
        objects = Objects(client, self.pool, self._config, filler, SizeMemory(), self._counters)
        self._registrar, self._reader, self._writer = registrar, Reader(objects), Writer(objects)
        self._objects = objects

    async def _close(self) -> None:
        """Deregister the pool's memory and leave the client (closing it if this was its
        last backend); no call is in flight any more."""
        await asyncio.to_thread(self._detach)

    def _detach(self) -> None:
        objects, self._objects = self._objects, None
        if objects is None:
            return
        assert self._registrar is not None
        objects.filler.release()
        self.pool.remove_registrar(self._registrar)
        release_client(objects.client)

    def _parts(self) -> tuple[Reader, Writer]:
        if self._reader is None or self._writer is None:
            raise BackendUnavailableError(f"{self.safe_url}: not connected (open() failed)")
        return self._reader, self._writer

    # -- the batch hooks ----------------------------------------------------------------

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        reader, _ = self._parts()
        return await self._blocking(lambda: reader.get(keys), orphan=_release_found)

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        reader, _ = self._parts()
        return await self._blocking(lambda: reader.contains(keys))

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        _, writer = self._parts()
        write = writer.overwrite if mode is PutMode.OVERWRITE else writer.create
        lent = LentBlobs([buf for _, buf in items])

        def call() -> list[bool]:
            if not lent.take():
                return []  # the caller gave up before this started
            try:
                return write([(key, buf) for (key, _), buf in zip(items, lent.bufs, strict=True)])
            finally:
                lent.release()

        try:
            return await self._blocking(call)
        except BaseException:
            lent.give_up()
            raise

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        _, writer = self._parts()
        return await self._blocking(lambda: writer.delete(keys))

    # -- listing and stats --------------------------------------------------------------

    async def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        """Every stored chunk key, from the master's key list (needs ``admin_url``)."""
        text = await self._blocking(lambda: self._admin("get_all_keys"))
        for line in text.splitlines():
            key = line.strip()  # markers are not valid keys
            if key.startswith(prefix) and is_valid_key(key):
                yield key

    async def _stats(self) -> BackendStats:
        """This backend's counters; with ``admin_url``, the store's key count, bytes
        used, capacity and evictions (store-wide, all clients) in ``details["store"]``."""
        details: dict[str, Any] = {
            "master": self._settings.master,
            "replica_num": self.options.replica_num,
            **self._counters.as_dict(),
            **({"pinned_bytes": sum(self._pinned.values())} if self.options.pinned_bytes else {}),
        }
        if self.options.admin_url is not None:
            metrics = _parse_metrics(await self._blocking(lambda: self._admin("metrics")))
            details["store"] = {
                "keys": metrics.get("master_key_count"),
                "bytes_used": metrics.get("master_allocated_bytes"),
                "capacity_bytes": metrics.get("master_total_capacity_bytes"),
                "evicted_keys": metrics.get("master_evicted_key_count"),
            }
        return BackendStats(details=details)

    def _admin(self, path: str) -> str:
        """GET ``admin_url/path`` (blocking)."""
        if self.options.admin_url is None:
            raise ConfigError(
                f"{self.safe_url}: listing keys and store counters need the master's HTTP "
                "address: set the tier option admin_url: http://<master host>:<metrics port>"
            )
        url = f"{self.options.admin_url}/{path}"
        try:
            with urllib.request.urlopen(url, timeout=self.options.connect_timeout) as reply:
                return str(reply.read().decode())
        except (urllib.error.URLError, OSError) as exc:
            raise BackendUnavailableError(f"mooncake: GET {url} failed: {exc}") from exc


def _parse_metrics(text: str) -> dict[str, int]:
    """Unlabelled integer samples of a Prometheus text exposition."""
    metrics = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name and not name.startswith("#") and "{" not in name:
            try:
                metrics[name] = int(float(value))
            except ValueError:
                continue
    return metrics


def _release_found(found: Sequence[Buffer | None]) -> None:
    for buf in found:
        if buf is not None:
            buf.release()


class MooncakeBackend(MooncakePins, ChunkExpiry, MooncakeStoreBackend):
    """The tier with its ``ttl`` option: expired chunks are misses, removed when met and
    by a bounded sweep (:mod:`kvtier.backends.expiring`)."""
