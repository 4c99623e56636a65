"""Throughput of ``kvtier migrate`` against raw copy loops from the same run.

    python bench/migrate.py [--json out.json] [--dir /var/tmp] [--reps 5] [--batch 8]
                            [--concurrency 4]

Each case migrates a store of KV chunks (random fp16, raw blobs) with
:func:`kvtier.core.migrate.migrate` (listing, ``contains_many`` at the destination,
checksum of every source blob, write, read-back check of every written blob) and
copies the same chunks with a raw loop: ``get_many`` then ``put_many`` of the known
keys, same batch size and concurrency, no listing and no checks. For file -> file a
second baseline copies the blob files with ``shutil.copyfile`` in as many threads.
The recode case re-encodes to ``int8+zstd`` on the way (the raw loop only copies).
GB/s counts source blob bytes. The source is read warm (page cache) by both; the
destination is emptied, untimed, before every run. Migrate and baseline runs
alternate (order flipped each repetition, after one warm-up of each); the table
shows medians of ``--reps`` runs and the ratio migrate / baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

import torch
from tiers import write_json

from kvtier.core.backend import Backend
from kvtier.core.buffers import BufferPool
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.factory import build_backend
from kvtier.core.migrate import MigrateOptions, migrate
from kvtier.core.plugins import get_registry

CHUNKS: dict[str, tuple[int, ...]] = {
    # [layers, K/V, tokens, kv heads, head dim] in fp16
    "qwen2.5-0.5b/128tok": (24, 2, 128, 2, 64),  # 1.5 MiB
    "llama3-8b/256tok": (32, 2, 256, 8, 128),  # 32 MiB
}
CASES = (("file", "file", None), ("file", "cpu", None), ("cpu", "file", None),
         ("file", "file", "int8+zstd"))  # fmt: skip
"""(source, destination, recode)."""
MIN_RUN_BYTES = 128 << 20

Step = Callable[[], Awaitable[object]]


@dataclass
class Row:
    chunk: str
    chunk_bytes: int
    chunks: int
    case: str
    migrate_gbps: float
    baseline: str
    baseline_gbps: float

    @property
    def ratio(self) -> float:
        return self.migrate_gbps / self.baseline_gbps


async def compare(nbytes: int, reps: int, runs: dict[str, Step], clear: Step) -> dict[str, float]:
    """Median GB/s of each of ``runs`` over ``reps`` alternating runs; ``clear`` (untimed)
    empties the destination before each."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for rep in range(reps + 1):  # repetition 0 warms up
        order = list(runs.items())
        for name, step in order[:: 1 if rep % 2 else -1]:
            await clear()
            start = time.perf_counter()
            await step()
            elapsed = time.perf_counter() - start
            if rep:
                seconds[name].append(elapsed)
    return {name: nbytes / statistics.median(s) / 1e9 for name, s in seconds.items()}


async def raw_copy(
    src: Backend, dst: Backend, keys: list[str], batch: int, concurrency: int
) -> None:
    """``get_many`` / ``put_many`` of ``keys`` in ``concurrency`` workers, no checks."""
    batches = iter([keys[i : i + batch] for i in range(0, len(keys), batch)])

    async def worker() -> None:
        for part in batches:
            blobs = await src.get_many(part)
            try:
                await dst.put_many([(k, b) for k, b in zip(part, blobs, strict=True) if b])
            finally:
                for blob in blobs:
                    if blob is not None:
                        blob.release()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def blob_path(root: str, key: str) -> str:
    return os.path.join(root, key.rpartition(".")[2][:2], key)


def file_copy(src_root: str, dst_root: str, keys: list[str], threads: int) -> None:
    """Copy the blob files of ``keys`` with ``shutil.copyfile`` in ``threads`` threads."""

    def copy(key: str) -> None:
        target = blob_path(dst_root, key)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(blob_path(src_root, key), target)

    with ThreadPoolExecutor(threads) as executor:
        list(executor.map(copy, keys))


class Bench:
    def __init__(self, folder: str, reps: int, batch: int, concurrency: int) -> None:
        self.folder = folder
        self.reps = reps
        self.batch = batch
        self.concurrency = concurrency
        self.pool = BufferPool(max_idle_bytes=8 << 30)
        self.rows: list[Row] = []

    def backend(self, kind: str, name: str, capacity: int) -> Backend:
        url = "cpu://" + name if kind == "cpu" else f"file://{self.folder}/{name}"
        return build_backend(url, capacity=capacity, pool=self.pool)

    async def fill(self, backend: Backend, keys: list[str], shape: tuple[int, ...]) -> int:
        raw = CodecPipeline.from_config("raw", get_registry())
        nbytes = 0
        for i, key in enumerate(keys):
            gen = torch.Generator().manual_seed(i)
            with raw.encode(key, torch.randn(shape, generator=gen).half(), self.pool) as blob:
                assert (await backend.put_many([(key, blob)])) == [True]
                nbytes += blob.nbytes
        return nbytes

    async def chunk(self, name: str, shape: tuple[int, ...]) -> None:
        size = 2 * torch.Size(shape).numel()
        count = self.batch * -(-MIN_RUN_BYTES // (size * self.batch))
        keys = [f"bench.{i:032x}" for i in range(count)]
        for src_kind, dst_kind, recode in CASES:
            gbps = await self.case(keys, shape, src_kind, dst_kind, recode)
            case = f"{src_kind} -> {dst_kind}" + (f" recode {recode}" if recode else "")
            for baseline in list(gbps)[1:]:
                self.rows.append(
                    Row(name, size, count, case, gbps["migrate"], baseline, gbps[baseline])
                )

    async def case(
        self, keys: list[str], shape: tuple[int, ...], src_kind: str, dst_kind: str,
        recode: str | None,
    ) -> dict[str, float]:  # fmt: skip
        """Median GB/s of ``migrate`` then of each baseline for one case."""
        capacity = 4 * 2 * torch.Size(shape).numel() * len(keys)
        src = self.backend(src_kind, "src", capacity)
        dst = self.backend(dst_kind, "dst", capacity)
        pipeline = None if recode is None else CodecPipeline.from_config(recode, get_registry())
        options = MigrateOptions(
            recode=pipeline, batch_size=self.batch, concurrency=self.concurrency
        )
        copy_root = f"{self.folder}/copy"

        async def run_migrate() -> None:
            report = await migrate(src, dst, options)
            assert report.copied == len(keys) and report.ok, report

        async def run_raw() -> None:
            await raw_copy(src, dst, keys, self.batch, self.concurrency)

        async def run_copyfile() -> None:
            src_root = f"{self.folder}/src"
            await asyncio.to_thread(file_copy, src_root, copy_root, keys, self.concurrency)

        async def clear() -> None:
            await dst.delete_many(keys)
            shutil.rmtree(copy_root, ignore_errors=True)

        runs: dict[str, Step] = {"migrate": run_migrate, "get_many/put_many": run_raw}
        if (src_kind, dst_kind, recode) == ("file", "file", None):
            runs["copyfile"] = run_copyfile
        try:
            async with src, dst:
                nbytes = await self.fill(src, keys, shape)
                return await compare(nbytes, self.reps, runs, clear)
        finally:
            for folder in ("src", "dst", "copy"):
                shutil.rmtree(f"{self.folder}/{folder}", ignore_errors=True)


def table(rows: list[Row], batch: int, concurrency: int) -> str:
    head = (
        f"{f'chunk (batch {batch}, concurrency {concurrency})':<40} {'case':<30} "
        f"{'GB/s':>6}  {'baseline':<18} {'GB/s':>6} {'ratio':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        label = f"{r.chunk} {r.chunk_bytes / 2**20:g} MiB x {r.chunks}"
        lines.append(
            f"{label:<40} {r.case:<30} {r.migrate_gbps:6.2f}  {r.baseline:<18} "
            f"{r.baseline_gbps:6.2f} {r.ratio:6.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--dir", default="/var/tmp", help="a folder on the disk to test")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--batch", type=int, default=8, help="chunks per backend call")
    parser.add_argument("--concurrency", type=int, default=4, help="batches in flight")
    parser.add_argument("--chunk", choices=sorted(CHUNKS), action="append",
                        help="chunk shapes to run (default: all)")  # fmt: skip
    return parser.parse_args(argv)


async def run_all(args: argparse.Namespace, folder: str) -> list[Row]:
    bench = Bench(folder, args.reps, args.batch, args.concurrency)
    for name in args.chunk or CHUNKS:
        await bench.chunk(name, CHUNKS[name])
    return bench.rows


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    folder = tempfile.mkdtemp(prefix="kvtier-bench-", dir=args.dir)
    try:
        rows = asyncio.run(run_all(args, folder))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(table(rows, args.batch, args.concurrency))
    if args.json:
        write_json(
            args.json,
            [{**asdict(r), "ratio": r.ratio} for r in rows],
            reps=args.reps,
            batch=args.batch,
            concurrency=args.concurrency,
            dir=args.dir,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
