"""Looking into a store without changing it: ``kvtier ls`` and ``kvtier stats``."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer
from rich.table import Table

from kvtier.core.backend import Backend
from kvtier.core.cli.apps import OptionOption, app, console
from kvtier.core.cli.stores import inspected
from kvtier.core.errors import KVTierError
from kvtier.core.urls import redact


async def _describe_keys(backend: Backend, prefix: str, limit: int) -> list[tuple[str, str, str]]:
    """Up to ``limit`` rows (namespace, key, size with codec and shape, or why the blob
    is corrupt) for the keys of ``backend`` that start with ``prefix``."""
    from kvtier.core.blob import verify
    from kvtier.core.keys import ChunkKey

    rows: list[tuple[str, str, str]] = []
    async for key in backend.iter_keys(prefix):
        if len(rows) >= limit:
            break
        (blob,) = await backend.get_many([key])
        if blob is None:
            continue
        with blob:
            try:
                header = verify(blob.view, expected_key=key)
                layered = ", layered" if header.layers is not None else ""
                what = f"{header.pipeline}{layered} {list(header.shape)}"
            except KVTierError as exc:
                what = f"CORRUPT: {exc}"
            rows.append((ChunkKey.parse(key).namespace, key, f"{blob.nbytes} B  {what}"))
    return rows


@app.command("ls")
def ls(
    url: Annotated[str, typer.Argument(help="Store URL, e.g. file:///var/cache/kv.")],
    prefix: Annotated[str, typer.Option(help="Only keys starting with this.")] = "",
    limit: Annotated[int, typer.Option(min=1, help="At most this many keys.")] = 100,
    option: OptionOption = None,
) -> None:
    """List the chunks in a store: namespace, key, size, codec and shape."""

    async def run() -> list[tuple[str, str, str]]:
        async with inspected(url, option) as backend:
            return await _describe_keys(backend, prefix, limit)

    table = Table(title=redact(url))
    for column in ("namespace", "key", "blob"):
        table.add_column(column)
    for row in asyncio.run(run()):
        table.add_row(*row)
    console.print(table)


@app.command()
def stats(
    url: Annotated[str, typer.Argument(help="Store URL, e.g. file:///var/cache/kv.")],
    option: OptionOption = None,
) -> None:
    """Show a store's counters and its chunks per namespace."""
    from kvtier.core.keys import ChunkKey

    async def run() -> tuple[Any, dict[str, int]]:
        async with inspected(url, option) as backend:
            per_namespace: dict[str, int] = {}
            async for key in backend.iter_keys():
                ns = ChunkKey.parse(key).namespace
                per_namespace[ns] = per_namespace.get(ns, 0) + 1
            return await backend.stats(), per_namespace

    snapshot, per_namespace = asyncio.run(run())
    table = Table(title=redact(url))
    table.add_column("stat")
    table.add_column("value", justify="right")
    for name in ("keys", "bytes_used", "evictions"):
        table.add_row(name, str(getattr(snapshot, name)))
    for name, value in snapshot.details.items():
        table.add_row(name, str(value))
    for ns, count in sorted(per_namespace.items()):
        table.add_row(f"chunks in {ns}", str(count))
    console.print(table)
