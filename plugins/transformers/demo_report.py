"""What ``kvtier demo`` prints: its tables and its plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from rich import box
from rich.console import Group, RenderableType
from rich.table import Table

from kvtier.core.tier import TierStats


@dataclass
class Request:
    """One request computed both ways."""

    workload: str
    label: str
    prompt: int
    reused: int
    source: str
    """Tier(s) that served the reused KV, ``-`` for none."""
    ttft_full: float
    ttft_kvtier: float
    same_token: bool
    logit_diff: float
    """Largest absolute difference of the next-token logits between the two ways."""
    exact: bool = True
    """Reused KV must give the full prefill's logits (a stored prefix); ``False`` for
    fused segments, which are approximate by design."""
    answer_full: str = ""
    answer: str = ""
    """The model's answers (text models only): without and with kvtier."""
    after_restart: bool = False
    """Made after the demo reopened its chain, as a new process would."""

    @property
    def speedup(self) -> float:
        return self.ttft_full / self.ttft_kvtier


@dataclass
class SweepPoint:
    context: int
    ttft_full: float
    ttft_tier: dict[str, float] = field(default_factory=dict)


def sum_stats(snapshots: Sequence[list[TierStats]]) -> list[TierStats]:
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


def plot(points: list[SweepPoint], model: str, suffix: int, path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone

    fig = Figure(figsize=(7, 4.5))
    ax = fig.subplots()
    contexts = [p.context for p in points]
    ax.plot(contexts, [p.ttft_full for p in points], "o-", label="full prefill (no kvtier)")
    for name in points[0].ttft_tier:
        ax.plot(contexts, [p.ttft_tier[name] for p in points], "s-", label=f"kvtier: {name}")
    ax.set_xlabel(f"context tokens (+{suffix} new)")
    ax.set_ylabel("time to first token (s)")
    ax.set_title(f"{model}, fp32, {torch.get_num_threads()} threads")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


NUMBERS_WIDTH = 76
"""Columns a requests table needs for its numbers; answers get what is left of the
console's width, or a table of their own where less than ``ANSWER_WIDTH`` is left."""
ANSWER_WIDTH = 30


def requests_table(
    title: str, requests: list[Request], note: str = "", *, width: int = 200
) -> RenderableType:
    """One row per request, for a console ``width`` columns wide: numbers never wrap;
    the model's answers wrap in the space left, or follow in a table of their own."""
    table = Table(title=title, box=box.SIMPLE_HEAD, caption_justify="left", pad_edge=False)
    columns = ("request", "prompt", "reused", "from", "full\nms", "kvtier\nms", "speedup",
               "same\ntoken")  # fmt: skip
    for column in columns:
        left = column in ("request", "from")
        table.add_column(column, justify="left" if left else "right", no_wrap=True)
    exact = all(r.exact for r in requests)
    answers = [_answer(r, exact) for r in requests if r.answer or r.answer_full]
    header = "answer" if exact else "answer (full prefill | kvtier, where they differ)"
    inline = bool(answers) and width - NUMBERS_WIDTH >= ANSWER_WIDTH
    if inline:
        table.add_column(header, overflow="fold")
    for i, r in enumerate(requests):
        cells = [
            r.label, str(r.prompt), str(r.reused), r.source, f"{r.ttft_full * 1000:.0f}",
            f"{r.ttft_kvtier * 1000:.0f}", f"{r.speedup:.1f}x", "yes" if r.same_token else "NO",
        ]  # fmt: skip
        restart = i + 1 < len(requests) and requests[i + 1].after_restart and not r.after_restart
        table.add_row(*cells, *answers[i : i + 1] if inline else (), end_section=restart)
    prompt = sum(r.prompt for r in requests)
    reused = sum(r.reused for r in requests)
    full = sum(r.ttft_full for r in requests)
    kv = sum(r.ttft_kvtier for r in requests)
    same = sum(r.same_token for r in requests)
    table.caption = (
        f"hit rate {reused / prompt:.0%} of prompt tokens; total TTFT {full:.1f} s without "
        f"kvtier, {kv:.1f} s with ({full / kv:.1f}x); same next token as a full prefill in "
        f"{same} of {len(requests)} (largest next-token logit difference "
        f"{max(r.logit_diff for r in requests):.1e}){note}"
    )
    if answers and not exact:
        agree = sum(r.answer == r.answer_full for r in requests)
        table.caption += f"; same answer in {agree} of {len(requests)}"
    first = next((r for r in requests if r.after_restart), None)
    if first is not None and first is not requests[0]:
        table.caption += (
            f"; before {first.label} the chain was reopened as by a new process (in-process "
            "tiers such as cpu:// start empty)"
        )
    if not answers or inline:
        return table
    listing = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    listing.add_column("request", no_wrap=True)
    listing.add_column(header, overflow="fold")
    for r, answer in zip(requests, answers, strict=True):
        listing.add_row(r.label, answer)
    return Group(table, listing)


def _answer(r: Request, exact: bool) -> str:
    full, kv = (" ".join(t.split()) for t in (r.answer_full, r.answer))
    return kv if exact or kv == full else f"{full} | kvtier: {kv}"


def sweep_table(points: list[SweepPoint], suffix: int, model: str) -> Table:
    title = f"TTFT vs context (+{suffix} new tokens), {model}"
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False, min_width=len(title))
    table.add_column("context", justify="right", no_wrap=True)
    table.add_column("full prefill\nms", justify="right", no_wrap=True)
    for name in points[0].ttft_tier if points else ():
        table.add_column(f"from {name}\nms (speedup)", justify="right", no_wrap=True)
    for p in points:
        cells = [f"{t * 1000:.0f} ({p.ttft_full / t:.1f}x)" for t in p.ttft_tier.values()]
        table.add_row(str(p.context), f"{p.ttft_full * 1000:.0f}", *cells)
    return table


def stats_table(title: str, stats: list[TierStats]) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    columns = ("tier", "codec", "hit", "miss", "stored", "MiB\nin", "MiB\nout", "evict",
               "corrupt", "err", "ms/op")  # fmt: skip
    for column in columns:
        left = column in ("tier", "codec")
        table.add_column(column, justify="left" if left else "right", no_wrap=not left)
    for t in stats:
        table.add_row(
            t.name, t.codec, str(t.hits), str(t.misses), str(t.stored),
            f"{t.bytes_in / 2**20:.1f}", f"{t.bytes_out / 2**20:.1f}", str(t.evictions),
            str(t.corrupt), str(t.errors), f"{t.mean_latency_ms:.2f}",
        )  # fmt: skip
    return table
