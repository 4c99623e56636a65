"""What is installed and configured: ``kvtier plugins`` and ``kvtier config validate``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from kvtier.core.buffers import BufferPool
from kvtier.core.cli.apps import LayoutOption, app, config_app, console
from kvtier.core.config import load_config
from kvtier.core.errors import ConfigError
from kvtier.core.factory import build_tiers
from kvtier.core.integrity import load_keys
from kvtier.core.layout import KVLayout, dtype_from_name
from kvtier.core.plugins import get_registry


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
