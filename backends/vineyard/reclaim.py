"""Deleting chunk objects nobody reads, and finding what a tier holds (for eviction).

:func:`reclaim` is the deleter's side of the protocol in
:mod:`~kvtier.backends.vineyard.leases`: mark, then free what no process pins.
:func:`inventory` lists a tier's chunks with their sizes and ages (object IDs sort by
creation time), for stats and for evicting the oldest. :func:`sweep` repairs what
crashed processes leave behind: pins of dead processes, marked objects nobody pins any
more, chunk objects no name reaches (a writer died between writing and naming), names
of objects that are gone.

All functions block; the backend runs them in its worker threads.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from kvtier.backends.vineyard.client import MISSING, Client, ObjectID
from kvtier.backends.vineyard.leases import free
from kvtier.backends.vineyard.names import Names, holder_alive

LIST_LIMIT = 1 << 40
"""``limit`` of vineyard's listings: everything."""


def created_ms(object_id: int) -> int:
    """When vineyardd created an object (milliseconds since the epoch, 41 bits)."""
    return (object_id >> 22) & 0x1FFFFFFFFFF


def reclaim(client: Client, names: Names, object_ids: Iterable[int]) -> None:
    """Free objects no name of this tier points to any more, except those a process
    still views (their last holder frees them)."""
    marked = []
    for object_id in object_ids:
        try:
            client.put_name(ObjectID(object_id), names.gc(object_id))
            marked.append(object_id)
        except MISSING:
            pass  # already freed
    if not marked:
        return
    pinned = _pinned(client, names)
    for object_id in marked:
        if object_id not in pinned:
            free(client, names, object_id)


def _pinned(client: Client, names: Names) -> set[int]:
    pins = client.list_names(names.pins_pattern(), False, LIST_LIMIT)
    return {parsed[0] for name in pins if (parsed := names.parse_pin(name)) is not None}


@dataclass
class Inventory:
    """A tier's chunks: ``(object, key, nbytes)``, oldest first, and the pinned keys."""

    chunks: list[tuple[int, str, int]] = field(default_factory=list)
    kept: set[str] = field(default_factory=set)
    """Keys with a keep name (pinned: never evicted), stored or not."""

    @property
    def nbytes(self) -> int:
        return sum(n for _, _, n in self.chunks)

    @property
    def kept_bytes(self) -> int:
        return sum(n for _, key, n in self.chunks if key in self.kept)

    def victims(self, nbytes: int) -> list[tuple[int, str, int]]:
        """The oldest unpinned chunks holding at least ``nbytes`` (all if fewer)."""
        chosen = []
        for chunk in self.chunks:
            if nbytes <= 0:
                break
            if chunk[1] not in self.kept:
                chosen.append(chunk)
                nbytes -= chunk[2]
        return chosen


def inventory(client: Client, names: Names, typename: str) -> Inventory:
    """What the tier holds now: every named chunk whose object exists, with its size."""
    listed = client.list_names(names.keys_pattern(), False, LIST_LIMIT)
    sizes = _sizes(client, typename)
    found = Inventory()
    for name, object_id in listed.items():
        key, nbytes = names.key_of(name), sizes.get(int(object_id))
        if key is not None and nbytes is not None:
            found.chunks.append((int(object_id), key, nbytes))
    found.chunks.sort()
    kept = client.list_names(names.kept_pattern(), False, LIST_LIMIT)
    found.kept = {key for name in kept if (key := names.kept_key(name)) is not None}
    return found


def _sizes(client: Client, typename: str) -> dict[int, int]:
    """Object -> ``nbytes`` of every chunk object of the tier (named or not)."""
    metas = client.list_metadatas(typename, False, LIST_LIMIT, True)
    return {int(meta.id): int(meta["nbytes"]) for meta in metas}


def evict(
    client: Client, names: Names, victims: Iterable[tuple[int, str, int]]
) -> list[tuple[str, int]]:
    """Take each victim's name away (unless it names another object by now) and reclaim
    its object; returns ``(key, nbytes)`` of those evicted."""
    evicted, objects = [], []
    for object_id, key, nbytes in victims:
        try:
            if int(client.get_name(names.key(key))) != object_id:
                continue  # overwritten meanwhile: the new value stays
        except MISSING:
            continue  # deleted meanwhile
        client.drop_name(names.key(key))
        evicted.append((key, nbytes))
        objects.append(object_id)
    reclaim(client, names, objects)
    return evicted


def sweep(client: Client, names: Names, typename: str, reclaim_after: float) -> dict[str, int]:
    """Repair what crashed processes left; returns counts of what was done."""
    done = dict.fromkeys(("dead_pins", "freed", "unreachable", "dangling_names"), 0)
    ours = client.list_names(f"{names.prefix}*", False, LIST_LIMIT)
    sizes = _sizes(client, typename)
    pinned: set[int] = set()
    marked: set[int] = set()
    reached: set[int] = set()
    for name, object_id in ours.items():
        if (pin := names.parse_pin(name)) is not None:
            if holder_alive(pin[1]) is False:
                client.drop_name(name)
                done["dead_pins"] += 1
            else:
                pinned.add(pin[0])
        elif (gc := names.parse_gc(name)) is not None:
            marked.add(gc)
        elif names.key_of(name) is not None:
            if int(object_id) in sizes:
                reached.add(int(object_id))
            else:  # the object is gone: a miss already, now not listed either
                client.drop_name(name)
                done["dangling_names"] += 1
    for object_id in marked - pinned:
        free(client, names, object_id)
        done["freed"] += 1
    old = time.time() * 1000 - reclaim_after * 1000
    lost = [o for o in sizes if o not in reached | marked and created_ms(o) < old]
    reclaim(client, names, lost)
    done["unreachable"] = len(lost)
    return done
