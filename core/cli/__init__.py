"""The ``kvtier`` command line: the built-in commands below, and those that plugins
give through ``kvtier_subcommands`` (``kvtier demo`` comes from
``kvtier.plugins.transformers``).

Bad arguments, URLs and configs print one line, ``kvtier: error: ...``, and exit with
code 2; an unreachable store exits with 1. No tracebacks for either.

Modules: :mod:`~kvtier.core.cli.apps` (the typer apps, the console, shared options),
:mod:`~kvtier.core.cli.stores` (opening a store without changing it), and the commands
by what they serve: :mod:`~kvtier.core.cli.config` (``plugins``, ``config validate``),
:mod:`~kvtier.core.cli.inspection` (``ls``, ``stats``), :mod:`~kvtier.core.cli.backends`
(``check-backend``), :mod:`~kvtier.core.cli.migration` (``migrate``) and
:mod:`~kvtier.core.cli.purging` (``purge``). This module puts them together with the
plugins' commands and runs them (``main``, the ``kvtier`` console script).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import typer
import typer.main
from typer.core import TyperGroup
from typer.exceptions import TyperException

# The command modules register their commands on ``app`` when imported, in this order
# (the order of ``kvtier --help``).
# isort: off
from kvtier.core.cli import config, inspection, backends, migration, purging  # noqa: F401

# isort: on
from kvtier.core.cli.apps import COMMAND_SETTINGS, app, console, fail
from kvtier.core.errors import BackendError, ConfigError, KVTierError, PluginError
from kvtier.core.plugins import PluginRegistry, get_registry

__all__ = ["commands", "console", "main"]


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
        fail(f"{exc.format_message()}{hint}", code=getattr(exc, "exit_code", 2))  # type: ignore[attr-defined]
    except (typer.Abort, KeyboardInterrupt):
        fail("aborted", code=130)
    except ConfigError as exc:
        fail(str(exc).replace("\n", "; "))
    except BackendError as exc:
        fail(str(exc), code=1)
    except KVTierError as exc:
        fail(str(exc), code=2)
    if isinstance(status, int) and status:
        raise SystemExit(status)


def main() -> None:
    """Console-script entry point."""
    _run(lambda **options: commands(get_registry()).main(**options))
