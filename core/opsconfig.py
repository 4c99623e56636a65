"""The ``ops`` section of the config: metrics and the ``kvtier serve`` control service.

Example::

    ops:
      metrics: {max_tenants: 20}
      serve:
        host: 127.0.0.1
        port: 8790
        models:
          my-model: {num_layers: 12, num_kv_heads: 4, head_dim: 64, dtype: float16}
"""

from __future__ import annotations

from typing import Annotated, Any, TypeAlias

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field


def _size(value: Any) -> int:
    from kvtier.core.config import parse_size  # config imports this module

    return parse_size(value)


Size: TypeAlias = Annotated[int, BeforeValidator(_size)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class MetricsConfig(_Strict):
    """Prometheus metrics (``pip install 'kvtier[metrics]'``)."""

    enabled: bool = True
    """Export metrics when prometheus-client is installed."""
    max_tenants: int = Field(default=20, ge=0, le=10_000)
    """Tenants with a label of their own; later ones are counted as ``other``."""
    sync_seconds: float = Field(default=1.0, gt=0)
    """How often the counters are copied from the open caches into the metrics (also
    on every scrape of ``kvtier serve``)."""


class ModelEntry(_Strict):
    """A model's KV layout, which its chunk keys depend on (for ``POST /lookup``)."""

    num_layers: int = Field(gt=0)
    num_kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    dtype: str = "float16"
    tp_rank: int = Field(default=0, ge=0)
    tp_size: int = Field(default=1, ge=1)
    revision: str | None = None
    """The weights revision, part of the model fingerprint (see ``KVTier.open``)."""


class ServeConfig(_Strict):
    """``kvtier serve``: an HTTP control service (``pip install 'kvtier[serve]'``)."""

    host: str = "127.0.0.1"
    port: int = Field(default=8790, ge=0, le=65535)
    max_body_bytes: Size = 1 << 20
    """Larger request bodies are refused with 413."""
    models: dict[str, ModelEntry] = Field(default_factory=dict)
    """Models ``POST /lookup`` can be asked about, by id."""


class TierLimits(_Strict):
    """Operations settings of one tier, by tier name."""

    quotas: dict[str, Size] = Field(default_factory=dict)
    """Tenant -> bytes it may hold in the tier (its own LRU evicts beyond that)."""


class OpsConfig(_Strict):
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    tiers: dict[str, TierLimits] = Field(default_factory=dict)
    """Per-tier quotas, by tier name (:mod:`kvtier.core.quotas`)."""
