"""Copying chunks between stores: ``kvtier migrate`` (the copying itself is
:mod:`kvtier.core.migrate`'s)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer
from rich.table import Table

from kvtier.core.cli.apps import app, console, fail, parse_capacity, parse_options
from kvtier.core.cli.stores import INSPECT_CAPACITY, inspect_capacity, read_only
from kvtier.core.errors import BackendError, ConfigError, StoreNotFoundError
from kvtier.core.plugins import get_registry
from kvtier.core.urls import redact


@app.command()
def migrate(
    src_url: Annotated[str, typer.Argument(metavar="SRC_URL", help="Store to copy from.")],
    dst_url: Annotated[str, typer.Argument(metavar="DST_URL", help="Store to copy to.")],
    model: Annotated[
        list[str] | None,
        typer.Option(metavar="ID", help="Only chunks of this model id (repeatable)."),
    ] = None,
    namespace: Annotated[
        list[str] | None,
        typer.Option(metavar="NS", help="Only chunks in this namespace (repeatable)."),
    ] = None,
    tenant: Annotated[
        list[str] | None,
        typer.Option(metavar="NAME", help="Only chunks of this tenant (repeatable)."),
    ] = None,
    recode: Annotated[
        str | None,
        typer.Option(metavar="CODEC", help="Re-encode on the way, e.g. int8+zstd."),
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Also compare chunks already at the destination.")
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Count what would be copied; change nothing.")
    ] = False,
    delete_source: Annotated[
        bool,
        typer.Option("--delete-source", help="Delete each source chunk once its copy is verified."),
    ] = False,
    concurrency: Annotated[
        int, typer.Option(min=1, max=256, metavar="N", help="Batches in flight.")
    ] = 4,
    batch: Annotated[
        int, typer.Option(min=1, max=4096, metavar="N", help="Chunks per backend call.")
    ] = 8,
    src_option: Annotated[
        list[str] | None,
        typer.Option("--src-option", metavar="KEY=VALUE", help="Source option (repeatable)."),
    ] = None,
    dst_option: Annotated[
        list[str] | None,
        typer.Option("--dst-option", metavar="KEY=VALUE", help="Destination option (repeatable)."),
    ] = None,
    src_capacity: Annotated[
        str | None,
        typer.Option(metavar="SIZE", help="Capacity of a bounded source (default: unbounded)."),
    ] = None,
    dst_capacity: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE", help="Capacity of a bounded destination (default: unbounded)."
        ),
    ] = None,
) -> None:
    """Copy chunks between stores: resumable, checksummed, optionally re-encoded.

    Chunks already at the destination are skipped, so an interrupted run resumes.
    Every chunk is checked on read and read back after it is written; corrupt source
    chunks are reported, never copied. Exits with 1 if a chunk failed or mismatched.
    """
    from rich.filesize import decimal
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as ProgressBar

    from kvtier.core.codecs.pipeline import CodecPipeline
    from kvtier.core.factory import build_backend
    from kvtier.core.migrate import MigrateOptions, count_chunks
    from kvtier.core.migrate import migrate as run_migration
    from kvtier.core.migrate_report import MigrationReport
    from kvtier.core.selection import ChunkFilter

    if src_url.rstrip("/") == dst_url.rstrip("/"):
        raise ConfigError(
            f"SRC_URL and DST_URL are the same store ({redact(src_url)}); name two stores"
        )
    registry = get_registry()
    capacities = [
        inspect_capacity(url) if text is None else parse_capacity(flag, text)  # never evict
        for flag, url, text in (("--src-capacity", src_url, src_capacity),
                                ("--dst-capacity", dst_url, dst_capacity))
    ]  # fmt: skip
    options = MigrateOptions(
        select=ChunkFilter(tuple(model or ()), tuple(namespace or ()), tuple(tenant or ())),
        recode=None if recode is None else CodecPipeline.from_config(recode, registry),
        batch_size=batch, concurrency=concurrency, verify=verify, dry_run=dry_run,
        delete_source=delete_source,
    )  # fmt: skip
    src_options = parse_options(src_option)
    if not delete_source:  # a missing source is an error, and nothing is made there
        src_options = read_only(src_url, src_options)
    dst_options = parse_options(dst_option)
    if dry_run:
        dst_options = read_only(dst_url, dst_options)
    source = build_backend(src_url, capacity=capacities[0], options=src_options, registry=registry)
    destination = build_backend(
        dst_url, capacity=capacities[1], options=dst_options, registry=registry
    )
    bar = ProgressBar(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[moved]}  {task.fields[rate]}  ETA"), TimeRemainingColumn(),
        console=console,
    )  # fmt: skip
    seen: list[MigrationReport] = []

    def show(report: MigrationReport) -> None:
        seen[:] = [report]
        task = bar.tasks[0]
        rate = report.bytes_read / max(task.elapsed or 0.0, 1e-9)
        bar.update(task.id, completed=report.processed,
                   moved=decimal(report.bytes_read), rate=f"{decimal(int(rate))}/s")  # fmt: skip

    async def run() -> MigrationReport:
        nonlocal destination
        if dry_run:  # a destination that does not exist yet has none of the chunks
            try:
                await destination.open()
            except StoreNotFoundError:
                destination = build_backend("cpu://dry-run", capacity=INSPECT_CAPACITY)
        async with source, destination:
            total = await count_chunks(source, options.select)
            with bar:
                bar.add_task("dry run" if dry_run else "migrate", total=total, moved="", rate="")
                return await run_migration(source, destination, options, show)

    def summary(report: MigrationReport) -> Table:
        speed = decimal(int(report.bytes_read / max(report.seconds, 1e-9)))
        table = Table(title="kvtier migrate" + (" (dry run)" if dry_run else ""))
        table.add_column("chunks")
        table.add_column("count", justify="right")
        rows = [("from", redact(src_url)), ("to", redact(dst_url)),
                ("would copy" if dry_run else "copied", report.copied),
                ("skipped (at destination)", report.skipped),
                ("mismatched at destination", report.mismatched),
                ("corrupt at source", report.corrupt), ("failed", report.failed),
                ("deleted from source", report.deleted),
                ("bytes read", decimal(report.bytes_read)),
                ("bytes written", decimal(report.bytes_written)),
                ("time", f"{report.seconds:.2f} s"),
                ("throughput", f"{speed}/s")]  # fmt: skip
        for name, value in rows:
            table.add_row(name, str(value))
        return table

    try:
        report = asyncio.run(run())
    except (KeyboardInterrupt, BackendError):  # what was copied stays; a rerun resumes
        if seen:
            console.print(summary(seen[0]))
        raise
    console.print(summary(report))
    for outcome, key, reason in report.problems:
        console.print(f"{outcome.value}: {key}: {reason}", markup=False, highlight=False)
    unlisted = report.failed + report.mismatched + report.corrupt - len(report.problems)
    if unlisted:
        console.print(f"... and {unlisted} more problem chunks", markup=False, highlight=False)
    if not report.ok:
        fail(f"{report.failed} chunks failed and {report.mismatched} mismatched; a rerun "
              "retries the failed ones", code=1)  # fmt: skip
