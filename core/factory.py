"""Build backends and codec pipelines from names, URLs and option mappings."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvtier.core.backend import Backend
from kvtier.core.buffers import BufferPool
from kvtier.core.plugins import PluginRegistry, get_registry
from kvtier.core.urls import redact
from kvtier.core.validation import validate_model


def build_backend(
    url: str,
    *,
    capacity: int | None = None,
    options: Mapping[str, Any] | None = None,
    registry: PluginRegistry | None = None,
    pool: BufferPool | None = None,
) -> Backend:
    """An unopened backend for ``url``, its ``options`` validated by the spec's model.

    Raises :class:`ConfigError` for an unknown scheme, a URL the spec's ``check_url``
    refuses or bad options (checked before the backend's module is imported), and
    :class:`MissingExtraError` when the backend's optional dependencies are missing.
    """
    registry = registry or get_registry()
    spec = registry.backend_for_url(url)
    if spec.check_url is not None:
        spec.check_url(url)
    parsed = validate_model(spec.options, options, f"options of tier {redact(url)!r}")
    backend_cls = spec.load()  # after the checks: they need no optional dependency
    return backend_cls(url, parsed, capacity=capacity, pool=pool, registry=registry)
