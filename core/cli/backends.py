"""Checking a backend against a live store: ``kvtier check-backend``."""

from __future__ import annotations

from typing import Annotated

import typer

from kvtier.core.cli.apps import CapacityOption, OptionOption, app, parse_capacity
from kvtier.core.plugins import get_registry


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
        args.append(f"--kvtier-backend-capacity={parse_capacity('--capacity', capacity)}")
    args += [f"--kvtier-backend-option={pair}" for pair in option or ()]
    raise SystemExit(int(pytest.main(args + list(pytest_args or ()))))
