"""The ``kvtier`` command line: the built-in commands below, and those that plugins
give through ``kvtier_subcommands`` (``kvtier demo`` comes from
``kvtier.plugins.transformers``).

Bad arguments, URLs and configs print one line, ``kvtier: error: ...``, and exit with
code 2; an unreachable store exits with 1. No tracebacks for either.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
import typer.main
import yaml
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup
from typer.exceptions import TyperException

from kvtier.core.backend import Backend
from kvtier.core.buffers import BufferPool
from kvtier.core.config import load_config, parse_size
from kvtier.core.errors import (
    BackendError,
    ConfigError,
    KVTierError,
    PluginError,
    StoreNotFoundError,
)
from kvtier.core.factory import build_tiers
from kvtier.core.integrity import load_keys
from kvtier.core.layout import KVLayout, dtype_from_name
from kvtier.core.plugins import PluginRegistry, get_registry
from kvtier.core.urls import redact

COMMAND_SETTINGS: dict[str, Any] = dict(
    add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None
)
"""The settings of kvtier's typer apps: plain help text, kvtier's own error lines."""
app = typer.Typer(
    name="kvtier",
    help="Store and reuse LLM KV caches across storage tiers.",
    no_args_is_help=True,
    **COMMAND_SETTINGS,
)
"""The built-in commands; :func:`commands` adds the plugins' to them."""
config_app = typer.Typer(help="Check configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console(width=None if sys.stdout.isatty() else 120)
"""Rich output; 120 columns when piped (logs, CI) instead of rich's default 80."""

INSPECT_CAPACITY = 1 << 62
"""Capacity given to bounded backends opened only for inspection: so large that opening
never evicts anything (a file tier trims an over-full folder on open)."""

CapacityOption = Annotated[
    str | None,
    typer.Option("--capacity", help="Capacity for bounded backends, e.g. 2GiB."),
]
LayoutOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        help="Model layers; with --kv-heads and --head-dim, also check the codecs for it.",
    ),
]
OptionOption = Annotated[
    list[str] | None,
    typer.Option("--option", "-o", help="Backend option KEY=VALUE (repeatable)."),
]


def _fail(message: str, code: int = 2) -> NoReturn:
    print(f"kvtier: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def parse_options(pairs: list[str] | None) -> dict[str, Any]:
    """``["eviction=lfu", "fsync=true"]`` -> ``{"eviction": "lfu", "fsync": True}``."""
    options: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--option {pair!r} must look like KEY=VALUE, e.g. eviction=lfu")
        options[key] = yaml.safe_load(value)
    return options


def _capacity(text: str) -> int:
    try:
        return parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"--capacity: {exc}") from None


def _inspect_capacity(url: str) -> int | None:
    """The capacity to open ``url``'s backend with when it must not evict anything:
    :data:`INSPECT_CAPACITY` for bounded backends, none for the others."""
    bounded = get_registry().backend_for_url(url).load().capabilities.bounded
    return INSPECT_CAPACITY if bounded else None


def _read_only(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` plus ``read_only: true`` where ``url``'s backend has that option (it
    then creates nothing, and a missing store is an error naming it)."""
    if "read_only" in get_registry().backend_for_url(url).options.model_fields:
        return {"read_only": True, **options}
    return options


@asynccontextmanager
async def _inspected(url: str, options: list[str] | None) -> AsyncIterator[Backend]:
    """``url``'s backend, opened to read: nothing is written, nothing is evicted."""
    from kvtier.core.factory import build_backend

    parsed = _read_only(url, parse_options(options))
    backend = build_backend(url, capacity=_inspect_capacity(url), options=parsed)
    await backend.open()
    try:
        yield backend
    finally:
        await backend.close()


@app.command()
def plugins() -> None:
    """List every plugin with its distribution, version and what it provides."""
    table = Table(title="kvtier plugins")
    for column in ("plugin", "distribution", "version", "provides", "hooks"):
        table.add_column(column)
    for info in get_registry().plugins():
        table.add_row(info.name, info.distribution, info.version,
                      ", ".join(info.provides), ", ".join(info.hooks))  # fmt: skip
    console.print(table)


@config_app.command("validate")
def config_validate(
    file: Annotated[Path, typer.Argument(help="YAML config file.")],
    layers: LayoutOption = None,
    kv_heads: Annotated[int | None, typer.Option(min=1, help="KV heads per layer.")] = None,
    head_dim: Annotated[int | None, typer.Option(min=1, help="Head size.")] = None,
    dtype: Annotated[str, typer.Option(help="KV dtype, with a layout.")] = "float16",
) -> None:
    """Check a config file as opening it would, without connecting, and show its tiers."""
    cfg = load_config(file)
    registry = get_registry(frozenset(cfg.plugins.disable))
    layout = None
    given = [layers, kv_heads, head_dim]
    if any(n is not None for n in given):
        if None in given:
            raise ConfigError("give --layers, --kv-heads and --head-dim together (a KV layout)")
        layout = KVLayout(layers, kv_heads, head_dim, dtype_from_name(dtype))  # type: ignore[arg-type]
    tiers = build_tiers(cfg, registry, BufferPool(max_idle_bytes=0), layout=layout)
    if cfg.integrity is not None:
        load_keys(cfg.integrity, cfg.tenant, os.environ)
    checked = "" if layout is None else f", codecs for {layers}x{kv_heads}x{head_dim} {dtype}"
    checked += "" if cfg.integrity is None else ", integrity keys"
    table = Table(title=f"{file}: valid (URLs, options, capacities{checked}; not connected)")
    for column in ("tier", "url", "backend", "capacity", "codec", "write", "promote"):
        table.add_column(column)
    for tier in tiers:
        capacity = tier.config.capacity
        shown = "-" if capacity is None else f"{capacity / 2**30:.2f} GiB"
        table.add_row(tier.name, tier.stats.url, registry.backend_for_url(tier.config.url).name,
                      shown, tier.pipeline.name, tier.config.write_policy,
                      "yes" if tier.config.promote else "no")  # fmt: skip
    console.print(table)


async def _describe_keys(backend: Backend, prefix: str, limit: int) -> list[tuple[str, str, str]]:
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
                what = f"{header.pipeline} {list(header.shape)}"
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
        async with _inspected(url, option) as backend:
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
        async with _inspected(url, option) as backend:
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


@app.command("check-backend")
def check_backend(
    url: Annotated[str, typer.Argument(help="URL of a live store to test (data is written).")],
    capacity: CapacityOption = None,
    option: OptionOption = None,
    pytest_args: Annotated[
        list[str] | None, typer.Option("--pytest-arg", help="Extra pytest argument.")
    ] = None,
) -> None:
    """Run kvtier's backend conformance suite against a live store."""
    import pytest

    get_registry().backend_for_url(url)
    args = ["-q", "--pyargs", "kvtier.core.testing.live", f"--kvtier-backend-url={url}"]
    if capacity is not None:
        args.append(f"--kvtier-backend-capacity={_capacity(capacity)}")
    args += [f"--kvtier-backend-option={pair}" for pair in option or ()]
    raise SystemExit(int(pytest.main(args + list(pytest_args or ()))))


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
    from kvtier.core.migrate import ChunkFilter, MigrateOptions, MigrationReport, count_chunks
    from kvtier.core.migrate import migrate as run_migration

    if src_url.rstrip("/") == dst_url.rstrip("/"):
        raise ConfigError(
            f"SRC_URL and DST_URL are the same store ({redact(src_url)}); name two stores"
        )
    registry = get_registry()
    capacities: list[int | None] = []
    for flag, url, text in (("--src-capacity", src_url, src_capacity),
                            ("--dst-capacity", dst_url, dst_capacity)):  # fmt: skip
        try:
            capacities.append(None if text is None else parse_size(text))
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from None
        if text is None:
            capacities[-1] = _inspect_capacity(url)  # never evict what is there
    options = MigrateOptions(
        select=ChunkFilter(tuple(model or ()), tuple(namespace or ()), tuple(tenant or ())),
        recode=None if recode is None else CodecPipeline.from_config(recode, registry),
        batch_size=batch, concurrency=concurrency, verify=verify, dry_run=dry_run,
        delete_source=delete_source,
    )  # fmt: skip
    src_options = parse_options(src_option)
    if not delete_source:  # a missing source is an error, and nothing is made there
        src_options = _read_only(src_url, src_options)
    dst_options = parse_options(dst_option)
    if dry_run:
        dst_options = _read_only(dst_url, dst_options)
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
        _fail(f"{report.failed} chunks failed and {report.mismatched} mismatched; a rerun "
              "retries the failed ones", code=1)  # fmt: skip


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
    from kvtier.core.migrate import ChunkFilter
    from kvtier.core.purge import check_selection, parse_duration
    from kvtier.core.purge import purge as run_purge

    select = ChunkFilter(tuple(model or ()), tuple(namespace or ()), tuple(tenant or ()))
    age = None if older_than is None else parse_duration(older_than)
    check_selection(select, age)
    options = parse_options(option)
    if dry_run:
        options = _read_only(url, options)
    backend = build_backend(url, capacity=_inspect_capacity(url), options=options)
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


def _usage_errors() -> tuple[type[Exception], ...]:
    """Typer's usage errors: its own since it vendors click, click's before that."""
    errors: list[type[Exception]] = [TyperException]
    try:
        import click
    except ImportError:
        pass
    else:
        errors.append(click.ClickException)
    return tuple(errors)


def commands(registry: PluginRegistry) -> TyperGroup:
    """The ``kvtier`` command: the built-in commands and every plugin's subcommands."""
    group = typer.main.get_command(app)
    assert isinstance(group, TyperGroup)
    for name, spec in registry.subcommands.items():
        if name in group.commands:
            provider = next(p for p in registry.plugins() if f"subcommand:{name}" in p.provides)
            raise PluginError(
                f"plugin {provider.name!r} from {provider.distribution} {provider.version} "
                f"gives a subcommand {name!r}, but 'kvtier {name}' is a built-in command; "
                f"uninstall it (pip uninstall {provider.distribution})"
            )
        single = typer.Typer(**COMMAND_SETTINGS)
        single.command(name=name)(spec.callback)
        group.add_command(typer.main.get_command(single), name)
    return group


def _run(entry: Callable[..., Any]) -> None:
    """Run ``entry`` (a click-style ``main``) with kvtier's error lines; exit with the
    status a command returns."""
    try:
        status = entry(standalone_mode=False, prog_name="kvtier")
    except _usage_errors() as exc:
        ctx = getattr(exc, "ctx", None)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(f"{exc.format_message()}{hint}", code=getattr(exc, "exit_code", 2))  # type: ignore[attr-defined]
    except (typer.Abort, KeyboardInterrupt):
        _fail("aborted", code=130)
    except ConfigError as exc:
        _fail(str(exc).replace("\n", "; "))
    except BackendError as exc:
        _fail(str(exc), code=1)
    except KVTierError as exc:
        _fail(str(exc), code=2)
    if isinstance(status, int) and status:
        raise SystemExit(status)


def main() -> None:
    """Console-script entry point."""
    _run(lambda **options: commands(get_registry()).main(**options))
