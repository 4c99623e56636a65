"""Spec objects that plugins return from kvtier's hooks.

A spec names what a plugin provides and how to build it. Classes may be given as
``"module:Class"`` strings so that registering a backend does not import its client
library: the import happens when a tier first uses it, and a missing optional
dependency then says which extra to install.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from pydantic import BaseModel, ConfigDict

from kvtier.core.errors import MissingExtraError, PluginError

if TYPE_CHECKING:
    from kvtier.core.backend import Backend
    from kvtier.core.codec import Codec
    from kvtier.core.eviction import EvictionPolicy


class NoOptions(BaseModel):
    """Options model for plugins that take none: any key is an error."""

    model_config = ConfigDict(extra="forbid")


def _load_ref(ref: type | str, what: str, extra: str | None) -> type:
    if not isinstance(ref, str):
        return ref
    module_name, _, attr = ref.partition(":")
    if not attr:
        raise PluginError(f"{what}: class reference {ref!r} must look like 'package.module:Class'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        if extra is not None:
            raise MissingExtraError(what, extra, exc) from exc
        raise PluginError(f"{what}: cannot import {module_name!r}: {exc}") from exc
    loaded = getattr(module, attr, None)
    if not isinstance(loaded, type):
        raise PluginError(f"{what}: {ref!r} does not name a class")
    return loaded


@dataclass(frozen=True, kw_only=True)
class _ClassSpec:
    name: str
    options: type[BaseModel] = NoOptions
    """Pydantic model validating the options users give in the config."""
    description: str = ""
    extra: str | None = None
    """Extra to install when importing the class fails, e.g. ``"s3"`` -> ``kvtier[s3]``."""

    def _load(self, ref: type | str) -> type:
        return _load_ref(ref, f"{type(self).__name__} {self.name!r}", self.extra)


@dataclass(frozen=True, kw_only=True)
class BackendSpec(_ClassSpec):
    """A storage backend, selected in the tier chain by the URL scheme.

    Example::

        BackendSpec(name="s3", schemes=("s3",), cls="kvtier.backends.s3:S3Backend",
                    options=S3Options, extra="s3")
    """

    cls: type[Backend] | str
    """The backend class, or ``"module:Class"`` to import it on first use."""
    schemes: tuple[str, ...]
    check_url: Callable[[str], Any] | None = None
    """Raises :class:`~kvtier.core.errors.ConfigError` for a URL the backend cannot use;
    runs before ``cls`` is imported, so a bad URL is reported even without the extra."""

    def load(self) -> type[Backend]:
        """The backend class, importing it if it was given as ``"module:Class"``."""
        return cast("type[Backend]", self._load(self.cls))


@dataclass(frozen=True, kw_only=True)
class CodecSpec(_ClassSpec):
    """A codec stage, selected by ``name`` in a tier's ``codec`` pipeline.

    Example::

        CodecSpec(name="zstd", cls=ZstdCodec, options=ZstdOptions)
    """

    cls: type[Codec] | str

    def load(self) -> type[Codec]:
        """The codec class, importing it if it was given as ``"module:Class"``."""
        return cast("type[Codec]", self._load(self.cls))


@dataclass(frozen=True, kw_only=True)
class EvictionPolicySpec(_ClassSpec):
    """An eviction policy, selected by ``name`` in a bounded tier's options.

    Example::

        EvictionPolicySpec(name="lru", cls=LRUPolicy)
    """

    cls: type[EvictionPolicy] | str

    def load(self) -> type[EvictionPolicy]:
        """The policy class, importing it if it was given as ``"module:Class"``."""
        return cast("type[EvictionPolicy]", self._load(self.cls))


@dataclass(frozen=True, kw_only=True)
class SubcommandSpec:
    """A ``kvtier`` subcommand, run as ``kvtier NAME``.

    ``callback`` is a typer command: its parameters, annotated with ``typer.Option``
    and ``typer.Argument``, become the command's options and arguments, and its
    docstring the command's help. It returns ``None`` or an exit status. The CLI
    imports every plugin module each time it starts, so import heavy dependencies
    inside ``callback``, when the command runs. Raise :class:`ConfigError` for bad
    input and :class:`MissingExtraError` for a missing optional dependency: either is
    printed as one line, ``kvtier: error: ...``, with exit status 2.

    Example::

        SubcommandSpec(name="demo", callback=demo)
    """

    name: str
    callback: Callable[..., int | None]


class EventKind(str, enum.Enum):
    """What happened to a batch of chunks in one tier."""

    STORED = "stored"
    HIT = "hit"
    MISS = "miss"
    EVICTED = "evicted"
    FAILED = "failed"
    CORRUPT = "corrupt"
    DROPPED = "dropped"


@dataclass(frozen=True)
class TierEvent:
    """One batch outcome reported to ``kvtier_tier_event``.

    ``tier`` is the tier's name (``"-"`` for the store queue), ``count`` the number of
    chunks, ``nbytes`` their encoded size where known, ``seconds`` the batch's wall
    time, ``keys`` the chunk key strings.
    """

    kind: EventKind
    tier: str
    count: int
    nbytes: int = 0
    seconds: float = 0.0
    keys: tuple[str, ...] = ()
    detail: str = ""


@dataclass(frozen=True)
class PluginInfo:
    """A registered plugin as ``kvtier plugins`` lists it."""

    name: str
    distribution: str
    version: str
    provides: tuple[str, ...] = ()
    hooks: tuple[str, ...] = ()
