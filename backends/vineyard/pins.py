"""Pins and ages of the ``vineyard`` tier (a mixin of its backend).

A pin is a name in vineyardd, ``<key_prefix>keep/<key>``, so every process sharing
the tier sees it: eviction (kvtier's own, by any process) never picks a pinned chunk,
and no process's ``ttl`` expires it (a process that finds an expired chunk asks
for its keep name first). ``pinned_bytes`` bounds the bytes of pinned chunks in the
tier, all processes together, as the pins stand when a batch is pinned (two
processes pinning at the same moment may pass it by a batch). Deleting a chunk drops
its pin; overwriting it keeps it. ``ages`` are the objects' creation times, which
vineyardd puts in each object ID (any process's writes; an overwrite is a new object);
pinned chunks have none (``kvtier purge --older-than`` leaves them).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from kvtier.backends.expiring import WriteTimes
from kvtier.backends.vineyard import VineyardOptions
from kvtier.backends.vineyard import objects as obj
from kvtier.backends.vineyard import reclaim as rec
from kvtier.backends.vineyard.client import MISSING, Client, ObjectID
from kvtier.backends.vineyard.names import Names

if TYPE_CHECKING:
    from kvtier.core.backend import Backend

    _Base = Backend
else:
    _Base = object

T = TypeVar("T")


def kept(client: Client, names: Names, keys: list[str]) -> list[bool]:
    """Whether each key has a keep name (is pinned)."""
    return [found is not None for found in obj.lookup(client, [names.kept(k) for k in keys])]


def drop_pins(client: Client, names: Names, keys: list[str]) -> None:
    """Drop the keep names of those of ``keys`` that have one (one listing)."""
    wanted = set(keys)
    for name in client.list_names(names.kept_pattern(), False, rec.LIST_LIMIT):
        if names.kept_key(name) in wanted:
            with contextlib.suppress(*MISSING):  # unpinned meanwhile
                client.drop_name(name)


class VineyardPins(_Base):
    """``pin_many``, ``unpin_many``, ``ages`` and the pinned chunks' exemption from
    expiry of :class:`~kvtier.backends.vineyard.backend.VineyardBackend`."""

    options: VineyardOptions
    names: Names
    typename: str
    expiry: WriteTimes | None

    if TYPE_CHECKING:

        async def _call(self, op: str, fn: Callable[[Client], T], *, orphan: Any = None) -> T: ...

    async def pin_many(self, keys: list[str]) -> list[bool]:
        """Pin stored chunks while the tier's pinned bytes stay within ``pinned_bytes``;
        ``True`` where a chunk is pinned now."""
        self._check_open()

        def pin(client: Client) -> list[bool]:
            inventory = rec.inventory(client, self.names, self.typename)
            stored = {key: (object_id, n) for object_id, key, n in inventory.chunks}
            room = self.options.pinned_bytes - inventory.kept_bytes
            out = []
            for key in keys:
                if key in inventory.kept and key in stored:
                    out.append(True)
                elif key in stored and stored[key][1] <= room:
                    client.put_name(ObjectID(stored[key][0]), self.names.kept(key))
                    room -= stored[key][1]
                    out.append(True)
                else:
                    out.append(False)
            return out

        done = await self._call("pin", pin)
        if self.expiry is not None:
            self.expiry.pin([key for key, ok in zip(keys, done, strict=True) if ok])
        return done

    async def unpin_many(self, keys: list[str]) -> list[bool]:
        """Drop the pins of ``keys``; ``True`` where one was pinned (by any process).
        Their ``ttl`` starts again here."""
        self._check_open()

        def unpin(client: Client) -> list[bool]:
            was = kept(client, self.names, keys)
            drop_pins(client, self.names, [key for key, yes in zip(keys, was, strict=True) if yes])
            return was

        done = await self._call("unpin", unpin)
        if self.expiry is not None:
            self.expiry.unpin([key for key, was in zip(keys, done, strict=True) if was])
        return done

    async def _expirable(self, keys: list[str]) -> list[str]:
        found = await self._call("pins", lambda client: kept(client, self.names, keys))
        return [key for key, pinned in zip(keys, found, strict=True) if not pinned]

    async def ages(self, keys: list[str]) -> list[float | None]:
        """Seconds since vineyardd created each chunk's object; ``None`` where absent
        or pinned (for ``kvtier purge --older-than``)."""
        self._check_open()

        def find(client: Client) -> tuple[list[int | None], list[bool]]:
            found = obj.lookup(client, [self.names.key(key) for key in keys])
            return found, kept(client, self.names, keys)

        found, pinned = await self._call("ages", find)
        now_ms = time.time() * 1000
        return [
            None if o is None or pin else max(0.0, now_ms - rec.created_ms(o)) / 1000
            for o, pin in zip(found, pinned, strict=True)
        ]
