"""``kvtier demo``: a real model's time to first token (TTFT) with and without kvtier.

Builds a Llama-architecture model with seeded random weights (no download, no
tokenizer: prompts are synthetic token ids) and runs it through a tier chain, by
default the embedded one (``cpu`` then ``file`` in the user's cache folder):

1. chat: several users, several turns each, all sharing one system prompt; each
   turn resends the conversation so far (the model's greedy replies included). Half
   way through, the chain is reopened as a restarted process would: its ``cpu`` tier
   starts empty and the conversations come back from the slower tiers;
2. RAG: an instruction, a few documents from a small pool, a question; first with the
   documents always in the same order, then in changed orders (only a common leading
   prefix can be reused, so the hit rate drops);
3. TTFT against context length, reusing the context from each tier alone.

Every request is computed twice: a full prefill (TTFT without kvtier) and kvtier's
path (TTFT with kvtier: retrieve the longest stored prefix, build the cache, compute
the rest). Storing runs in the background and is not timed; it is flushed before the
next request, which may need it. With lossless codecs both ways must give the same next
token (``kvtier demo`` exits with 1 otherwise).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import DynamicCache, LlamaForCausalLM

from kvtier.core.config import KVTierConfig, load_config
from kvtier.core.errors import ConfigError
from kvtier.core.tier import TierStats
from kvtier.plugins.transformers import require_extra
from kvtier.plugins.transformers.cache import Prefix, PrefixCache
from kvtier.plugins.transformers.compat import output_cache
from kvtier.plugins.transformers.models import random_llama, random_llama_id

LOSSLESS_CODECS = frozenset({"raw", "shuffle", "zstd"})
"""Codec stages that give back the stored bytes exactly: reuse must not change a token."""

RAG_SAME_ORDER = ((0, 1, 2), (0, 1, 2), (0, 1, 3), (0, 1, 2))
RAG_CHANGED_ORDER = ((2, 0, 1), (1, 2, 0), (0, 2, 1), (3, 1, 0))
"""Documents of each RAG request, by index in the pool."""


@dataclass(frozen=True)
class DemoSettings:
    """The demo's workload; the defaults take about 2 minutes on 2 cores."""

    model: str = "125m"
    """``125m`` (12 layers, 4 KV heads of 64, fp32) or ``tiny`` (for tests)."""
    users: int = 3
    turns: int = 4
    system_tokens: int = 768
    message_tokens: int = 128
    reply_tokens: int = 16
    instruction_tokens: int = 64
    document_tokens: int = 300
    question_tokens: int = 48
    rag_requests: int = 4
    """Requests in each RAG phase (same order, changed order); at most 4."""
    contexts: tuple[int, ...] = (1024, 2048, 4096)
    """Context lengths of the TTFT sweep (each followed by ``suffix_tokens`` new ones)."""
    suffix_tokens: int = 64
    sweep_reps: int = 2
    seed: int = 0
    plot: Path | None = Path("kvtier-demo-ttft.png")

    def __post_init__(self) -> None:
        positive = (
            "users",
            "turns",
            "system_tokens",
            "message_tokens",
            "reply_tokens",
            "document_tokens",
            "question_tokens",
            "suffix_tokens",
            "sweep_reps",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.rag_requests <= len(RAG_SAME_ORDER):
            raise ConfigError(f"rag_requests must be in [0, {len(RAG_SAME_ORDER)}]")
        if any(c < 1 for c in self.contexts):
            raise ConfigError(f"contexts must be positive token counts, got {self.contexts}")


@dataclass
class Request:
    """One request computed both ways."""

    workload: str
    label: str
    prompt: int
    reused: int
    source: str
    """Tier(s) that served the reused prefix, ``-`` for none."""
    ttft_full: float
    ttft_kvtier: float
    same_token: bool
    logit_diff: float
    """Largest absolute difference of the next-token logits between the two ways."""

    @property
    def speedup(self) -> float:
        return self.ttft_full / self.ttft_kvtier


@dataclass
class SweepPoint:
    context: int
    ttft_full: float
    ttft_tier: dict[str, float] = field(default_factory=dict)


@dataclass
class DemoResult:
    requests: list[Request]
    sweep: list[SweepPoint]
    stats: list[TierStats]
    """Counters of the demo's tier chain, summed over its restarts."""
    lossless: bool
    """Every tier's codec is lossless, so reuse must never change the next token."""
    plot: Path | None

    @property
    def mismatches(self) -> list[Request]:
        return [r for r in self.requests if not r.same_token]


class _Session:
    """The model, the tier chain and the measurements of one demo run."""

    def __init__(
        self, config: KVTierConfig, settings: DemoSettings, console: Console, progress: Progress
    ) -> None:
        self.config = config
        self.settings = settings
        self.console = console
        self.progress = progress
        self.task = progress.add_task("building the model", total=None)
        self.model: LlamaForCausalLM = random_llama(settings.model, seed=settings.seed)
        self.vocab = int(self.model.config.vocab_size)
        self.gen = torch.Generator().manual_seed(settings.seed)
        self.requests: list[Request] = []
        self.closed_stats: list[list[TierStats]] = []
        self.cache = self._open(config)

    def _open(self, config: KVTierConfig) -> PrefixCache:
        model_id = random_llama_id(self.settings.model, self.settings.seed)
        return PrefixCache.open(self.model, config, model_id=model_id)

    def restart(self) -> None:
        """Close the chain and open it again, as a new process would."""
        self.closed_stats.append(self.cache.kv.stats().tiers)
        self.cache.close()
        self.cache = self._open(self.config)

    def close(self) -> list[TierStats]:
        stats = [*self.closed_stats, self.cache.kv.stats().tiers]
        self.cache.close()
        return _sum_stats(stats)

    def tokens(self, n: int) -> torch.Tensor:
        """``n`` random token ids (avoiding the low special ids), shape ``(1, n)``."""
        return torch.randint(3, self.vocab, (1, n), generator=self.gen)

    def step(self, description: str) -> None:
        self.progress.update(self.task, description=description)

    def request(self, workload: str, label: str, ids: torch.Tensor) -> tuple[Prefix, torch.Tensor]:
        """Compute ``ids`` without and with kvtier and record it; return kvtier's prefix
        (whose cache then holds the whole prompt) and the next token, shape ``(1, 1)``."""
        model, kv = self.model, self.cache.kv
        start = time.perf_counter()
        full = model(ids).logits[0, -1]
        full_token = int(full.argmax())
        ttft_full = time.perf_counter() - start

        hits = {t.name: t.hits for t in kv.stats().tiers}
        start = time.perf_counter()
        prefix = self.cache.prefix(ids)
        logits = model(ids[:, prefix.tokens :], **prefix.model_kwargs()).logits[0, -1]
        token = int(logits.argmax())
        ttft = time.perf_counter() - start
        source = "+".join(t.name for t in kv.stats().tiers if t.hits > hits[t.name]) or "-"

        diff = float((logits - full).abs().max())
        self.requests.append(Request(workload, label, ids.shape[1], prefix.tokens, source,
                                     ttft_full, ttft, token == full_token, diff))  # fmt: skip
        self.progress.advance(self.task)
        return prefix, logits.argmax().view(1, 1)

    def store(self, ids: torch.Tensor, cache: DynamicCache) -> None:
        """Store the KV of ``ids`` (untimed) and wait until the tiers hold it."""
        self.cache.store(ids, cache)
        self.cache.kv.flush()


def _sum_stats(snapshots: Sequence[list[TierStats]]) -> list[TierStats]:
    """Per-tier counters added up over several openings of the same chain."""
    total = [replace(t) for t in snapshots[0]]
    for snapshot in snapshots[1:]:
        for acc, t in zip(total, snapshot, strict=True):
            for f in fields(TierStats):
                value = getattr(t, f.name)
                if f.name == "max_op_seconds":
                    acc.max_op_seconds = max(acc.max_op_seconds, value)
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    setattr(acc, f.name, getattr(acc, f.name) + value)
    return total


def _chat(session: _Session) -> None:
    s = session.settings
    system = session.tokens(s.system_tokens)
    conversations = [system] * s.users
    for turn in range(1, s.turns + 1):
        if 1 < turn == s.turns // 2 + 1 and len(session.config.tiers) > 1:
            session.restart()
            session.console.print(
                f"[dim]restart before turn {turn}: the chain is reopened as by a new process; "
                "in-process tiers (cpu://) start empty[/]"
            )
        for user in range(s.users):
            session.step(f"chat: user {user + 1}, turn {turn}")
            ids = torch.cat([conversations[user], session.tokens(s.message_tokens)], dim=1)
            prefix, token = session.request("chat", f"user {user + 1} turn {turn}", ids)
            reply = torch.cat([ids, token], dim=1)
            if s.reply_tokens > 1:
                # Before 5.24 transformers types generate's self as a protocol its models
                # do not match; from 5.24 on generate is untyped.
                out = session.model.generate(  # type: ignore[misc, unused-ignore]
                    reply, **prefix.model_kwargs(), max_new_tokens=s.reply_tokens - 1,
                    min_new_tokens=s.reply_tokens - 1, do_sample=False, pad_token_id=0,
                )  # fmt: skip
                reply = out if isinstance(out, torch.Tensor) else out.sequences
            session.store(reply, prefix.cache)
            conversations[user] = reply


def _rag(session: _Session) -> None:
    s = session.settings
    instruction = session.tokens(s.instruction_tokens)
    documents = [session.tokens(s.document_tokens) for _ in range(4)]
    phases = (("same order", RAG_SAME_ORDER), ("changed order", RAG_CHANGED_ORDER))
    for phase, requests in phases:
        for i, docs in enumerate(requests[: s.rag_requests]):
            session.step(f"RAG, {phase}: request {i + 1}")
            parts = [instruction, *(documents[d] for d in docs), session.tokens(s.question_tokens)]
            ids = torch.cat(parts, dim=1)
            label = f"docs {','.join(str(d) for d in docs)}"
            prefix, _ = session.request(f"RAG, {phase}", label, ids)
            session.store(ids, prefix.cache)


def _sweep(session: _Session) -> list[SweepPoint]:
    """TTFT of a context plus a suffix: a full prefill, then reusing the context from
    each tier alone (a one-tier chain of that tier, so it must serve every chunk)."""
    s = session.settings
    model = session.model
    model_id = random_llama_id(s.model, s.seed)
    points = []
    for context in s.contexts:
        session.step(f"TTFT sweep: {context} tokens, full prefill")
        ids = session.tokens(context + s.suffix_tokens)
        start = time.perf_counter()
        cache = output_cache(model(ids))
        point = SweepPoint(context, time.perf_counter() - start)
        for tier in session.config.tiers:
            session.step(f"TTFT sweep: {context} tokens, from {tier.name}")
            one = session.config.model_copy(
                update={"tiers": [tier.model_copy(update={"write_policy": "through"})]}
            )
            with PrefixCache.open(model, one, model_id=model_id) as alone:
                alone.reserve(ids.shape[1])
                alone.store(ids, cache)
                alone.kv.flush()
                times = []
                for _ in range(s.sweep_reps):
                    start = time.perf_counter()
                    prefix = alone.prefix(ids)
                    model(ids[:, prefix.tokens :], **prefix.model_kwargs())
                    times.append(time.perf_counter() - start)
                point.ttft_tier[str(tier.name)] = statistics.median(times)
        points.append(point)
        session.progress.advance(session.task)
    return points


def _plot(points: list[SweepPoint], settings: DemoSettings, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    contexts = [p.context for p in points]
    ax.plot(contexts, [p.ttft_full for p in points], "o-", label="full prefill (no kvtier)")
    for name in points[0].ttft_tier:
        ax.plot(contexts, [p.ttft_tier[name] for p in points], "s-", label=f"kvtier: {name}")
    ax.set_xlabel(f"context tokens (+{settings.suffix_tokens} new)")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"random-weight Llama {settings.model}, fp32, {torch.get_num_threads()} threads")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _requests_table(title: str, requests: list[Request]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for column in ("request", "prompt", "reused", "from", "TTFT full ms", "TTFT kvtier ms",
                   "speedup", "same token", "max |dlogit|"):  # fmt: skip
        table.add_column(column, justify="left" if column in ("request", "from") else "right")
    for r in requests:
        table.add_row(
            r.label, str(r.prompt), str(r.reused), r.source, f"{r.ttft_full * 1000:.0f}",
            f"{r.ttft_kvtier * 1000:.0f}", f"{r.speedup:.1f}x", "yes" if r.same_token else "NO",
            f"{r.logit_diff:.1e}",
        )  # fmt: skip
    prompt = sum(r.prompt for r in requests)
    reused = sum(r.reused for r in requests)
    full = sum(r.ttft_full for r in requests)
    kv = sum(r.ttft_kvtier for r in requests)
    table.caption = (
        f"hit rate {reused / prompt:.0%} of prompt tokens; total TTFT {full:.1f} s without "
        f"kvtier, {kv:.1f} s with ({full / kv:.1f}x)"
    )
    return table


def _sweep_table(points: list[SweepPoint], suffix: int) -> Table:
    table = Table(title=f"TTFT vs context (+{suffix} new tokens)", box=box.SIMPLE_HEAD)
    table.add_column("context", justify="right")
    table.add_column("full prefill ms", justify="right")
    for name in points[0].ttft_tier if points else ():
        table.add_column(f"from {name} ms (speedup)", justify="right")
    for p in points:
        cells = [f"{t * 1000:.0f} ({p.ttft_full / t:.1f}x)" for t in p.ttft_tier.values()]
        table.add_row(str(p.context), f"{p.ttft_full * 1000:.0f}", *cells)
    return table


def _stats_table(title: str, stats: list[TierStats]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD)
    columns = ("tier", "codec", "hit", "miss", "stored", "MiB in", "MiB out", "evict",
               "corrupt", "err", "ms/op")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("tier", "codec") else "right")
    for t in stats:
        table.add_row(
            t.name, t.codec, str(t.hits), str(t.misses), str(t.stored),
            f"{t.bytes_in / 2**20:.1f}", f"{t.bytes_out / 2**20:.1f}", str(t.evictions),
            str(t.corrupt), str(t.errors), f"{t.mean_latency_ms:.2f}",
        )  # fmt: skip
    return table


def run_demo(
    config: str | Path | None = None,
    settings: DemoSettings | None = None,
    *,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo's workloads on the tier chain of ``config`` (``None``: the embedded
    default) and print what happened; return the measurements."""
    require_extra("kvtier demo", "transformers", "matplotlib")
    settings = settings or DemoSettings()
    console = console or Console()
    cfg = load_config(config)
    chain = " -> ".join(f"{t.name} ({t.url}, {_codec_name(t.codec)})" for t in cfg.tiers)
    steps = settings.users * settings.turns + 2 * settings.rag_requests + len(settings.contexts)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    progress = Progress(*columns, console=console, transient=True)
    with progress, torch.inference_mode():
        session = _Session(cfg, settings, console, progress)
        layout = session.cache.layout
        params = sum(p.numel() for p in session.model.parameters())
        console.print(
            f"[bold]kvtier demo[/]: random-weight Llama {settings.model} ({params / 1e6:.1f}M "
            f"parameters, {layout.num_layers} layers, {layout.num_kv_heads} KV heads of "
            f"{layout.head_dim}, {str(layout.dtype).removeprefix('torch.')}; "
            f"{layout.bytes_per_token() / 1024:g} KiB of KV per token), "
            f"{torch.get_num_threads()} threads\ntier chain: {chain}; "
            f"{cfg.chunk_tokens} tokens per chunk"
        )
        progress.update(session.task, total=steps, completed=0)
        session.cache.reserve(_longest_prompt(settings))
        session.model(session.tokens(16))  # warm-up: first-call setup is not a prefill cost
        try:
            _chat(session)
            console.print(_requests_table(
                f"chat: {settings.users} users x {settings.turns} turns, "
                f"{settings.system_tokens}-token shared system prompt",
                [r for r in session.requests if r.workload == "chat"],
            ))  # fmt: skip
            _rag(session)
            for phase in ("same order", "changed order"):
                done = [r for r in session.requests if r.workload == f"RAG, {phase}"]
                if done:
                    console.print(_requests_table(
                        f"RAG, documents in the {phase}: instruction + 3 of 4 "
                        f"{settings.document_tokens}-token documents + question", done,
                    ))  # fmt: skip
            points = _sweep(session)
        finally:
            stats = session.close()
    if points:
        console.print(_sweep_table(points, settings.suffix_tokens))
    console.print(_stats_table("tier chain: chat and RAG workloads", stats))
    plot = settings.plot if points else None
    if plot is not None:
        _plot(points, settings, plot)
        console.print(f"plot of TTFT vs context length written to {plot.resolve()}")
    lossless = all(set(_codec_name(t.codec).split("+")) <= LOSSLESS_CODECS for t in cfg.tiers)
    return DemoResult(session.requests, points, stats, lossless, plot)


def _codec_name(codec: Any) -> str:
    if isinstance(codec, str):
        return codec
    return "+".join(step if isinstance(step, str) else str(step["name"]) for step in codec)


def _longest_prompt(s: DemoSettings) -> int:
    chat = s.system_tokens + s.turns * s.message_tokens + (s.turns - 1) * s.reply_tokens
    rag = s.instruction_tokens + 3 * s.document_tokens + s.question_tokens
    return max(chat, rag, *(c + s.suffix_tokens for c in s.contexts))
