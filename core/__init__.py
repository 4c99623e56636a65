"""kvtier's public API: the tier chain, the plugin system, the chunk format.

Names are imported lazily so that ``import kvtier.core`` (done by the pytest plugin
in every test session) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode
    from kvtier.core.buffers import Buffer, BufferPool
    from kvtier.core.config import KVTierConfig, TierConfig, load_config
    from kvtier.core.engine import KVTier
    from kvtier.core.errors import (
        BackendError,
        BackendUnavailableError,
        ChunkCorruptedError,
        CodecUnavailableError,
        ConfigError,
        KVTierError,
        MissingExtraError,
        PluginError,
    )
    from kvtier.core.hookspecs import hookimpl
    from kvtier.core.keys import ChunkKey
    from kvtier.core.layout import KVLayout
    from kvtier.core.specs import (
        BackendSpec,
        CodecSpec,
        EventKind,
        EvictionPolicySpec,
        SubcommandSpec,
        TierEvent,
    )
    from kvtier.core.tier import KVTierStats

_EXPORTS = {
    "Backend": "backend", "BackendStats": "backend", "Capabilities": "backend",
    "PutMode": "backend",
    "Buffer": "buffers", "BufferPool": "buffers",
    "KVTierConfig": "config", "TierConfig": "config", "load_config": "config",
    "KVTier": "engine", "KVTierStats": "tier",
    "BackendError": "errors", "BackendUnavailableError": "errors",
    "ChunkCorruptedError": "errors", "CodecUnavailableError": "errors",
    "ConfigError": "errors", "KVTierError": "errors",
    "MissingExtraError": "errors", "PluginError": "errors",
    "hookimpl": "hookspecs",
    "ChunkKey": "keys",
    "KVLayout": "layout",
    "BackendSpec": "specs", "CodecSpec": "specs", "EventKind": "specs",
    "EvictionPolicySpec": "specs", "SubcommandSpec": "specs", "TierEvent": "specs",
}  # fmt: skip

__all__ = [
    "Backend",
    "BackendError",
    "BackendSpec",
    "BackendStats",
    "BackendUnavailableError",
    "Buffer",
    "BufferPool",
    "Capabilities",
    "ChunkCorruptedError",
    "ChunkKey",
    "CodecSpec",
    "CodecUnavailableError",
    "ConfigError",
    "EventKind",
    "EvictionPolicySpec",
    "KVLayout",
    "KVTier",
    "KVTierConfig",
    "KVTierError",
    "KVTierStats",
    "MissingExtraError",
    "PluginError",
    "PutMode",
    "SubcommandSpec",
    "TierConfig",
    "TierEvent",
    "hookimpl",
    "load_config",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'kvtier.core' has no attribute {name!r}")
    return getattr(importlib.import_module(f"kvtier.core.{module}"), name)
