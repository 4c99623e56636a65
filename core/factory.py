"""Build backends, and a config's tier chain, from URLs, options and codec names."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from typing import Any

import torch

from kvtier.core.backend import Backend
from kvtier.core.buffers import BufferPool
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.config import KVTierConfig
from kvtier.core.errors import ConfigError
from kvtier.core.layout import KVLayout
from kvtier.core.plugins import PluginRegistry, get_registry
from kvtier.core.specs import TierEvent
from kvtier.core.tier import Tier
from kvtier.core.urls import redact, scrub
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
    try:
        spec = registry.backend_for_url(url)
        if spec.check_url is not None:
            spec.check_url(url)
        parsed = validate_model(spec.options, options, f"options of tier {redact(url)!r}")
        backend_cls = spec.load()  # after the checks: they need no optional dependency
        return backend_cls(url, parsed, capacity=capacity, pool=pool, registry=registry)
    except ConfigError as exc:  # whatever part of the URL a message quotes, no secret
        raise type(exc)(scrub(str(exc), url)) from None


def build_tiers(
    config: KVTierConfig,
    registry: PluginRegistry,
    pool: BufferPool,
    *,
    layout: KVLayout | None = None,
    emit: Callable[[TierEvent], None] = lambda event: None,
) -> list[Tier]:
    """The tiers of ``config``, unopened: every check opening the chain makes before it
    connects, so that ``kvtier config validate`` runs them too.

    Checks each tier's URL, options, capacity rules (a bounded backend needs one, some
    refuse one) and codec pipeline; with ``layout``, that each pipeline can encode a
    chunk of it; that a ``write_policy: back`` tier sits below one that hands over its
    evictions; and that no two tiers share a location. Raises one
    :class:`ConfigError` naming every problem (or :class:`MissingExtraError`).
    """
    tiers: list[Tier] = []
    problems: list[str] = []
    for tier_config in config.tiers:
        where = f"tier {tier_config.name!r} ({redact(tier_config.url)})"
        try:
            backend = build_backend(
                tier_config.url,
                capacity=tier_config.capacity,
                options=tier_config.options,
                registry=registry,
                pool=pool,
            )
            if getattr(backend.options, "read_only", False):
                raise ConfigError(
                    "read_only is for inspecting a store (kvtier ls, stats); a tier chain "
                    "writes to its tiers: remove read_only"
                )
            layered = config.blob_layout == "layers"
            pipeline = CodecPipeline.from_config(tier_config.codec, registry, layered=layered)
            if layout is not None:
                _check_codec(pipeline, layout, pool)
        except ConfigError as exc:
            problems.append(f"{where}: {exc}")
            continue
        tiers.append(
            Tier(tier_config, backend, pipeline, retry_after=config.retry_after, emit=emit)
        )
    problems += _chain_problems(tiers)
    if problems:
        raise ConfigError("\n".join(problems))
    return tiers


def _check_codec(pipeline: CodecPipeline, layout: KVLayout, pool: BufferPool) -> None:
    """Encode a one-token chunk, so that a codec that cannot handle ``layout``
    (``int4`` with an odd head_dim, say) fails before the chain opens."""
    probe = torch.zeros(layout.chunk_shape(1), dtype=layout.dtype)
    try:
        pipeline.encode("probe." + "0" * 32, probe, pool, sealed=False).release()
    except ConfigError as exc:
        raise ConfigError(f"codec {pipeline.name!r}: {exc}") from None


def _chain_problems(tiers: list[Tier]) -> list[str]:
    """What is wrong with how the tiers fit together."""
    problems = []
    for above, below in itertools.pairwise(tiers):
        if below.config.write_policy == "back" and not (
            above.backend.capabilities.hands_over_evictions
        ):
            problems.append(
                f"tier {below.name!r} has write_policy 'back', but the tier above it, "
                f"{above.name!r}, cannot hand over the chunks it evicts; use write_policy "
                f"'through' for {below.name!r}"
            )
    seen: dict[object, str] = {}
    for tier in tiers:
        other = seen.setdefault(tier.backend.location, tier.name)
        if other != tier.name:
            problems.append(
                f"tiers {other!r} and {tier.name!r} are the same store "
                f"({tier.backend.safe_url}); give each tier its own"
            )
    return problems
