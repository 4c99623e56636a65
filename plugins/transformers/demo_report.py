"""What ``kvtier demo`` prints: its tables and its plot."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from rich import box
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


def requests_table(title: str, requests: list[Request], note: str = "") -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD)
    columns = ["request", "prompt", "reused", "from", "full ms", "kvtier ms", "speedup",
               "same token", "max |dlogit|"]  # fmt: skip
    for column in columns:
        left = column in ("request", "from")
        table.add_column(column, justify="left" if left else "right", no_wrap=left)
    exact = all(r.exact for r in requests)
    answers = ["answer"] if exact else ["answer (full prefill)", "answer (kvtier)"]
    shown = any(r.answer for r in requests)
    for column in answers if shown else ():
        table.add_column(column, no_wrap=True, overflow="ellipsis", max_width=30)
    for r in requests:
        cells = [
            r.label, str(r.prompt), str(r.reused), r.source, f"{r.ttft_full * 1000:.0f}",
            f"{r.ttft_kvtier * 1000:.0f}", f"{r.speedup:.1f}x", "yes" if r.same_token else "NO",
            f"{r.logit_diff:.1e}",
        ]  # fmt: skip
        if shown:
            texts = [r.answer] if exact else [r.answer_full, r.answer]
            cells += [" ".join(t.split()) for t in texts]
        table.add_row(*cells)
    prompt = sum(r.prompt for r in requests)
    reused = sum(r.reused for r in requests)
    full = sum(r.ttft_full for r in requests)
    kv = sum(r.ttft_kvtier for r in requests)
    same = sum(r.same_token for r in requests)
    table.caption = (
        f"hit rate {reused / prompt:.0%} of prompt tokens; total TTFT {full:.1f} s without "
        f"kvtier, {kv:.1f} s with ({full / kv:.1f}x); same next token as a full prefill in "
        f"{same} of {len(requests)}{note}"
    )
    if shown and not exact:
        agree = sum(r.answer == r.answer_full for r in requests)
        table.caption += f"; same answer in {agree} of {len(requests)}"
    return table


def sweep_table(points: list[SweepPoint], suffix: int, model: str) -> Table:
    table = Table(title=f"TTFT vs context (+{suffix} new tokens), {model}", box=box.SIMPLE_HEAD)
    table.add_column("context", justify="right")
    table.add_column("full prefill ms", justify="right")
    for name in points[0].ttft_tier if points else ():
        table.add_column(f"from {name} ms (speedup)", justify="right")
    for p in points:
        cells = [f"{t * 1000:.0f} ({p.ttft_full / t:.1f}x)" for t in p.ttft_tier.values()]
        table.add_row(str(p.context), f"{p.ttft_full * 1000:.0f}", *cells)
    return table


def stats_table(title: str, stats: list[TierStats]) -> Table:
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
