"""The checkout's top-level folders never shadow installed distributions.

``core/``, ``kernels/``, ``plugins/`` ... are importable only as ``kvtier.core`` etc.
(the package-dir mapping). Were the checkout root on ``sys.path`` (as ``python -m
pytest`` or ``PYTHONPATH=.`` put it), ``import kernels`` would find this checkout's
folder instead of Hugging Face's ``kernels`` distribution that transformers imports.
"""

from __future__ import annotations

import importlib.util
import sys
from importlib import metadata
from pathlib import Path

import pytest

CHECKOUT = Path(__file__).resolve().parents[1]
FOLDERS = sorted(p.name for p in CHECKOUT.iterdir() if p.is_dir() and (p / "__init__.py").is_file())


def _inside_checkout(path: str | None) -> bool:
    return path is not None and Path(path).resolve().is_relative_to(CHECKOUT)


def test_the_checkout_root_is_not_on_sys_path() -> None:
    assert FOLDERS, "no top-level package folders found: is CHECKOUT right?"
    on_path = [p for p in sys.path if Path(p or ".").resolve() == CHECKOUT]
    assert not on_path, f"{CHECKOUT} is on sys.path: its folders {FOLDERS} shadow installs"


@pytest.mark.parametrize("name", FOLDERS)
def test_a_top_level_folder_is_not_importable_by_its_own_name(name: str) -> None:
    module = sys.modules.get(name)
    if module is not None:
        assert not _inside_checkout(getattr(module, "__file__", None)), (
            f"{name!r} was imported from the checkout, not from an installed distribution"
        )
    spec = importlib.util.find_spec(name)
    if spec is None:
        return
    places = [spec.origin, *(spec.submodule_search_locations or [])]
    assert not any(map(_inside_checkout, places)), (
        f"`import {name}` resolves to the checkout's {name}/ folder ({places})"
    )


def test_installed_distributions_named_like_our_folders_win() -> None:
    """Hugging Face's ``kernels`` is installed by transformers: it must import from
    site-packages (the collision that broke the suite on a fresh machine)."""
    owners = metadata.packages_distributions()
    clashes = [name for name in FOLDERS if name in owners]
    for name in clashes:
        spec = importlib.util.find_spec(name)
        assert spec is not None and not _inside_checkout(spec.origin), (
            f"{name!r} of {owners[name]} is shadowed by the checkout's {name}/ folder"
        )
