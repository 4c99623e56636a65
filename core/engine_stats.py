"""The engine's stats (:class:`EngineStats`) and the registry of open caches, which
exporters (the metrics plugin, ``kvtier serve``) read."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kvtier.core.tier import KVTierStats

if TYPE_CHECKING:
    from kvtier.core.engine import KVTier

opened: weakref.WeakSet[KVTier] = weakref.WeakSet()
"""Every :class:`KVTier` of this process from its opening to its closing."""


def open_instances() -> list[KVTier]:
    """Every :class:`KVTier` of this process that is open now (for exporters such as
    the metrics plugin, which read their :meth:`KVTier.stats`)."""
    return [kv for kv in list(opened) if not kv._closed]


@dataclass
class EngineStats(KVTierStats):
    """:class:`KVTierStats` plus the engine's own counters: lookups and retrieves with
    the tokens they asked for and found, and the tier usage (bytes, capacity) of the
    bounded tiers (``None`` where a tier cannot tell cheaply)."""

    lookups: int = 0
    lookup_requested_tokens: int = 0
    lookup_hit_tokens: int = 0
    retrieves: int = 0
    retrieve_requested_tokens: int = 0
    retrieve_hit_tokens: int = 0
    prefetched: int = 0
    """Chunks whose prefetch toward faster tiers was started (:meth:`KVTier.lookup`)."""
    prefetch_read_bytes: int = 0
    """Bytes those prefetches read from slower tiers."""
    prefetch_dropped: int = 0
    """Chunks not prefetched because ``prefetch_bytes`` was in flight already."""
    prefetch_joined: int = 0
    """Chunks a retrieve found being prefetched and waited for (read once, not twice)."""
    prefetch_in_flight_bytes: int = 0
    """Budget held now by prefetches in flight (a gauge, like ``queue_bytes``)."""
    usage: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    """Tier name -> ``(bytes_used, capacity_bytes)``."""

    def as_dict(self) -> dict[str, Any]:
        counters = ("lookups", "lookup_requested_tokens", "lookup_hit_tokens", "retrieves",
                    "retrieve_requested_tokens", "retrieve_hit_tokens", "prefetched",
                    "prefetch_read_bytes", "prefetch_dropped", "prefetch_joined",
                    "prefetch_in_flight_bytes")  # fmt: skip
        return {**super().as_dict(), **{n: getattr(self, n) for n in counters},
                "usage": {k: list(v) for k, v in self.usage.items()}}  # fmt: skip
