"""kvtier's pytest plugin (entry point ``pytest11``): options for live conformance runs.

``kvtier check-backend URL`` runs the suite of :mod:`kvtier.core.testing.live` with::

    --kvtier-backend-url URL              the store to test (data is written to it)
    --kvtier-backend-capacity SIZE        bytes, or e.g. 64MiB / 2GiB
    --kvtier-backend-option KEY=VALUE     repeatable; VALUE is read as YAML (true, 8, lfu)

This module registers those options and the ``slow`` marker the suite uses, and hands
the parsed target to tests through the ``kvtier_live_target`` fixture. pytest imports
it in every run where kvtier is installed, so it imports nothing heavy (no torch).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

SUITE_MODULES = "base batches capacity concurrency conformance harness lifetime out_of_band ranges"
"""Modules of ``kvtier.core.testing`` whose asserts pytest rewrites (the suite's)."""
pytest.register_assert_rewrite(*(f"kvtier.core.testing.{name}" for name in SUITE_MODULES.split()))


@dataclass(frozen=True)
class LiveTarget:
    """The backend named on the command line."""

    url: str
    capacity: int | None = None
    options: dict[str, Any] = field(default_factory=dict)


LIVE_TARGET = pytest.StashKey[LiveTarget | None]()


def parse_option(text: str) -> tuple[str, Any]:
    """``"eviction=lfu"`` -> ``("eviction", "lfu")``; the value is read as YAML."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"--kvtier-backend-option {text!r} must look like KEY=VALUE")
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise ValueError(f"--kvtier-backend-option {text!r}: bad value: {exc}") from None


def parse_target(config: pytest.Config) -> LiveTarget | None:
    """The target given by the ``--kvtier-backend-*`` options; ``None`` without a URL."""
    url: str | None = config.getoption("kvtier_backend_url")
    capacity: str | None = config.getoption("kvtier_backend_capacity")
    pairs: list[str] = config.getoption("kvtier_backend_option")
    if url is None:
        if capacity is not None or pairs:
            raise ValueError("--kvtier-backend-capacity/-option need --kvtier-backend-url")
        return None
    size = None
    if capacity is not None:
        from kvtier.core.config import parse_size

        try:
            size = parse_size(capacity)
        except ValueError as exc:
            raise ValueError(f"--kvtier-backend-capacity: {exc}") from None
    return LiveTarget(url, size, dict(parse_option(pair) for pair in pairs))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kvtier", "kvtier backend conformance (kvtier check-backend)")
    group.addoption(
        "--kvtier-backend-url",
        metavar="URL",
        help="run kvtier.core.testing.live against this backend URL (writes data to it)",
    )
    group.addoption(
        "--kvtier-backend-capacity",
        metavar="SIZE",
        help="capacity of the backend under test: bytes or e.g. 64MiB, 2GiB",
    )
    group.addoption(
        "--kvtier-backend-option",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="backend option, VALUE read as YAML (repeatable)",
    )


def pytest_configure(config: pytest.Config) -> None:
    if not any(line.startswith("slow:") for line in config.getini("markers")):
        config.addinivalue_line("markers", "slow: long-running tests (64 MiB round trips)")
    try:
        config.stash[LIVE_TARGET] = parse_target(config)
    except ValueError as exc:
        raise pytest.UsageError(str(exc)) from None


@pytest.fixture
def kvtier_live_target(request: pytest.FixtureRequest) -> LiveTarget:
    """The ``--kvtier-backend-*`` target; skips the test when no URL was given."""
    target = request.config.stash.get(LIVE_TARGET, None)
    if target is None:
        pytest.skip(
            "no live backend given: pass --kvtier-backend-url URL (or run "
            "`kvtier check-backend URL`)"
        )
    return target
