"""The connector's settings: ``kv_connector_extra_config`` over a kvtier YAML config."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from kvtier.core.config import KVTierConfig, apply_env, load_config
from kvtier.core.errors import ConfigError
from kvtier.core.plugins import closest
from kvtier.core.validation import validate_model

CONNECTOR_KEYS = {
    "config": "path of the kvtier YAML config (default: $KVTIER_CONFIG, else the "
    "embedded default chain)",
    "model": "model id in the chunk namespace (default: vLLM's model, '@revision' added)",
}
"""Keys of ``kv_connector_extra_config`` that configure the connector itself; every
other key must be a top-level key of the kvtier config and overrides it."""


@dataclass(frozen=True)
class ConnectorSettings:
    config: KVTierConfig
    model: str | None


def load_settings(extra: Mapping[str, Any]) -> ConnectorSettings:
    """Settings from vLLM's ``kv_connector_extra_config``.

    ``config`` names the YAML file; top-level kvtier keys (``chunk_tokens``,
    ``tiers``, ...) override the file's; ``KVTIER_*`` environment variables override
    both, as everywhere in kvtier. Unknown keys and bad values raise
    :class:`ConfigError`.
    """
    where = "kv_connector_extra_config"
    overrides = dict(extra)
    path = overrides.pop("config", None)
    model = overrides.pop("model", None)
    valid = [*CONNECTOR_KEYS, *KVTierConfig.model_fields]
    for key in overrides:
        if key not in KVTierConfig.model_fields:
            raise ConfigError(
                f"{where}: unknown key {key!r}{closest(str(key), valid)}; valid keys: "
                f"{', '.join(valid)}"
            )
    if path is not None and (not isinstance(path, str) or not path):
        raise ConfigError(f"{where}: 'config' must be the path of a kvtier YAML file")
    if model is not None and (not isinstance(model, str) or not model):
        raise ConfigError(f"{where}: 'model' must be a non-empty model id")
    config = load_config(path)
    if overrides:  # deployment config, like the file: KVTIER_* variables win over both
        merged = apply_env(config.model_dump() | overrides, os.environ)
        config = validate_model(KVTierConfig, merged, where)
    if config.store_partial_chunks:
        raise ConfigError(
            f"{where}: store_partial_chunks must be false for vLLM (vLLM caches whole blocks only)"
        )
    return ConnectorSettings(config, model)
