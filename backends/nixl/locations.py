"""A reader's memory of where peers hold chunks, so repeated reads skip the index.

The chain asks ``contains_many`` and then ``get_many`` for the same keys, and popular
prefixes are read again and again: remembering each location for a while saves an
index round trip per batch. A remembered location may be stale (the owner evicted
the chunk or died); readers verify every blob anyway, forget the location on a
failure and ask the index again, so staleness costs a retry, never wrong data.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence

from kvtier.backends.nixl.index import Location


class LocationCache:
    """At most ``max_entries`` locations, each kept ``ttl`` seconds; thread safe."""

    def __init__(self, max_entries: int, ttl: float) -> None:
        self.max_entries = max_entries
        self.ttl = ttl
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[Location, float]] = OrderedDict()

    def get_many(self, keys: Sequence[str]) -> list[Location | None]:
        """The remembered, unexpired location of each key, or ``None``."""
        now = time.monotonic()
        out: list[Location | None] = []
        with self._lock:
            for key in keys:
                entry = self._entries.get(key)
                if entry is not None and entry[1] <= now:
                    del self._entries[key]
                    entry = None
                out.append(None if entry is None else entry[0])
        return out

    def put_many(self, items: Iterable[tuple[str, Location]]) -> None:
        expires = time.monotonic() + self.ttl
        with self._lock:
            for key, location in items:
                self._entries[key] = (location, expires)
                self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def forget(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._entries.pop(key, None)

    def forget_agent(self, agent: str) -> None:
        """Forget every location on ``agent`` (it failed or went away)."""
        with self._lock:
            for key in [k for k, (loc, _) in self._entries.items() if loc.agent == agent]:
                del self._entries[key]
