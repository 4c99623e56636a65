"""Testing tools for backend authors: the conformance suite and kvtier's pytest plugin.

``BackendConformance`` is imported lazily so that the pytest plugin in this package
(loaded by every pytest run where kvtier is installed) stays cheap to import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvtier.core.testing.conformance import BackendConformance

__all__ = ["BackendConformance"]


def __getattr__(name: str) -> Any:
    if name == "BackendConformance":
        from kvtier.core.testing.conformance import BackendConformance

        return BackendConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
