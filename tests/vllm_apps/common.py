"""What the vLLM apps, their tests and ``bench/vllm_ttft.py`` share: kvtier's
``KVTransferConfig``, and running an app in a fresh process in vLLM's default
environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

APPS = Path(__file__).parent


def kv_transfer(kvtier: dict[str, Any] | None) -> Any:
    """vLLM's ``KVTransferConfig`` for kvtier's connector with ``kvtier`` as its
    ``kv_connector_extra_config`` (``None``: no connector)."""
    if kvtier is None:
        return None
    from vllm.config import KVTransferConfig

    return KVTransferConfig(
        kv_connector="KVTierConnector",
        kv_connector_module_path="kvtier.plugins.vllm",
        kv_role="kv_both",
        kv_load_failure_policy="recompute",
        kv_connector_extra_config=kvtier,
    )


def engine_kwargs(model: str, kvtier: dict[str, Any] | None, max_model_len: int) -> dict[str, Any]:
    """The engine arguments every app uses (``LLM(**...)``, ``AsyncEngineArgs(**...)``):
    the tiny model in fp32, eager, vLLM's own prefix cache off (every hit is
    kvtier's), and kvtier's connector configured with ``kvtier`` (``None``: none)."""
    return {
        "model": model,
        "dtype": "float32",
        "max_model_len": max_model_len,
        "enforce_eager": True,
        "enable_prefix_caching": False,
        "seed": 0,
        "kv_transfer_config": kv_transfer(kvtier),
    }


def run_app(app: str, model: Path, spec: dict[str, Any], out: Path, **env: str) -> Any:
    """Run ``APPS/app`` on ``spec`` in a new process, in vLLM's default environment
    (``VLLM_ENABLE_V1_MULTIPROCESSING`` unset) plus ``env``; its JSON result. Raises
    ``RuntimeError`` with the app's output when it fails."""
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    environ = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    environ.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1", **env)
    proc = subprocess.run(
        [sys.executable, str(APPS / app), str(model), str(spec_path), str(out)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"{app} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return json.loads(out.read_text())
