"""Compute the package list for the ``package-dir`` mapping in pyproject.toml.

setuptools cannot discover packages whose import names differ from their folders
(``kvtier.core`` lives in ``core/``), so the list is built here.
"""

from pathlib import Path

from setuptools import setup

ROOTS = {
    "kvtier.core": "core",
    "kvtier.backends": "backends",
    "kvtier.kernels": "kernels",
    "kvtier.plugins": "plugins",
}


def packages() -> list[str]:
    found = []
    for name, folder in ROOTS.items():
        for init in sorted(Path(folder).rglob("__init__.py")):
            parts = init.parent.relative_to(folder).parts
            found.append(".".join((name, *parts)))
    return found


setup(packages=packages())
