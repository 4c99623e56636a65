"""Shared fixtures: installed fake plugin distributions; real servers from ``servers/``."""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]

# `python -m pytest` puts the working directory first on sys.path, where the checkout's
# top-level folders (kernels/, core/, ...) would shadow installed distributions of the
# same name (Hugging Face's `kernels`, imported by transformers). kvtier itself is
# imported through its installed package-dir mapping, never from the checkout root.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != CHECKOUT]

FakeDist = Callable[..., Path]


@pytest.fixture(autouse=True)
def strict_tiers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bug in a backend fails the test instead of passing for an outage (a test about
    the production behaviour turns it off with ``monkeypatch.setattr``)."""
    from kvtier.core import tier

    monkeypatch.setattr(tier, "STRICT", True)


pytest_plugins = sorted(
    f"servers.{path.stem}"
    for path in (Path(__file__).parent / "servers").glob("*.py")
    if not path.stem.startswith("_")
)


@pytest.fixture
def fake_dist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeDist:
    """Install a fake distribution: a ``.dist-info`` folder with ``kvtier`` entry points
    plus its modules, on ``sys.path`` for this test only."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    created: list[str] = []

    def make(
        name: str, entry_points: dict[str, str], modules: dict[str, str], version: str = "1.0"
    ) -> Path:
        info = root / f"{name.replace('-', '_')}-{version}.dist-info"  # wheel naming
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        lines = "".join(f"{ep} = {target}\n" for ep, target in entry_points.items())
        (info / "entry_points.txt").write_text("[kvtier]\n" + lines)
        for module, source in modules.items():
            (root / f"{module}.py").write_text(textwrap.dedent(source))
            created.append(module)
        return info

    yield make
    for module in created:
        sys.modules.pop(module, None)
