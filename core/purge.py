"""Invalidation: delete the chunks of a model, namespace or tenant from a store.

Works on every backend the same way, through its listing and batched deletes
(``iter_keys`` narrowed by the selection's prefix, then ``delete_many``), so it removes
exactly the matching chunks and nothing else. A selection that matches everything is
refused: dropping a whole store is not an invalidation. ``older_than`` keeps only
chunks written at least that many seconds ago; it needs a backend that knows when its
chunks were written: one with an ``ages(keys)`` coroutine answering seconds since each
chunk was written, ``None`` where it is absent, pinned or of unknown age (never
purged by age), or raising :class:`ConfigError` saying why the store cannot tell.
Every built-in tier has one: ``cpu`` and ``nixl`` (this process's write times),
``file`` (mtime), ``s3`` (``LastModified``), ``vineyard`` (object creation time),
``redis`` (from its ``ttl``, see its backend) and ``mooncake`` (which refuses).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from kvtier.core.backend import Backend
from kvtier.core.errors import ConfigError
from kvtier.core.keys import ChunkKey, is_valid_key
from kvtier.core.selection import ChunkFilter

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


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``12h``, ``30d`` or ``2w``."""
    match = _DURATION_RE.match(text)
    if match is None or float(match[1]) <= 0:
        raise ConfigError(
            f"--older-than {text!r}: expected a positive duration like 90s, 15m, 12h, 30d or 2w"
        )
    return float(match[1]) * _SECONDS[match[2]]


def check_selection(select: ChunkFilter, older_than: float | None = None) -> None:
    """:class:`ConfigError` unless ``select`` names a model, namespace or tenant, or an
    age is given."""
    if not (select.models or select.namespaces or select.tenants or older_than):
        raise ConfigError(
            "purge needs a selection: give --model, --namespace, --tenant or --older-than "
            "(a purge of every chunk is refused)"
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
    older_than: float | None = None,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    batch: int = PURGE_BATCH,
) -> PurgeReport:
    """Delete the chunks of the open ``backend`` that ``select`` matches (and that are
    at least ``older_than`` seconds old). The store is listed first, then deleted from
    in batches (a listing never sees its own deletions); ``progress(done, total)`` is
    called after the listing and each batch."""
    check_selection(select, older_than)
    keys = await matching_keys(backend, select)
    if older_than is not None:
        keys = await _older(backend, keys, older_than, batch)
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


async def _older(backend: Backend, keys: list[str], seconds: float, batch: int) -> list[str]:
    """The ``keys`` written at least ``seconds`` ago."""
    ages = getattr(backend, "ages", None)
    if ages is None:
        raise ConfigError(
            f"--older-than needs a store that records when chunks were written; "
            f"{backend.safe_url} ({type(backend).__name__}) has no ages()"
        )
    old: list[str] = []
    for start in range(0, len(keys), batch) or [0]:  # asked even for no keys: it may refuse
        part = keys[start : start + batch]
        found = await ages(part)
        old += [k for k, a in zip(part, found, strict=True) if a is not None and a >= seconds]
    return old
