"""The layers of a transformers ``DynamicCache``, read and filled by kvtier."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from kvtier.core.errors import ConfigError


def dynamic_layers(cache: DynamicCache) -> list[DynamicLayer]:
    """The cache's layers; :class:`ConfigError` unless all are plain ``DynamicLayer``."""
    layers = []
    for i, layer in enumerate(cache.layers):
        if type(layer) is not DynamicLayer:
            raise ConfigError(
                f"cache layer {i} is a {type(layer).__name__}; kvtier.plugins.transformers "
                "supports full-attention layers (DynamicLayer) only"
            )
        layers.append(layer)
    return layers


def fill(cache: DynamicCache, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> None:
    """Make layer ``i`` of an empty ``cache`` hold ``keys[i]`` and ``values[i]``
    (``(batch, kv_heads, tokens, head_dim)``) without copying them."""
    for layer, k, v in zip(dynamic_layers(cache), keys, values, strict=True):
        layer.lazy_initialization(k, v)
        layer.keys, layer.values = k, v
