"""End-to-end throughput of ``KVTier`` against raw copies of the same bytes, in one run.

    python bench/engine.py [--json out.json] [--dir /path/on/disk] [--reps 5] [--tokens 2048]

A Llama-3-8B-shaped KV cache (32 layers, 8 KV heads of 128, fp16; 128 KiB per token)
goes through the public API:

* ``store`` (the caller's view: chunks copied into pooled blobs and queued) and
  ``store`` + ``flush`` into a ``cpu`` tier that is full and evicting (steady state),
  and ``retrieve`` from it into a preallocated tensor, against the same chunk-by-chunk
  strided copies made with plain torch (and a single contiguous memcpy for scale);
* ``retrieve`` from a ``file`` tier by a new ``KVTier`` (as after a restart), page
  cache dropped (root), against reading the same files with ``os.preadv``, cold too.

Medians of ``--reps`` runs; ratios are kvtier / raw from this run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kvtier.core import KVLayout, KVTier

sys.path.insert(0, str(Path(__file__).parent))
from tiers import drop_page_cache

LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16)
CHUNK = 256


def median_gbps(nbytes: int, reps: int, run: Callable[[int], object],
                before: Callable[[int], object] = lambda rep: None) -> float:  # fmt: skip
    """Median GB/s of ``run(rep)``; ``before(rep)`` runs untimed first."""
    times = []
    for rep in range(reps):
        before(rep)
        start = time.perf_counter()
        run(rep)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times) / 1e9


def prompt(tokens: int, rep: int) -> torch.Tensor:
    return torch.randint(0, 100_000, (tokens,), generator=torch.Generator().manual_seed(rep))


def read_files(folder: str, into: torch.Tensor) -> None:
    """The raw baseline for a cold file read: every chunk file into one buffer."""
    view, offset = memoryview(into.view(torch.uint8).numpy()), 0
    for path in sorted(Path(folder).glob("??/*")):
        fd = os.open(path, os.O_RDONLY)
        try:
            offset += os.preadv(fd, [view[offset : offset + os.fstat(fd).st_size]], 0)
        finally:
            os.close(fd)


def chunk_copies(src: torch.Tensor, dst: torch.Tensor) -> None:
    """Copy ``src`` into ``dst`` chunk by chunk (token slices): the same strided copies
    kvtier makes, without kvtier."""
    for start in range(0, src.shape[2], CHUNK):
        dst[:, :, start : start + CHUNK].copy_(src[:, :, start : start + CHUNK])


def run(folder: str, tokens: int, reps: int) -> list[dict[str, Any]]:
    kv = torch.randn(LAYOUT.chunk_shape(tokens)).to(LAYOUT.dtype)
    out = torch.empty_like(kv)
    nbytes = kv.numel() * kv.element_size()
    memcpy = median_gbps(nbytes, reps, lambda rep: out.copy_(kv))
    sliced = median_gbps(nbytes, reps, lambda rep: chunk_copies(kv, out))
    # The RAM tier holds 4 prompts: stores after the warm-up evict, and evicted blobs'
    # memory is reused (steady state; fresh memory costs page faults, ~1 GB/s here).
    ram = {"chunk_tokens": CHUNK, "tiers": [{"url": "cpu://", "capacity": 4 * nbytes + (64 << 20)}]}
    rows: list[tuple[str, float, str, float]] = [("memcpy of one tensor", memcpy, "-", memcpy)]
    with KVTier.open(ram, model="bench", layout=LAYOUT) as cache:
        for warm in range(6):
            cache.store(prompt(tokens, 1000 + warm), kv)
            cache.flush()
        store = median_gbps(nbytes, reps, lambda rep: cache.store(prompt(tokens, rep), kv),
                            lambda rep: cache.flush())  # fmt: skip
        cache.flush()
        rows.append(("store (queued, caller's view)", store, "chunk-sliced copy", sliced))
        flushed = median_gbps(
            nbytes, reps, lambda rep: (cache.store(prompt(tokens, 100 + rep), kv), cache.flush())
        )
        rows.append(("store + flush into cpu", flushed, "chunk-sliced copy", sliced))
        last = 100 + reps - 1  # the most recent prompt is still in RAM
        got = median_gbps(nbytes, reps, lambda rep: cache.retrieve(prompt(tokens, last), out=out))
        assert torch.equal(out, kv)
        rows.append(("retrieve from cpu", got, "chunk-sliced copy", sliced))

    disk = {"chunk_tokens": CHUNK, "tiers": [{"url": f"file://{folder}", "capacity": "8GiB"}]}
    with KVTier.open(disk, model="bench", layout=LAYOUT) as cache:
        cache.store(prompt(tokens, 0), kv)
    blob_bytes = sum(p.stat().st_size for p in Path(folder).glob("??/*"))
    scratch = torch.empty(blob_bytes, dtype=torch.uint8)
    cold = drop_page_cache()
    raw_read = median_gbps(nbytes, reps, lambda rep: read_files(folder, scratch),
                           lambda rep: drop_page_cache())  # fmt: skip

    def retrieve_after_restart(rep: int) -> None:
        with KVTier.open(disk, model="bench", layout=LAYOUT) as fresh:
            n, _ = fresh.retrieve(prompt(tokens, 0), out=out)
            assert n == tokens

    file_get = median_gbps(nbytes, reps, retrieve_after_restart, lambda rep: drop_page_cache())
    assert torch.equal(out, kv)
    label = "preadv of the chunk files" + ("" if cold else " (WARM: not root)")
    rows.append(("retrieve from file, new process", file_get, label, raw_read))
    return [
        {
            "op": op,
            "kvtier_gbps": round(k, 3),
            "raw": raw,
            "raw_gbps": round(r, 3),
            "ratio": round(k / r, 3),
            "bytes": nbytes,
        }
        for op, k, raw, r in rows
    ]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--dir", help="a folder on the disk to test")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--tokens", type=int, default=2048, help="prompt length")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        rows = run(os.path.join(folder, "kv"), args.tokens, args.reps)
    mib = rows[0]["bytes"] / 2**20
    print(f"KVTier, {args.tokens} tokens of Llama-3-8B KV ({mib:.0f} MiB), medians of {args.reps}")
    print(f"{'operation':34} {'kvtier GB/s':>12}  {'raw baseline':34} {'GB/s':>6} {'ratio':>6}")
    for r in rows:
        print(f"{r['op']:34} {r['kvtier_gbps']:12.2f}  {r['raw']:34} {r['raw_gbps']:6.2f} "
              f"{r['ratio']:6.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": args.tokens, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
