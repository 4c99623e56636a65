"""Run vLLM (CPU) engines one after another in this process, as a JSON spec says.

    python kvtier_app.py MODEL_DIR SPEC.json RESULT.json

The spec lists engines; each has ``tp`` (tensor parallel size, default 1),
``kvtier`` (``kv_connector_extra_config`` for kvtier's connector, or ``null`` for an
engine without it) and ``steps``:

* ``{"generate": [{"tokens": [...], "cache_salt": "..."}], "max_tokens": 8}``: greedy
  generation; records each prompt's output tokens and ``num_cached_tokens``, then
  flushes kvtier's queued saves and records its stats and the connector's counters;
* ``{"corrupt": {"tokens": [...], "cache_salt": "...", "chunk": 1}}``: flips bytes in
  the payload of that chunk's file in the first ``file://`` tier;
* ``{"keys": [{"tokens": [...], "cache_salt": "..."}]}``: records each prompt's chunk
  keys as the connector computes them.

Used by ``tests/test_vllm_e2e.py`` (the file name keeps pytest from collecting it).
"""

from __future__ import annotations

import gc
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# vLLM's default multi-process engine: the worker (and its cpu:// tier) runs in another
# process than the scheduler. The app reads the worker's connector through
# collective_rpc, which ships the functions below with cloudpickle.
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from common import engine_kwargs


def make_llm(model: str, kvtier: dict[str, Any] | None, max_model_len: int, tp: int = 1) -> Any:
    from vllm import LLM

    return LLM(**engine_kwargs(model, kvtier, max_model_len), tensor_parallel_size=tp)


def connector() -> Any:
    """The worker-side connector (call this in the worker: see :func:`on_worker`)."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    return get_kv_transfer_group() if has_kv_transfer_group() else None


def on_worker(llm: Any, func: Any, *args: Any) -> Any:
    """``func(worker, *args)`` run in the first worker (rank 0), wherever vLLM runs it
    (the function travels by value, its arguments with pickle)."""
    return on_workers(llm, func, *args)[0]


def on_workers(llm: Any, func: Any, *args: Any) -> list[Any]:
    """``func(worker, *args)`` run in every worker, by rank."""
    return llm.collective_rpc(func, args=args)  # type: ignore[no-any-return]


def _worker_report(worker: Any) -> dict[str, Any] | None:
    conn = connector()
    if conn is None:
        return None
    conn.kvtier.flush()
    return {"stats": conn.kvtier.stats().as_dict(), "totals": conn.totals}


def scheduler_requests(llm: Any) -> int | None:
    """Requests the scheduler-side connector holds state for."""
    core = getattr(llm.llm_engine.engine_core, "engine_core", None)
    conn = getattr(getattr(core, "scheduler", None), "connector", None)
    return None if conn is None else int(conn.scheduler.num_requests)


def generate(llm: Any, step: dict[str, Any]) -> dict[str, Any]:
    from vllm import SamplingParams

    prompts = []
    for p in step["generate"]:
        prompt: dict[str, Any] = {"prompt_token_ids": p["tokens"]}
        if p.get("cache_salt"):
            prompt["cache_salt"] = p["cache_salt"]
        prompts.append(prompt)
    params = SamplingParams(temperature=0.0, max_tokens=step.get("max_tokens", 8))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result: dict[str, Any] = {
        "outputs": [list(o.outputs[0].token_ids) for o in outputs],
        "cached": [o.num_cached_tokens for o in outputs],
    }
    reports = on_workers(llm, _worker_report)
    if reports[0] is not None:
        result.update(reports[0])
        result["ranks"] = reports
        result["scheduler_requests"] = scheduler_requests(llm)
    return result


def corrupt(llm: Any, step: dict[str, Any]) -> dict[str, Any]:
    return on_worker(llm, _corrupt, step)  # type: ignore[no-any-return]


def _corrupt(worker: Any, step: dict[str, Any]) -> dict[str, Any]:
    """Flip bytes in the middle of the chunk's file (its payload, not its header)."""
    spec = step["corrupt"]
    kv = connector().kvtier
    extra = ((("cache_salt", spec["cache_salt"]),),) if spec.get("cache_salt") else ()
    key = str(kv.hasher.keys(spec["tokens"], extra_keys=extra)[spec["chunk"]])
    root = next(t.url for t in kv.config.tiers if t.url.startswith("file://"))
    paths = list(Path(root.removeprefix("file://")).rglob(key))
    for path in paths:
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 16] = bytes(b ^ 0xFF for b in data[middle : middle + 16])
        path.write_bytes(bytes(data))
    return {"corrupted": [str(p) for p in paths]}


def keys(llm: Any, step: dict[str, Any]) -> dict[str, Any]:
    return on_worker(llm, _keys, step)  # type: ignore[no-any-return]


def _keys(worker: Any, step: dict[str, Any]) -> dict[str, Any]:
    """The chunk keys of each prompt, as the connector computes them."""
    kv = connector().kvtier
    out = []
    for p in step["keys"]:
        extra = ((("cache_salt", p["cache_salt"]),),) if p.get("cache_salt") else ()
        out.append([str(k) for k in kv.hasher.keys(p["tokens"], extra_keys=extra)])
    return {"keys": out}


STEPS = {"generate": generate, "corrupt": corrupt, "keys": keys}


def main() -> None:
    model, spec_path, out_path = sys.argv[1:4]
    spec = json.loads(Path(spec_path).read_text())
    results = []
    for engine in spec["engines"]:
        llm = make_llm(
            model, engine.get("kvtier"), spec.get("max_model_len", 1024), engine.get("tp", 1)
        )
        steps = []
        for step in engine["steps"]:
            kind = next(k for k in STEPS if k in step)
            steps.append(STEPS[kind](llm, step))
        results.append({"steps": steps})
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
    Path(out_path).write_text(json.dumps({"engines": results}))


if __name__ == "__main__":
    main()
