"""Opening a store from the command line without changing it: nothing written, nothing
evicted, nothing created where a command only reads."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from kvtier.core.backend import Backend
from kvtier.core.cli.apps import parse_options
from kvtier.core.plugins import get_registry

INSPECT_CAPACITY = 1 << 62
"""Capacity given to bounded backends opened only for inspection: so large that opening
never evicts anything (a file tier trims an over-full folder on open)."""


def inspect_capacity(url: str) -> int | None:
    """The capacity to open ``url``'s backend with when it must not evict anything:
    :data:`INSPECT_CAPACITY` for bounded backends, none for the others."""
    bounded = get_registry().backend_for_url(url).load().capabilities.bounded
    return INSPECT_CAPACITY if bounded else None


def read_only(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus ``read_only: true`` where ``url``'s backend has that option (it
    then creates nothing, and a missing store is an error naming it)."""
    if "read_only" in get_registry().backend_for_url(url).options.model_fields:
        return {"read_only": True, **options}
    return options


@asynccontextmanager
async def inspected(url: str, options: list[str] | None) -> AsyncIterator[Backend]:
    """``url``'s backend, opened to read: nothing is written, nothing is evicted."""
    from kvtier.core.factory import build_backend

    parsed = read_only(url, parse_options(options))
    backend = build_backend(url, capacity=inspect_capacity(url), options=parsed)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()
