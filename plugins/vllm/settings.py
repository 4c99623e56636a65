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
from kvtier.plugins.vllm.scheduler import LOAD_ASYNC

CONNECTOR_KEYS = {
    "config": "path of the kvtier YAML config (default: $KVTIER_CONFIG, else the "
    "embedded default chain)",
    "model": "model id in the chunk namespace (default: vLLM's model, '@revision' added)",
    "lookup_wait_ms": "how long the scheduler waits for a lookup's answer in one call before "
    "telling vLLM to ask again later (default 2)",
    "lookup_local_ms": "how long a lookup waits for a tier inside the worker process (cpu) "
    "before counting it as a miss (default 5)",
    "lookup_remote_ms": "how long a lookup waits for any other tier before counting it as a "
    "miss (default 50)",
    "lookup_give_up_ms": "a lookup still unanswered after this long is a miss (default 2000)",
    "handoff_wait_ms": "how long a request whose kv_transfer_params announce chunks from a "
    "prefill instance waits for them before computing what is missing (default 5000)",
    "load_async": "when loads run between engine steps while other requests run: 'auto' "
    "(when part of the hit is outside the worker's cpu tier), 'always', 'never'",
    "layerwise_loads": "true (default): a load inside a step is copied into the paged cache "
    "layer by layer, so each attention layer waits only for its own KV; false: whole chunks, "
    "each as it arrives",
}
"""Keys of ``kv_connector_extra_config`` that configure the connector itself; every
other key must be a top-level key of the kvtier config and overrides it."""


LOOKUP_DEFAULTS_MS = {
    "lookup_wait_ms": 2.0,
    "lookup_local_ms": 5.0,
    "lookup_remote_ms": 50.0,
    "lookup_give_up_ms": 2000.0,
    "handoff_wait_ms": 5000.0,
}


@dataclass(frozen=True)
class LookupBudget:
    """The scheduler's lookup deadlines, in seconds (see :data:`CONNECTOR_KEYS`);
    separate from the tiers' I/O ``timeout``, which bounds the workers' loads and
    saves."""

    wait: float = LOOKUP_DEFAULTS_MS["lookup_wait_ms"] / 1000
    local: float = LOOKUP_DEFAULTS_MS["lookup_local_ms"] / 1000
    remote: float = LOOKUP_DEFAULTS_MS["lookup_remote_ms"] / 1000
    give_up: float = LOOKUP_DEFAULTS_MS["lookup_give_up_ms"] / 1000
    handoff_wait: float = LOOKUP_DEFAULTS_MS["handoff_wait_ms"] / 1000
    """Seconds a hand-off waits for its announced chunks (:mod:`.roles`)."""


@dataclass(frozen=True)
class ConnectorSettings:
    config: KVTierConfig
    model: str | None
    lookup: LookupBudget = LookupBudget()
    load_async: str = "auto"
    layerwise_loads: bool = True


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
    load_async = overrides.pop("load_async", "auto")
    if load_async not in LOAD_ASYNC:
        raise ConfigError(f"{where}: 'load_async' must be one of {', '.join(LOAD_ASYNC)}")
    layerwise = overrides.pop("layerwise_loads", True)
    if not isinstance(layerwise, bool):
        raise ConfigError(f"{where}: 'layerwise_loads' must be true or false, got {layerwise!r}")
    budget = {}
    for key, default in LOOKUP_DEFAULTS_MS.items():
        value = overrides.pop(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise ConfigError(f"{where}: {key!r} must be a positive number of milliseconds")
        budget[key.removeprefix("lookup_").removesuffix("_ms")] = value / 1000
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
    return ConnectorSettings(config, model, LookupBudget(**budget), load_async, layerwise)
