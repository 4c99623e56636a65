"""KV events: chunks entering and leaving kvtier's tiers, in vLLM's wire format.

A cache-aware router (vllm-router's ``kv_aware`` policy, llm-d's indexer, Ray Serve's
KV-aware router, Dynamo) keeps an index of which instance holds which blocks from the
``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared`` events each vLLM instance
publishes. With an ``events:`` section in the config, a ``KVTier`` reports its tiers'
chunks the same way, with ``medium`` naming the tier:

* inside vLLM (``events.publisher: none``), the connector returns them through vLLM's
  KV-connector event API (``kvtier.plugins.events.vllm``) and vLLM's own publisher
  (``--kv-events-config``) sends them with its GPU blocks;
* outside vLLM (``events.publisher: zmq``), kvtier's publisher sends them over ZMQ
  (topic ``kv@<instance>@<model>``, sequence numbers, replay socket).

Events say what this process did: evictions in a shared tier by another process are not
seen. ``KVTier.lookup`` stays the authoritative answer (see docs/events.md).

Needs ``pip install 'kvtier[events]'`` (pyzmq, msgspec) once events are configured.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from kvtier.core.events.config import EventsConfig

if TYPE_CHECKING:
    from kvtier.core.config import KVTierConfig
    from kvtier.core.events.source import KVEvents
    from kvtier.core.keys import ChunkHasher
    from kvtier.core.plugins import PluginRegistry
    from kvtier.core.tier import Tier

__all__ = ["EventsConfig", "open_events"]


def open_events(
    config: KVTierConfig,
    model: str,
    hasher: ChunkHasher,
    tiers: Sequence[Tier],
    registry: PluginRegistry,
) -> KVEvents | None:
    """The KV events of a ``KVTier`` being opened (``None`` without ``events:``); a
    publisher endpoint that cannot be bound is a :class:`ConfigError`."""
    if config.events is None:
        return None
    from kvtier.core.events.source import KVEvents

    return KVEvents(config.events, model=model, hasher=hasher, tiers=tiers, registry=registry)
