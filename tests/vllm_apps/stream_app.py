"""Token gaps of a streaming request while other requests go through kvtier, on
vLLM's ``AsyncLLM`` (CPU) in vLLM's default environment (engine core and worker in
their own processes, as ``vllm serve`` runs them).

    python stream_app.py MODEL_DIR SPEC.json RESULT.json

The spec: ``kvtier`` (``kv_connector_extra_config``, or ``null``), ``max_model_len``,
``warm`` (prompts generated first, one by one: they store their chunks),
``stop_pid`` (a process to SIGSTOP after the warm prompts and SIGCONT at the end:
a hung tier), ``stream`` (the unrelated streaming prompt) and ``stream_tokens``, and
``others`` (prompts sent one after another while the stream runs, from
``others_after`` seconds into it). The result: the stream's token gaps (seconds),
each other prompt's TTFT and cached tokens.

Used by ``tests/test_vllm_stall.py`` and ``bench/vllm_ttft.py`` (the file name keeps
pytest from collecting it).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from common import engine_kwargs


def engine_args(model: str, kvtier: dict[str, Any] | None, max_model_len: int) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs

    return AsyncEngineArgs(**engine_kwargs(model, kvtier, max_model_len), disable_log_stats=True)


async def one(llm: Any, req_id: str, tokens: list[int], max_tokens: int) -> dict[str, Any]:
    """Generate; the time of each streamed output and the cached tokens."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    times: list[float] = []
    cached = 0
    out: list[int] = []
    async for output in llm.generate({"prompt_token_ids": tokens}, params, req_id):
        times.append(time.perf_counter())
        cached = output.num_cached_tokens or 0
        out = list(output.outputs[0].token_ids)
    return {
        "ttft": times[0] - start,
        "gaps": [b - a for a, b in itertools.pairwise(times)],
        "cached": cached,
        "tokens": out,
    }


async def run(model: str, spec: dict[str, Any]) -> dict[str, Any]:
    from vllm.v1.engine.async_llm import AsyncLLM

    llm = AsyncLLM.from_engine_args(
        engine_args(model, spec.get("kvtier"), spec.get("max_model_len", 1024))
    )
    stopped = spec.get("stop_pid")
    try:
        warm = [await one(llm, f"warm{i}", p, 1) for i, p in enumerate(spec.get("warm", []))]
        await asyncio.sleep(spec.get("settle", 0.5))  # queued saves reach the tiers
        if stopped:
            os.kill(stopped, signal.SIGSTOP)
        stream = asyncio.create_task(one(llm, "stream", spec["stream"], spec["stream_tokens"]))
        await asyncio.sleep(spec.get("others_after", 0.5))
        others = [await one(llm, f"other{i}", p, 1) for i, p in enumerate(spec.get("others", []))]
        streamed = await stream
    finally:
        if stopped:
            os.kill(stopped, signal.SIGCONT)
        llm.shutdown()
    return {"warm": warm, "stream": streamed, "others": others}


def main() -> None:
    model, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    result = asyncio.run(run(model, spec))
    Path(out_path).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
