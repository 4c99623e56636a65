"""kvtier's hook specifications.

Plugins implement these with ``@kvtier.core.hookimpl``; every built-in backend and
codec is registered the same way. Hooks run when the plugin manager is built and when
a tier chain is configured, never per chunk: the per-chunk path calls backends
directly. Observer hooks (``kvtier_tier_event``) fire once per batch and must return
within microseconds.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from kvtier.core.config import KVTierConfig
    from kvtier.core.specs import (
        BackendSpec,
        CodecSpec,
        EvictionPolicySpec,
        SubcommandSpec,
        TierEvent,
    )

PROJECT = "kvtier"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def kvtier_backends() -> Iterable[BackendSpec]:  # type: ignore[empty-body]
    """Return the storage backends this plugin provides.

    Each :class:`~kvtier.core.specs.BackendSpec` claims a unique name and one or more
    URL schemes; a scheme or name claimed twice is a :class:`PluginError` naming both
    distributions. Example::

        @hookimpl
        def kvtier_backends():
            return [BackendSpec(name="ramdisk", schemes=("ramdisk",),
                                cls="my_pkg.ramdisk:RamdiskBackend", options=RamdiskOptions)]
    """


@hookspec
def kvtier_codecs() -> Iterable[CodecSpec]:  # type: ignore[empty-body]
    """Return the codec stages this plugin provides, each under a unique name.

    Example::

        @hookimpl
        def kvtier_codecs():
            return [CodecSpec(name="lz4", cls=Lz4Codec, options=Lz4Options)]
    """


@hookspec
def kvtier_eviction_policies() -> Iterable[EvictionPolicySpec]:  # type: ignore[empty-body]
    """Return the eviction policies this plugin provides, each under a unique name.

    Example::

        @hookimpl
        def kvtier_eviction_policies():
            return [EvictionPolicySpec(name="fifo", cls=FIFOPolicy)]
    """


@hookspec
def kvtier_subcommands() -> Iterable[SubcommandSpec]:  # type: ignore[empty-body]
    """Return the ``kvtier`` subcommands this plugin provides.

    Collected with the other specs whenever a plugin registry is built, which the
    ``kvtier`` command does each time it starts: keep the plugin module cheap to import
    and import heavy dependencies inside the command. A name claimed twice, or the name
    of a built-in command, is a :class:`PluginError` naming the plugins. Example::

        def hello(name: Annotated[str, typer.Option(help="Whom to greet.")] = "world") -> int:
            "Greet someone."
            print(f"hello {name}")
            return 0

        @hookimpl
        def kvtier_subcommands():
            return [SubcommandSpec(name="hello", callback=hello)]
    """


@hookspec
def kvtier_configure(config: KVTierConfig) -> None:
    """Called with the validated config each time a :class:`KVTier` is opened, before
    any tier is built.

    Not historic: a registry lives for the process and is opened against many times,
    so keeping every call for late plugins would hold every config forever. Use it to
    read plugin settings or start exporters; raise :class:`ConfigError` to reject the
    configuration. Example::

        @hookimpl
        def kvtier_configure(config):
            if config.chunk_tokens % 16:
                raise ConfigError("my plugin needs chunk_tokens divisible by 16")
    """


@hookspec
def kvtier_tier_event(event: TierEvent) -> None:
    """Observe one batch outcome: chunks stored, hit, missed, evicted, failed, corrupt
    or dropped in one tier.

    Fired once per batch, from kvtier's I/O thread (or, for ``dropped``, from the thread
    calling ``store``): keep it thread safe and to microseconds (count, don't do I/O).
    Exceptions are logged and ignored. Example::

        @hookimpl
        def kvtier_tier_event(event):
            HITS.labels(event.tier).inc(event.count) if event.kind == "hit" else None
    """
