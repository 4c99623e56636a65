"""What keyed integrity (signed blobs, :mod:`kvtier.core.integrity`) costs, against a
copy of the same bytes, in one run.

    python bench/integrity.py [--json out.json] [--reps 7]

For fp16 chunks of Llama-3-8B (2 MiB: 16 tokens; 32 MiB: 256 tokens), on one thread
(``torch.set_num_threads(1)``), each chunk encoded once with the raw codec into a
pooled buffer, then timed in turn, interleaved, ``--reps`` times:

* ``copy``: the chunk copied into a reused pooled buffer (what storing it costs at
  least: the baseline);
* ``seal``: the checksum written (the one pass over the bytes when a blob leaves the
  process), unsigned (xxh3-64), signed over xxh3-128, and signed over BLAKE2b-128
  (``integrity.digest: blake2b``);
* ``verify``: the same blob checked when it comes back (checksum, header, and MAC).

The table shows medians and ranges in µs per chunk, and the signing overhead (signed
minus unsigned) as a fraction of the copy. Target: the default (xxh3) signature costs
well under a copy.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from kvtier.core import blob as fmt
from kvtier.core.buffers import BufferPool
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.integrity import MacKeys
from kvtier.core.plugins import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from tiers import write_json

SHAPES = {"2MiB": (32, 2, 16, 8, 128), "32MiB": (32, 2, 256, 8, 128)}
KEY = "bench-0123456789ab." + "ab" * 16
MASTER = secrets.token_bytes(32)
VARIANTS: dict[str, MacKeys | None] = {
    "unsigned": None,
    "signed xxh3": MacKeys((MASTER,)),
    "signed blake2b": MacKeys((MASTER,), strong=True),
}


def timed(call: Callable[[], object], runs: int) -> float:
    """Microseconds per call, over ``runs`` calls."""
    start = time.perf_counter()
    for _ in range(runs):
        call()
    return (time.perf_counter() - start) / runs * 1e6


def measure(shape: tuple[int, ...], reps: int) -> dict[str, list[float]]:
    pool = BufferPool()
    raw = CodecPipeline.from_config("raw", get_registry())
    chunk = torch.randn(shape).half()
    runs = max(3, (256 << 20) // chunk.nbytes)
    blobs = {name: raw.encode(KEY, chunk, pool, keys=keys) for name, keys in VARIANTS.items()}
    target = pool.acquire(chunk.nbytes)
    source = memoryview(chunk.numpy()).cast("B")
    cases: dict[str, Callable[[], object]] = {
        "copy": lambda: target.view.__setitem__(slice(None), source)
    }
    for name, keys in VARIANTS.items():
        blob = blobs[name]
        cases[f"seal {name}"] = lambda b=blob, k=keys: fmt.seal(b.buf.view, k, KEY)
        cases[f"verify {name}"] = lambda b=blob, k=keys: fmt.verify(b, keys=k)
    results: dict[str, list[float]] = {name: [] for name in cases}
    for call in cases.values():
        call()  # warm-up
    for rep in range(reps):
        order = list(cases) if rep % 2 == 0 else list(reversed(cases))
        for name in order:
            results[name].append(timed(cases[name], runs))
    target.release()
    for blob in blobs.values():
        blob.release()
    return results


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--reps", type=int, default=7)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    console = Console()
    rows = []
    for size, shape in SHAPES.items():
        results = measure(shape, args.reps)
        copy = statistics.median(results["copy"])
        table = Table(title=f"{size} chunk: µs per chunk, median and range of {args.reps} reps")
        for column in ("step", "median", "range", "overhead vs unsigned / copy"):
            table.add_column(column)
        for name, values in results.items():
            median = statistics.median(values)
            step, _, variant = name.partition(" ")
            overhead = ""
            if variant.startswith("signed"):
                base = statistics.median(results[f"{step} unsigned"])
                overhead = f"{(median - base) / copy:+.2f}x copy"
            span = f"[{min(values):.0f}-{max(values):.0f}]"
            table.add_row(name, f"{median:.0f}", span, overhead)
            rows.append(dict(size=size, step=name, median_us=median, runs_us=values))
        console.print(table)
    if args.json:
        write_json(args.json, rows, reps=args.reps, threads=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
