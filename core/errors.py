"""kvtier's error hierarchy.

Every error kvtier raises on purpose derives from :class:`KVTierError`. Backends
translate their client library's exceptions into these, so callers never need to
know which client a tier uses.
"""

from __future__ import annotations


class KVTierError(Exception):
    """Root of every error raised by kvtier."""


class ConfigError(KVTierError, ValueError):
    """A configuration, URL, key or argument is invalid; the message says how to fix it."""


class PluginError(KVTierError):
    """A plugin failed to load, conflicts with another, or breaks a hook's contract."""


class BackendError(KVTierError):
    """A storage backend failed an operation."""


class BackendUnavailableError(BackendError):
    """The backend cannot be reached or is closed; the tier chain skips it for a while."""


class ChunkCorruptedError(KVTierError):
    """A stored blob failed validation (magic, version, length or checksum).

    The tier chain treats it as a miss and deletes the blob.
    """


class CodecUnavailableError(KVTierError):
    """A valid blob needs a codec that no plugin of this process provides (a plugin
    installed or enabled elsewhere). The tier chain treats it as a miss and keeps it."""


class MissingExtraError(KVTierError, ImportError):
    """An optional dependency is not installed; the message names the extra to install."""

    def __init__(self, feature: str, extra: str) -> None:
        super().__init__(f"{feature} needs optional dependencies: pip install 'kvtier[{extra}]'")
        self.extra = extra
