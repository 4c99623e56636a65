"""The ``kvtier`` typer apps, the console they print to, and what their commands share:
option types, ``--option`` and size parsing, and the one-line error exit."""

from __future__ import annotations

import sys
from typing import Annotated, Any, NoReturn

import typer
import yaml
from rich.console import Console

from kvtier.core.config import parse_size
from kvtier.core.errors import ConfigError

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
"""The built-in commands; :func:`kvtier.core.cli.commands` adds the plugins' to them."""
config_app = typer.Typer(help="Check configuration files.", no_args_is_help=True)
app.add_typer(config_app, name="config")
console = Console(width=None if sys.stdout.isatty() else 120)
"""Rich output; 120 columns when piped (logs, CI) instead of rich's default 80."""

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


def fail(message: str, code: int = 2) -> NoReturn:
    """Print ``kvtier: error: <message>`` to stderr and exit with ``code``."""
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


def parse_capacity(flag: str, text: str) -> int:
    """The bytes ``text`` (e.g. ``2GiB``) names; a :class:`ConfigError` naming ``flag`` if
    it names none."""
    try:
        return parse_size(text)
    except ValueError as exc:
        raise ConfigError(f"{flag}: {exc}") from None
