"""Invalidation: delete the chunks of a model, namespace or tenant from a store.

Works on every backend the same way, through its listing and batched deletes
(``iter_keys`` narrowed by the selection's prefix, then ``delete_many``), so it removes
exactly the matching chunks and nothing else. A selection that matches everything is
refused: dropping a whole store is not an invalidation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from kvtier.core.backend import Backend
from kvtier.core.errors import ConfigError
from kvtier.core.keys import ChunkKey, is_valid_key
from kvtier.core.migrate import ChunkFilter

PURGE_BATCH = 256
"""Keys per ``delete_many`` call."""


@dataclass
class PurgeReport:
    """What a purge found and did in one store."""

    matched: int = 0
    """Chunks the selection matched (all deleted unless ``dry_run``)."""
    deleted: int = 0
    """Chunks deleted (0 in a dry run; fewer than ``matched`` if another process
    deleted some meanwhile)."""
    dry_run: bool = False


def check_selection(select: ChunkFilter) -> None:
    """:class:`ConfigError` unless ``select`` names a model, namespace or tenant."""
    if not (select.models or select.namespaces or select.tenants):
        raise ConfigError(
            "purge needs a selection: give --model, --namespace or --tenant (a purge of "
            "every chunk is refused)"
        )


async def matching_keys(backend: Backend, select: ChunkFilter) -> list[str]:
    """The keys of the open ``backend`` that ``select`` matches (one listing; names
    that are not chunk keys are left out)."""
    return [
        key
        async for key in backend.iter_keys(select.prefix)
        if is_valid_key(key) and select.matches(ChunkKey.parse(key))
    ]


async def purge(
    backend: Backend,
    select: ChunkFilter,
    *,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    batch: int = PURGE_BATCH,
) -> PurgeReport:
    """Delete the chunks of the open ``backend`` that ``select`` matches. The store is
    listed first, then deleted from in batches (a listing never sees its own
    deletions); ``progress(done, total)`` is called after the listing and each batch."""
    check_selection(select)
    keys = await matching_keys(backend, select)
    report = PurgeReport(matched=len(keys), dry_run=dry_run)
    if progress is not None:
        progress(0, len(keys))
    if dry_run:
        return report
    for start in range(0, len(keys), batch):
        part = keys[start : start + batch]
        report.deleted += sum(await backend.delete_many(part))
        if progress is not None:
            progress(start + len(part), len(keys))
    return report
