"""The ``ops`` plugin: metrics on the tier-event hook, ``kvtier serve`` and ``kvtier top``.

Cheap to import: prometheus-client, starlette and uvicorn are imported only when metrics
are enabled or a command runs. Without ``kvtier[metrics]`` the hooks do nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kvtier.core.hookspecs import hookimpl
from kvtier.core.specs import SubcommandSpec, TierEvent
from kvtier.core.threads import resolve_cpus, starting_on

if TYPE_CHECKING:
    from kvtier.core.config import KVTierConfig

_observe: Any = None
"""The metrics' ``observe`` once a config enabled them (prometheus-client installed)."""


@hookimpl
def kvtier_configure(config: KVTierConfig) -> None:
    global _observe
    settings = config.ops.metrics
    if not settings.enabled:
        return
    try:
        from kvtier.plugins.ops import metrics
    except ImportError:  # kvtier[metrics] not installed: no metrics
        return
    current = metrics.metrics()
    current.max_tenants = settings.max_tenants
    with starting_on(resolve_cpus(config.thread_cpus)):
        metrics.start_sync(settings.sync_seconds)
    _observe = current.observe


@hookimpl
def kvtier_tier_event(event: TierEvent) -> None:
    if _observe is not None:
        _observe(event)


@hookimpl
def kvtier_subcommands() -> Iterable[SubcommandSpec]:
    from kvtier.plugins.ops import commands

    return [
        SubcommandSpec(name="serve", callback=commands.serve),
        SubcommandSpec(name="top", callback=commands.top),
    ]
