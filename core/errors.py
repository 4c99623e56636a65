"""kvtier's error hierarchy.

Every error kvtier raises on purpose derives from :class:`KVTierError`. Backends
translate their client library's exceptions into these, so callers never need to
know which client a tier uses.
"""

from __future__ import annotations

import re
import reprlib

_SHARED_OBJECT = re.compile(r"lib(?P<name>[A-Za-z0-9_+-]+)\.so(?:\.(?P<major>\d+))?")


class KVTierError(Exception):
    """Root of every error raised by kvtier."""


class ConfigError(KVTierError, ValueError):
    """A configuration, URL, key or argument is invalid; the message says how to fix it."""


class StoreNotFoundError(ConfigError):
    """A store opened read-only (to inspect it) does not exist; nothing was created."""


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
    """An optional dependency cannot be imported; the message names what is missing (the
    import error's own text) and the fix: the extra to install, or, when the extra is
    installed but a system library it loads is not, that library."""

    def __init__(self, feature: str, extra: str, cause: ImportError | None = None) -> None:
        message = f"{feature} needs optional dependencies: pip install 'kvtier[{extra}]'"
        if cause is not None and not isinstance(cause, ModuleNotFoundError):
            library = _SHARED_OBJECT.search(str(cause))
            fix = f"install the system library {library[0]}" if library else "reinstall it"
            if library:
                package = f"lib{library['name']}{library['major'] or ''}"
                fix += f" (Debian/Ubuntu: apt-get install {package})"
            message = (
                f"{feature}: kvtier[{extra}] is installed but does not load: "
                f"{shorten(str(cause))}; {fix}"
            )
        elif cause is not None:
            message += f" (missing module {cause.name!r})"
        super().__init__(message)
        self.extra = extra


_SHORT = reprlib.Repr()
"""Quotes input in errors in bounded time and length, however large it is."""
_SHORT.maxstring = _SHORT.maxother = 60
_SHORT.maxlist = _SHORT.maxdict = _SHORT.maxtuple = _SHORT.maxset = 4
_SHORT.maxlevel = 2


def quote(value: object) -> str:
    """``repr(value)``, bounded in time and length: for quoting input in errors."""
    return _SHORT.repr(value)


def shorten(text: str, limit: int = 300) -> str:
    """``text``, cut to ``limit`` characters with a note of what was left out."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"
