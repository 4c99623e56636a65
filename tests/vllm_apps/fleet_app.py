"""Run several vLLM (CPU) engines side by side in this process, as a JSON spec says:
prefill/decode hand-offs and KV events through vLLM's own publisher.

    python fleet_app.py MODEL_DIR SPEC.json RESULT.json

``spec["engines"]`` maps a name to ``{"kvtier": extra config or null, "role":
"kv_both", "events": {"endpoint": ..., "replay_endpoint": ...} or absent}``; all are
started first, in order. ``spec["steps"]`` run in order:

* ``{"generate": NAME, "prompts": [[tokens...]], "max_tokens": 8, "params": [...]}``:
  greedy generation (``params``: each prompt's ``kv_transfer_params``); records the
  outputs, ``kv_transfer_params`` and ``num_cached_tokens``, and the worker's counters
  (not flushed);
* ``{"handoff": [PRODUCER, CONSUMER], "prompts": [...], "max_tokens": 8}``: for each
  prompt, the producer prefills it (``max_tokens`` 1) and the consumer generates from
  it at once with the producer's ``kv_transfer_params``; records the consumer's loaded
  tokens per prompt, its outputs and seconds per hand-off;
* ``{"report": NAME}``: flushes the worker's kvtier; its stats and counters;
* ``{"replay": NAME}``: every batch vLLM's publisher has sent (from its replay
  socket, as hex), after one more engine step (a 1-token prompt) so that events of
  stores that finished after the last step are taken too;
* ``{"lookup": NAME, "prompts": [...]}``: the worker's ``KVTier.lookup`` of each;
* ``{"drop": NAME, "prompt": [...], "chunks": [2, 3]}``: deletes those chunks of the
  prompt from the worker's first ``file://`` tier and leaves a stale temp file there,
  as a producer killed mid-store leaves it (file tiers write atomically);
* ``{"start": NAME}``: starts an engine marked ``"lazy": true``; records the error
  if it fails.

Used by ``tests/test_vllm_fleet.py``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

from common import engine_kwargs


def make_llm(model: str, engine: dict[str, Any], max_model_len: int) -> Any:
    from vllm import LLM
    from vllm.config import KVEventsConfig

    kwargs = engine_kwargs(model, engine.get("kvtier"), max_model_len)
    if kwargs["kv_transfer_config"] is not None:
        kwargs["kv_transfer_config"].kv_role = engine.get("role", "kv_both")
    events = engine.get("events")
    if events:
        kwargs["kv_events_config"] = KVEventsConfig(
            enable_kv_cache_events=True, publisher="zmq", **events
        )
    return LLM(**kwargs)


def _worker(worker: Any, flush: bool) -> dict[str, Any] | None:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    if not has_kv_transfer_group():
        return None
    conn = get_kv_transfer_group()
    if flush:
        conn.kvtier.flush()
    return {"stats": conn.kvtier.stats().as_dict(), "totals": dict(conn.totals)}


def _lookup(worker: Any, prompts: list[list[int]]) -> list[int]:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    kv = get_kv_transfer_group().kvtier
    return [kv.lookup(p) for p in prompts]


def worker(llm: Any, flush: bool = False) -> dict[str, Any]:
    return llm.collective_rpc(_worker, args=(flush,))[0] or {}  # type: ignore[no-any-return]


def run(llm: Any, prompts: list[list[int]], max_tokens: int, params: list[Any]) -> list[Any]:
    from vllm import SamplingParams

    sampling = [
        SamplingParams(
            temperature=0.0,
            max_tokens=max_tokens,
            extra_args={"kv_transfer_params": p} if p else None,
        )
        for p in params
    ]
    inputs = [{"prompt_token_ids": p} for p in prompts]
    return llm.generate(inputs, sampling, use_tqdm=False)  # type: ignore[no-any-return]


def generate(llms: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    llm = llms[step["generate"]]
    prompts = step["prompts"]
    params = step.get("params") or [None] * len(prompts)
    outs = run(llm, prompts, step.get("max_tokens", 8), params)
    return {
        "outputs": [list(o.outputs[0].token_ids) for o in outs],
        "params": [o.kv_transfer_params for o in outs],
        "cached": [o.num_cached_tokens for o in outs],
        **worker(llm),
    }


def handoff(llms: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    producer, consumer = (llms[name] for name in step["handoff"])
    loaded, outputs, params, seconds = [], [], [], []
    for prompt in step["prompts"]:
        before = worker(consumer).get("totals", {}).get("load_tokens", 0)
        (prefilled,) = run(producer, [prompt], 1, [None])
        start = time.monotonic()
        (out,) = run(consumer, [prompt], step.get("max_tokens", 8), [prefilled.kv_transfer_params])
        seconds.append(time.monotonic() - start)
        loaded.append(worker(consumer)["totals"]["load_tokens"] - before)
        outputs.append(list(out.outputs[0].token_ids))
        params.append(prefilled.kv_transfer_params)
    return {"loaded": loaded, "outputs": outputs, "params": params, "seconds": seconds}


def report(llms: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    return worker(llms[step["report"]], flush=True)


def replay(llms: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    import zmq

    name = step["replay"]
    llm = llms[name]
    worker(llm, flush=True)
    run(llm, [[5]], 1, [None])  # one more step carries the events of late stores
    time.sleep(0.5)  # vLLM's publisher sends from its own thread
    endpoint = SPEC["engines"][name]["events"]["replay_endpoint"].replace("*", "127.0.0.1")
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    batches = []
    try:
        dealer.connect(endpoint)
        dealer.send_multipart([b"", (0).to_bytes(8, "big")])
        while dealer.poll(5000):
            *_, seq, payload = dealer.recv_multipart()
            if int.from_bytes(seq, "big", signed=True) == -1:
                break
            batches.append(payload.hex())
    finally:
        dealer.close(linger=0)
        ctx.term()
    return {"batches": batches}


def _drop(worker: Any, prompt: list[int], chunks: list[int]) -> list[str]:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    kv = get_kv_transfer_group().kvtier
    keys = kv.hasher.keys(prompt, partial=kv.config.store_partial_chunks)
    root = Path(next(t.url for t in kv.config.tiers if t.url.startswith("file://"))[7:])
    dropped = []
    for i in chunks:
        for path in root.rglob(str(keys[i])):
            path.unlink()
            dropped.append(str(path))
    (root / ".tmp" / "999999-killed.tmp").write_bytes(b"half a chunk")
    return dropped


def drop(llms: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    args = (step["prompt"], step["chunks"])
    return {"dropped": llms[step["drop"]].collective_rpc(_drop, args=args)[0]}


def start_engine(llms: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    name = step["start"]
    engine = SPEC["engines"][name]
    saved = {k: os.environ.get(k) for k in engine.get("env", {})}
    os.environ.update(engine.get("env", {}))  # e.g. the engine in this process
    try:
        llms[name] = make_llm(MODEL[0], engine, SPEC.get("max_model_len", 1024))
    except Exception as exc:  # the test checks the message
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"error": None}


def lookup(llms: dict[str, Any], step: dict[str, Any]) -> dict[str, Any]:
    llm = llms[step["lookup"]]
    return {"lookup": llm.collective_rpc(_lookup, args=(step["prompts"],))[0]}


STEPS = {
    "generate": generate,
    "handoff": handoff,
    "report": report,
    "replay": replay,
    "lookup": lookup,
    "drop": drop,
    "start": start_engine,
}
SPEC: dict[str, Any] = {}
MODEL: list[str] = []


def main() -> None:
    model, spec_path, out_path = sys.argv[1:4]
    SPEC.update(json.loads(Path(spec_path).read_text()))
    MODEL.append(model)
    llms = {
        name: make_llm(model, engine, SPEC.get("max_model_len", 1024))
        for name, engine in SPEC["engines"].items()
        if not engine.get("lazy")
    }
    steps = []
    for step in SPEC["steps"]:
        kind = next(k for k in STEPS if k in step)
        steps.append(STEPS[kind](llms, step))
    for llm in llms.values():
        llm.llm_engine.engine_core.shutdown()
    llms.clear()
    gc.collect()
    Path(out_path).write_text(json.dumps({"steps": steps}))


if __name__ == "__main__":
    main()
