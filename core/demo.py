"""``kvtier demo``: store a KV cache through a tier chain, reload it, and show what happened.

Runs on the embedded default chain (``cpu`` then ``file`` in the user's cache folder)
with no servers. A second, fresh :class:`KVTier` then stands in for a restarted
process: its ``cpu`` tier is empty, so the prompt is served from disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from rich import box
from rich.console import Console
from rich.table import Table

from kvtier.core.engine import KVTier, KVTierStats
from kvtier.core.layout import KVLayout

T = TypeVar("T")

DEMO_LAYOUT = KVLayout(num_layers=12, num_kv_heads=4, head_dim=64, dtype=torch.float16)
"""A small model's KV shape: 12 layers, 4 KV heads of 64, fp16 (12 KiB per token)."""


@dataclass
class Step:
    what: str
    tokens: int
    seconds: float
    identical: bool | None = None


def _stats_table(title: str, stats: KVTierStats) -> Table:
    table = Table(title=title, box=box.SIMPLE_HEAD)
    columns = ("tier", "codec", "hit", "miss", "stored", "MiB in", "MiB out", "evict",
               "corrupt", "err", "ms/op")  # fmt: skip
    for column in columns:
        table.add_column(column, justify="left" if column in ("tier", "codec") else "right")
    for t in stats.tiers:
        table.add_row(
            t.name, t.codec, str(t.hits), str(t.misses), str(t.stored),
            f"{t.bytes_in / 2**20:.1f}", f"{t.bytes_out / 2**20:.1f}", str(t.evictions),
            str(t.corrupt), str(t.errors), f"{t.mean_latency_ms:.2f}",
        )  # fmt: skip
    return table


def run_demo(
    config: str | Path | None = None,
    *,
    tokens: int = 4096,
    seed: int = 0,
    console: Console | None = None,
) -> list[Step]:
    """Store and reload the KV of a ``tokens``-token prompt; return the steps taken."""
    console = console or Console()
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 32000, (tokens,), generator=gen)
    kv = torch.randn(DEMO_LAYOUT.chunk_shape(tokens), generator=gen).to(DEMO_LAYOUT.dtype)
    steps: list[Step] = []

    def timed(what: str, fn: Callable[[], T]) -> T:
        start = time.perf_counter()
        result = fn()
        steps.append(Step(what, 0, time.perf_counter() - start))
        return result

    mib = kv.numel() * kv.element_size() / 2**20
    console.print(
        f"[bold]kvtier demo[/]: a {tokens}-token prompt, KV {list(kv.shape)} "
        f"{str(DEMO_LAYOUT.dtype).removeprefix('torch.')} ({mib:.0f} MiB)"
    )
    with KVTier.open(config, model="kvtier-demo", layout=DEMO_LAYOUT) as cache:
        tiers = " -> ".join(f"{t.name} ({t.url}, {t.codec})" for t in cache.stats().tiers)
        console.print(f"tier chain: {tiers}")
        before = timed("lookup before storing", lambda: cache.lookup(prompt))
        steps[-1].tokens = before
        accepted = timed("store (queued)", lambda: cache.store(prompt, kv))
        steps[-1].tokens = accepted
        timed("flush to write-through tiers", cache.flush)
        n, got = timed("retrieve", lambda: cache.retrieve(prompt))
        steps[-1].tokens, steps[-1].identical = n, torch.equal(got, kv[:, :, :n])
        console.print(_stats_table("first process", cache.stats()))
    with KVTier.open(config, model="kvtier-demo", layout=DEMO_LAYOUT) as cache:
        n, got = timed("retrieve after restart", lambda: cache.retrieve(prompt))
        steps[-1].tokens, steps[-1].identical = n, torch.equal(got, kv[:, :, :n])
        cache.flush()
        console.print(_stats_table("restarted process (empty RAM tier)", cache.stats()))

    table = Table(title="what kvtier did")
    for column in ("step", "tokens", "ms", "KV identical"):
        table.add_column(column, justify="left" if column == "step" else "right")
    for step in steps:
        same = "" if step.identical is None else ("yes" if step.identical else "NO")
        table.add_row(step.what, str(step.tokens), f"{step.seconds * 1000:.1f}", same)
    console.print(table)
    return steps
