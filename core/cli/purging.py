"""Deleting chunks from a store by model, namespace, tenant or age: ``kvtier purge``
(the deleting itself is :mod:`kvtier.core.purge`'s)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

import typer

from kvtier.core.cli.apps import OptionOption, app, console, parse_options
from kvtier.core.cli.stores import inspect_capacity, read_only
from kvtier.core.urls import redact


@app.command()
def purge(
    url: Annotated[str, typer.Argument(help="Store URL, e.g. file:///var/cache/kv.")],
    model: Annotated[
        list[str] | None, typer.Option(metavar="ID", help="Chunks of this model id (repeatable).")
    ] = None,
    namespace: Annotated[
        list[str] | None, typer.Option(metavar="NS", help="Chunks in this namespace (repeatable).")
    ] = None,
    tenant: Annotated[
        list[str] | None, typer.Option(metavar="NAME", help="Chunks of this tenant (repeatable).")
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option(metavar="AGE", help="Only chunks written at least AGE ago (90s, 12h, 30d)."),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be deleted; change nothing.")
    ] = False,
    option: OptionOption = None,
) -> None:
    """Delete exactly the chunks of a model, namespace or tenant (or older than an age)
    from a store.

    Selectors combine like 'kvtier migrate's: a chunk goes when it matches every kind
    given. A purge without a selector is refused.
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from kvtier.core.factory import build_backend
    from kvtier.core.purge import check_selection, parse_duration
    from kvtier.core.purge import purge as run_purge
    from kvtier.core.selection import ChunkFilter

    select = ChunkFilter(tuple(model or ()), tuple(namespace or ()), tuple(tenant or ()))
    age = None if older_than is None else parse_duration(older_than)
    check_selection(select, age)
    options = parse_options(option)
    if dry_run:
        options = read_only(url, options)
    backend = build_backend(url, capacity=inspect_capacity(url), options=options)
    verb = "would delete" if dry_run else "deleting"
    bar = Progress(
        TextColumn(f"{verb} chunks"),
        BarColumn(),
        MofNCompleteColumn(),
        console=console,
        transient=True,
    )

    async def run() -> Any:
        await backend.open()
        try:
            with bar:
                task = bar.add_task("purge", total=None)
                return await run_purge(
                    backend,
                    select,
                    older_than=age,
                    dry_run=dry_run,
                    progress=lambda done, total: bar.update(task, completed=done, total=total),
                )
        finally:
            await backend.close()

    report = asyncio.run(run())
    done = f"{report.matched} chunks match" if dry_run else f"deleted {report.deleted} chunks"
    console.print(
        f"{redact(url)}: {done} (dry run)" if dry_run else f"{redact(url)}: {done}",
        markup=False,
        highlight=False,
    )
