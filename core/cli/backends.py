"""Checking a backend against a live store: ``kvtier check-backend``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated

import typer

from kvtier.core.cli.apps import CapacityOption, OptionOption, app, parse_capacity
from kvtier.core.plugins import get_registry

SUITE_MODULE = "from kvtier.core.testing.live import TestLiveBackend  # noqa: F401\n"
"""The test module ``check-backend`` runs: the conformance suite of ``live.py``."""


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
    args = [f"--kvtier-backend-url={url}"]
    if capacity is not None:
        args.append(f"--kvtier-backend-capacity={parse_capacity('--capacity', capacity)}")
    args += [f"--kvtier-backend-option={pair}" for pair in option or ()]
    # pytest collects a module of its own that imports the suite by its installed name:
    # collecting kvtier/core/testing/live.py itself would import it as ``core.testing.live``
    # and put the folder above ``core/`` (the checkout, or site-packages/kvtier) on
    # sys.path. The folder also keeps the caller's pytest configuration out, and
    # importlib mode leaves sys.path alone.
    with tempfile.TemporaryDirectory(prefix="kvtier-check-backend-") as folder:
        module = Path(folder) / "test_kvtier_backend.py"
        module.write_text(SUITE_MODULE)
        args += ["-q", "-p", "no:cacheprovider", "--import-mode=importlib"]
        args += [f"--rootdir={folder}", str(module)]
        code = pytest.main(args + list(pytest_args or ()))
    raise SystemExit(int(code))
