"""The ``cpu`` tier: blobs kept in this process's RAM, zero copy, bounded by capacity.

URL: ``cpu://`` or ``cpu://<name>`` (the name only labels the tier). ``put_many`` keeps
the very :class:`~kvtier.core.buffers.Buffer` it is given (one ``retain()``, no copy)
and ``get_many`` hands it back retained, so a hit costs a dictionary lookup. Overwrite,
delete, eviction and ``close()`` drop only this tier's reference: a reader still
holding a returned buffer keeps valid bytes. When a blob does not fit, the eviction
policy picks victims until it does; a blob larger than the whole capacity is rejected
(``False``). Capacity counts ``Buffer.nbytes``. With ``options: {ttl: SECONDS}`` a
blob older than that is a miss, removed when met and by a sweep every ``ttl / 4``
seconds (at most a few hundred per sweep). ``read_into_many`` copies the ranges
straight out of the stored buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import replace

from pydantic import BaseModel, ConfigDict, Field

from kvtier.backends.ram import CAPABILITIES, RamPins, RamStore, iterate
from kvtier.core.backend import Backend, BackendStats, PutMode
from kvtier.core.buffers import Buffer
from kvtier.core.config import ByteSize
from kvtier.core.hookspecs import hookimpl
from kvtier.core.pins import check_budget
from kvtier.core.specs import BackendSpec
from kvtier.core.urls import name_from_url


class MemoryOptions(BaseModel):
    """Options of a ``cpu`` tier."""

    model_config = ConfigDict(extra="forbid")

    eviction: str = "lru"
    """Eviction policy: ``lru``, ``lfu`` or one a plugin registers."""
    ttl: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds a blob lives after it was written; ``None``: until evicted."""
    pinned_bytes: ByteSize = 0
    """Bytes that :meth:`MemoryBackend.pin_many` may pin (never evicted); at most the
    capacity."""


class MemoryBackend(RamPins, Backend):
    """In-process RAM tier: a :class:`~kvtier.backends.ram.RamStore` (thread safe).

    Evicted blobs are handed to ``demotion_sink`` (for a ``write_policy: back`` tier
    below) before this tier lets go of them. :attr:`store` holds the blobs.
    """

    capabilities = replace(CAPABILITIES, process_local=True, ranged_reads=True)
    """``ranged_reads``: the base's ``_read_into`` is native here, since ``_get_unique``
    is a lookup that hands back the stored buffer itself: only the ranges are copied."""
    options: MemoryOptions
    options_model = MemoryOptions

    def _configure(self) -> None:
        name_from_url(self.url, "cpu", what="name")
        assert self.capacity is not None  # bounded: checked by Backend
        policy = self.registry.eviction_policy(self.options.eviction).load()()
        check_budget(self.safe_url, self.options.pinned_bytes, self.capacity)
        self.store = RamStore(self.capacity, policy, self._evicted, ttl=self.options.ttl,
                              pinned_bytes=self.options.pinned_bytes)  # fmt: skip
        """The blobs; :attr:`RamStore.blobs` is the mapping itself."""
        self._sweeper: asyncio.Task[None] | None = None

    async def _open(self) -> None:
        if self.options.ttl is not None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        assert self.options.ttl is not None
        while True:
            await asyncio.sleep(min(max(self.options.ttl / 4, 0.05), 60.0))
            self.store.sweep()

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        return self.store.get_many(keys)

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        return self.store.put_many(items, mode)

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        return self.store.contains_many(keys)

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        return self.store.delete_many(keys)

    def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        """A snapshot of the stored keys taken at the call."""
        return iterate(self.store.keys(prefix))

    async def _stats(self) -> BackendStats:
        return self.store.stats(eviction=self.options.eviction)

    async def _close(self) -> None:
        """Stop the sweeps; release every stored buffer."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        self.store.clear()


@hookimpl
def kvtier_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="cpu",
            schemes=("cpu",),
            cls=MemoryBackend,
            options=MemoryOptions,
            description="in-process RAM, zero copy, bounded by capacity",
        )
    ]
