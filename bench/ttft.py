"""Time to first token (TTFT) of a real model: full prefill, the ideal, and kvtier's tiers.

    python bench/ttft.py [--contexts 1024,2048,4096] [--suffix 64] [--reps 9] [--full-reps 3]
                         [--config remote.yaml] [--cold] [--dir /path/on/disk] [--json out.json]

A random-weight 125M-parameter Llama (fp32; 12 layers, 4 KV heads of 64: 24 KiB of KV
per token) gets a prompt of ``context + suffix`` tokens. Timed, in the same run:

* ``full``: a prefill of the whole prompt (``--full-reps`` times: it is the slow one);
* ``ideal``: the suffix computed against the context's KV already in memory (a
  ``DynamicCache`` viewing it), the best any KV cache can do;
* one row per tier: kvtier's path, ``PrefixCache.prefix`` (retrieve the context from a
  chain of that tier alone and build the cache) plus the suffix: ``cpu``, ``file``
  (pages cached; ``--cold`` adds ``file-cold``, the page cache dropped before each
  retrieval, root only) and every tier of ``--config`` (e.g. ``redis://``, ``s3://``).

``ideal`` and the tiers run in rounds, one of each per round in a rotating order, after
a warm-up round; TTFT columns are medians over the rounds. ``of ideal`` is the tier's
speedup over the full prefill divided by the ideal's, i.e. ideal TTFT / tier TTFT,
taken per round (the two ran seconds apart) and then the median: on a shared machine
this cancels most of the load that comes and goes. ``kvtier ms`` is the median time
spent in kvtier (retrieve and build); the rest of a tier's TTFT is the suffix's compute.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, LlamaForCausalLM

from kvtier.core import load_config
from kvtier.plugins.transformers import Prefix, PrefixCache, random_llama, random_llama_id
from kvtier.plugins.transformers.compat import output_cache

sys.path.insert(0, str(Path(__file__).parent))
from tiers import drop_page_cache

CHUNK = 256
Case = Callable[[], tuple[float, float]]
"""Runs one TTFT path; returns its seconds and the part of them spent in kvtier."""


def ideal_prefix(model: LlamaForCausalLM, prefix: DynamicCache) -> Prefix:
    """A cache viewing ``prefix``'s tensors (no copy), as a serving engine holds them."""
    cache = DynamicCache(config=model.config)
    for layer, source in zip(cache.layers, prefix.layers, strict=True):
        layer.lazy_initialization(source.keys, source.values)
        layer.keys, layer.values = source.keys, source.values
    return Prefix(prefix.get_seq_length(), cache)


def tier_chains(folder: str, extra: str | None, cold: bool) -> list[tuple[str, dict[str, Any]]]:
    """``(name, one-tier chain)`` for every tier measured."""
    base = {"chunk_tokens": CHUNK}
    file_tier = {"url": f"file://{folder}", "capacity": "8GiB"}
    chains = [("cpu", {**base, "tiers": [{"url": "cpu://", "capacity": "2GiB"}]}),
              ("file", {**base, "tiers": [file_tier]})]  # fmt: skip
    if cold:
        chains.append(("file-cold", {**base, "tiers": [file_tier]}))
    for tier in load_config(extra).tiers if extra else ():
        one = tier.model_dump(exclude={"write_policy", "promote"})
        name = str(tier.name)
        taken = any(name == used for used, _ in chains)
        chains.append((f"config:{name}" if taken else name, {**base, "tiers": [one]}))
    return chains


def rounds(cases: dict[str, Case], reps: int) -> dict[str, list[tuple[float, float]]]:
    """``(TTFT, kvtier part)`` seconds of each case in each of ``reps`` rounds; a warm-up
    round first. The order rotates from round to round."""
    names = list(cases)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for rep in range(reps + 1):
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            measured = cases[name]()
            if rep:
                times[name].append(measured)
    return times


def run_context(
    model: LlamaForCausalLM, context: int, args: argparse.Namespace, folder: str
) -> dict[str, Any]:
    ids = torch.randint(3, 32000, (1, context + args.suffix),
                        generator=torch.Generator().manual_seed(context))  # fmt: skip
    suffix = ids[:, context:]
    full = []
    for _ in range(args.full_reps):
        start = time.perf_counter()
        model(ids)
        full.append(time.perf_counter() - start)
    prefix = output_cache(model(ids[:, :context]))
    reference = model(suffix, **ideal_prefix(model, prefix).model_kwargs()).logits

    def ideal() -> tuple[float, float]:
        start = time.perf_counter()
        model(suffix, **ideal_prefix(model, prefix).model_kwargs())
        return time.perf_counter() - start, 0.0

    cases: dict[str, Case] = {"ideal": ideal}
    diffs: dict[str, float] = {}
    opened: list[PrefixCache] = []
    try:
        for name, chain in tier_chains(f"{folder}/{context}", args.config, args.cold):
            cache = PrefixCache.open(model, chain, model_id=random_llama_id("125m", 0))
            opened.append(cache)
            cache.reserve(ids.shape[1])
            cache.store(ids[:, :context], prefix)
            cache.kv.flush()
            got = cache.prefix(ids)
            if got.tokens != context:
                raise SystemExit(f"{name}: retrieved {got.tokens} of {context} tokens")
            logits = model(suffix, **got.model_kwargs()).logits
            diffs[name] = float((logits - reference).abs().max())
            cases[name] = tier_case(model, cache, ids, cold=name == "file-cold")
        times = rounds(cases, args.reps)
    finally:
        for cache in opened:
            cache.close()
    return summarize(context, args, full, times, diffs)


def tier_case(model: LlamaForCausalLM, cache: PrefixCache, ids: torch.Tensor, cold: bool) -> Case:
    def run() -> tuple[float, float]:
        if cold and not drop_page_cache():
            raise SystemExit("--cold needs root (writes /proc/sys/vm/drop_caches)")
        start = time.perf_counter()
        got = cache.prefix(ids)
        built = time.perf_counter()
        model(ids[:, got.tokens :], **got.model_kwargs())
        return time.perf_counter() - start, built - start

    return run


def summarize(
    context: int,
    args: argparse.Namespace,
    full: list[float],
    times: dict[str, list[tuple[float, float]]],
    diffs: dict[str, float],
) -> dict[str, Any]:
    med_full = statistics.median(full)
    ideal = [t for t, _ in times["ideal"]]
    med_ideal = statistics.median(ideal)
    row: dict[str, Any] = {
        "context": context, "suffix": args.suffix, "reps": args.reps,
        "full_ms": med_full * 1e3, "ideal_ms": med_ideal * 1e3,
        "ideal_speedup": med_full / med_ideal, "tiers": {},
        "samples_ms": {"full": [t * 1e3 for t in full], "ideal": [t * 1e3 for t in ideal]},
    }  # fmt: skip
    for name, diff in diffs.items():
        ttft = [t for t, _ in times[name]]
        row["tiers"][name] = {
            "ttft_ms": statistics.median(ttft) * 1e3,
            "kvtier_ms": statistics.median(k for _, k in times[name]) * 1e3,
            "speedup": med_full / statistics.median(ttft),
            "of_ideal": statistics.median(i / t for i, t in zip(ideal, ttft, strict=True)),
            "max_logit_diff": diff,
            "samples_ms": [t * 1e3 for t in ttft],
        }
    return row


def print_row(row: dict[str, Any]) -> None:
    c = row["context"]
    print(f"{c:7d} {'full':10} {row['full_ms']:9.0f} {1:8.1f}x")
    print(f"{c:7d} {'ideal':10} {row['ideal_ms']:9.0f} {row['ideal_speedup']:8.1f}x {1:8.2f}")
    for name, t in row["tiers"].items():
        print(f"{c:7d} {name:10} {t['ttft_ms']:9.0f} {t['speedup']:8.1f}x {t['of_ideal']:8.2f} "
              f"{t['kvtier_ms']:9.1f} {t['max_logit_diff']:12.1e}")  # fmt: skip
    sys.stdout.flush()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--contexts", default="1024,2048,4096", help="context lengths")
    parser.add_argument("--suffix", type=int, default=64, help="new tokens after the context")
    parser.add_argument("--reps", type=int, default=9, help="rounds of ideal and tiers")
    parser.add_argument("--full-reps", type=int, default=3, help="full prefills (median)")
    parser.add_argument("--config", help="YAML whose tiers are measured too, one at a time")
    parser.add_argument("--cold", action="store_true", help="also file with no page cache")
    parser.add_argument("--dir", help="a folder on the disk to test")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    model = random_llama("125m")
    rows = []
    threads = torch.get_num_threads()
    print(f"TTFT, {args.suffix} new tokens after the context; medians of {args.full_reps} full "
          f"prefills and {args.reps} rounds of the rest ({threads} threads)")  # fmt: skip
    print(f"{'context':>7} {'case':10} {'TTFT ms':>9} {'speedup':>8} {'of ideal':>8} "
          f"{'kvtier ms':>9} {'max |dlogit|':>12}")  # fmt: skip
    with torch.inference_mode(), tempfile.TemporaryDirectory(dir=args.dir) as folder:
        model(torch.zeros(1, 16, dtype=torch.long))  # first-call setup is not a prefill
        for context in (int(c) for c in args.contexts.split(",")):
            rows.append(run_context(model, context, args, folder))
            print_row(rows[-1])
    if args.json:
        meta = {"model": "random-weight Llama 125m, fp32", "threads": threads}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
