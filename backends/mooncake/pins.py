"""Pins and ages of the ``mooncake`` tier (a mixin of its backend).

Mooncake pins an object when it is written: a ``ReplicateConfig`` with
``with_hard_pin`` makes the master never evict it (a soft pin only orders eviction).
So :meth:`MooncakePins.pin_many` reads each chunk and writes it again, in place, hard
pinned (an upsert: readers see the chunk throughout), within this process's
``pinned_bytes``; :meth:`MooncakePins.unpin_many` rewrites chunks with the tier's own
config. The pin is the object's, in the master: every process sees it, a delete
still removes the chunk, and an ``OVERWRITE`` by any writer replaces it with an
unpinned one (``CREATE``, what the tier chain writes with, leaves it alone). Mooncake
cannot say whether an object is pinned, so ``unpin_many`` answers ``True`` for every
stored chunk it rewrote. A pinned chunk never expires by this tier's ``ttl`` (its time
restarts when it is unpinned here).

A Mooncake master keeps no write time per object, so ``ages`` refuses (``kvtier purge
--older-than``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from mooncake.store import ReplicateConfig, SoftPinAction

from kvtier.backends.expiring import WriteTimes
from kvtier.backends.mooncake import MooncakeOptions
from kvtier.backends.mooncake.objects import Objects
from kvtier.backends.mooncake.writes import Writer
from kvtier.core.buffers import Buffer, release_all
from kvtier.core.errors import BackendUnavailableError, ConfigError

if TYPE_CHECKING:
    from kvtier.core.backend import Backend

    _Base = Backend
else:
    _Base = object


def replicate_config(options: MooncakeOptions, *, hard_pin: bool = False) -> Any:
    """The ``ReplicateConfig`` of the tier's writes (``hard_pin``: of its pinned ones)."""
    config = ReplicateConfig()
    config.replica_num = options.replica_num
    if options.soft_pin:
        config.soft_pin_action = SoftPinAction.ENABLE
        if options.soft_pin_ttl is not None:
            config.soft_pin_ttl_ms = round(options.soft_pin_ttl * 1000)
    config.with_hard_pin = hard_pin
    return config


class MooncakePins(_Base):
    """``pin_many``, ``unpin_many`` and ``ages`` of
    :class:`~kvtier.backends.mooncake.backend.MooncakeBackend` (see the module doc)."""

    options: MooncakeOptions
    _objects: Objects | None
    expiry: WriteTimes | None
    _pinned: dict[str, int]
    """Chunks this process pinned -> their sizes (within ``pinned_bytes``)."""

    async def pin_many(self, keys: list[str]) -> list[bool]:
        """Rewrite stored chunks hard pinned while this process's pinned bytes stay
        within ``pinned_bytes``; ``True`` where a chunk is pinned now."""
        self._check_open()
        found = await self._get_unique(keys)
        room = self.options.pinned_bytes - sum(self._pinned.values())
        chosen: list[tuple[str, Buffer]] = []
        for key, buf in zip(keys, found, strict=True):
            if buf is None:
                self._pinned.pop(key, None)  # gone (deleted by someone)
            elif key in self._pinned:
                chosen.append((key, buf))  # again: another process may have unpinned it
                continue
            elif buf.nbytes <= room:
                chosen.append((key, buf))
                room -= buf.nbytes
                continue
            if buf is not None:
                buf.release()
        sizes = {key: buf.nbytes for key, buf in chosen}
        done = await self._rewrite(chosen, hard_pin=True)
        pinned = [key for (key, _), ok in zip(chosen, done, strict=True) if ok]
        self._pinned.update((key, sizes[key]) for key in pinned)
        if self.expiry is not None:
            self.expiry.pin(pinned)
        return [key in self._pinned for key in keys]

    async def unpin_many(self, keys: list[str]) -> list[bool]:
        """Rewrite stored chunks with the tier's own config (unpinned); ``True`` where
        a chunk was rewritten (Mooncake cannot tell whether it was pinned)."""
        self._check_open()
        found = await self._get_unique(keys)
        items = [(key, buf) for key, buf in zip(keys, found, strict=True) if buf is not None]
        done = dict(zip([key for key, _ in items], await self._rewrite(items), strict=True))
        for key in keys:
            self._pinned.pop(key, None)
        if self.expiry is not None:
            self.expiry.unpin([key for key in keys if done.get(key)])
        return [done.get(key, False) for key in keys]

    async def _rewrite(
        self, items: Sequence[tuple[str, Buffer]], *, hard_pin: bool = False
    ) -> list[bool]:
        """Upsert ``items`` (pool buffers, released here) hard pinned or not."""
        if self._objects is None:
            release_all([buf for _, buf in items])
            raise BackendUnavailableError(f"{self.safe_url}: not connected (open() failed)")
        config = replicate_config(self.options, hard_pin=hard_pin)
        writer = Writer(dataclasses.replace(self._objects, config=config))

        def write() -> list[bool]:  # the thread releases: a cancelled caller may not wait
            try:
                return writer.overwrite(items) if items else []
            finally:
                release_all([buf for _, buf in items])

        return await self._blocking(write)

    async def ages(self, keys: list[str]) -> list[float | None]:
        """Refused: Mooncake keeps no write time (``kvtier purge --older-than``)."""
        raise ConfigError(
            f"{self.safe_url}: --older-than needs a store that records when chunks were "
            "written, and a Mooncake master keeps no write time per object (its leases "
            "and soft pins only order eviction; this tier's ttl times chunks per "
            "process); select by --model, --namespace or --tenant instead"
        )
