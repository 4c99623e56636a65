"""Throughput of the ``cpu`` and ``file`` tiers against raw baselines from the same run.

    python bench/tiers.py [--json out.json] [--dir /path/on/disk] [--reps 5] [--batch 8]
                          [--only tiers|cold-batch]

Each case moves KV chunks (pool buffers of random fp16 bytes) through the Backend API
(``put_many`` / ``get_many`` in batches of ``--batch``) and through the plain
operation the tier builds on, on the same bytes: a memcpy into preallocated buffers
for ``cpu``; for ``file``, one file per chunk written with ``pwritev`` and read with
``preadv`` (buffered, ``O_DIRECT``, and ``O_DIRECT`` + ``fsync``). A timed run moves at
least 128 MiB (several batches for small chunks). Reads are cold: the page cache is
dropped before every timed read (root needed, else the row says WARM). Before every
timed write the previous files are deleted and the disk synced, outside the timing.
Tier and raw runs alternate (order flipped each repetition, after one warm-up of
each); the table shows medians of ``--reps`` runs and the ratio tier / raw.

Cold batch reads (``cold-batch``): one ``get_many`` of 16 chunk files of 2 MiB and of
32 MiB written by an ``o_direct`` file tier, read back with ``threads`` 1 and 4, against
``O_DIRECT`` ``preadv`` of the same files by 1 and by 4 threads; the page cache (with
dentries and inodes) is dropped before every run, so each run is a cold start. The
four runs rotate order each repetition; the table adds min-max GB/s.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import torch

from kvtier.backends.file import FileBackend
from kvtier.core.backend import Backend
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.factory import build_backend

CHUNKS: dict[str, tuple[int, ...]] = {
    # [layers, K/V, tokens, kv heads, head dim] in fp16
    "llama3-8b/256tok": (32, 2, 256, 8, 128),  # 32 MiB
    "qwen2.5-0.5b/128tok": (24, 2, 128, 2, 64),  # 1.5 MiB
}
FILE_CASES = (("buffered", False, False), ("o_direct", True, False), ("o_direct+fsync", True, True))
TARGETS = {"cpu get": 0.8, "file o_direct put": 0.7, "file o_direct get": 0.8}
"""Minimum tier / raw ratios reported against."""
MIN_RUN_BYTES = 128 << 20
COLD_BATCH = 16
"""Chunks in the cold batch read."""
COLD_BATCH_CHUNKS = (2 << 20, 32 << 20)
COLD_BATCH_THREADS = (1, 4)

Step = Callable[[], Awaitable[object]]


async def nothing() -> None:
    return None


@dataclass
class Measured:
    """One timed operation and its untimed set-up and tear-down."""

    run: Step
    before: Step = nothing
    after: Step = nothing


@dataclass
class Row:
    chunk: str
    chunk_bytes: int
    case: str
    op: str
    tier_gbps: float
    raw: str
    raw_gbps: float
    cold: bool | None
    """For reads: whether the page cache was dropped before each run."""
    tier_range: tuple[float, float] | None = None
    """Slowest and fastest run in GB/s, where recorded."""
    raw_range: tuple[float, float] | None = None

    @property
    def ratio(self) -> float:
        return self.tier_gbps / self.raw_gbps

    @property
    def target(self) -> float | None:
        return TARGETS.get(f"{self.case} {self.op}")


def drop_page_cache() -> bool:
    """Flush dirty pages and empty the page cache; ``False`` if not permitted."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        return False
    return True


async def measure(nbytes: int, reps: int, runs: dict[str, Measured]) -> dict[str, list[float]]:
    """GB/s of each of ``runs`` in ``reps`` repetitions (after one warm-up), the order
    rotated each repetition (for two runs: alternating)."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(reps + 1):  # repetition 0 warms up
        turn = (rep + 1) % len(names)
        for name in names[turn:] + names[:turn]:
            m = runs[name]
            await m.before()
            start = time.perf_counter()
            await m.run()
            elapsed = time.perf_counter() - start
            await m.after()
            if rep:
                rates[name].append(nbytes / elapsed / 1e9)
    return rates


async def compare(nbytes: int, reps: int, tier: Measured, raw: Measured) -> tuple[float, float]:
    """Median GB/s of ``tier`` and ``raw`` over ``reps`` alternating runs each."""
    rates = await measure(nbytes, reps, {"tier": tier, "raw": raw})
    return statistics.median(rates["tier"]), statistics.median(rates["raw"])


def random_chunks(shape: tuple[int, ...], count: int, pool: BufferPool) -> list[Buffer]:
    bufs = []
    for i in range(count):
        data = torch.randn(shape, dtype=torch.float16, generator=torch.Generator().manual_seed(i))
        bufs.append(pool.copy_of(data.view(torch.uint8).numpy()))
    return bufs


def raw_write(paths: list[str], bufs: list[Buffer], *, direct: bool, fsync: bool) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0)
    for path, buf in zip(paths, bufs, strict=True):
        fd = os.open(path, flags, 0o644)
        try:
            done = 0
            while done < buf.nbytes:
                done += os.pwritev(fd, [buf.view[done:]], done)
            if fsync:
                os.fsync(fd)
        finally:
            os.close(fd)


def raw_read(paths: list[str], bufs: list[Buffer], *, direct: bool) -> None:
    flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
    for path, buf in zip(paths, bufs, strict=True):
        fd = os.open(path, flags)
        try:
            done = 0
            while done < buf.nbytes:
                done += os.preadv(fd, [buf.view[done:]], done)
        finally:
            os.close(fd)


def raw_read_parallel(
    paths: list[str], bufs: list[Buffer], *, direct: bool, threads: ThreadPoolExecutor, n: int
) -> None:
    """:func:`raw_read` of ``paths`` cut into ``n`` runs, one per thread of ``threads``."""
    cuts = [len(paths) * i // n for i in range(n + 1)]
    runs = [
        threads.submit(raw_read, paths[a:b], bufs[a:b], direct=direct)
        for a, b in itertools.pairwise(cuts)
    ]
    for run in runs:
        run.result()


def unlink_all(paths: list[str]) -> None:
    for path in paths:
        if os.path.exists(path):
            os.unlink(path)


class Bench:
    """Runs every case for one chunk shape after another and collects the rows."""

    def __init__(self, folder: str, reps: int, batch: int) -> None:
        self.folder = folder
        self.reps = reps
        self.batch = batch
        self.pool = BufferPool(max_idle_bytes=8 << 30)
        self.rows: list[Row] = []
        self.cold = True

    async def drop(self) -> None:
        self.cold = await asyncio.to_thread(drop_page_cache) and self.cold

    async def chunk(self, name: str, shape: tuple[int, ...]) -> None:
        size = 2 * torch.Size(shape).numel()
        count = self.batch * -(-MIN_RUN_BYTES // (size * self.batch))
        src = random_chunks(shape, count, self.pool)
        dst = [self.pool.copy_of(buf.view) for buf in src]  # preallocated and touched
        items = [(f"bench.{i:032x}", buf) for i, buf in enumerate(src)]
        batches = [items[i : i + self.batch] for i in range(0, count, self.batch)]
        keys = [[key for key, _ in batch] for batch in batches]
        nbytes = size * count

        def memcpy() -> None:
            for d, s in zip(dst, src, strict=True):
                d.view[:] = s.view

        cpu = build_backend("cpu://bench", capacity=2 * nbytes, pool=self.pool)
        await cpu.open()
        put = Measured(partial(self.put_all, cpu, batches), after=partial(self.delete, cpu, keys))
        copy = Measured(partial(asyncio.to_thread, memcpy))
        self.add(name, size, "cpu", "put", await compare(nbytes, self.reps, put, copy), "memcpy")
        await self.put_all(cpu, batches)
        get = self.get_all(cpu, keys)
        self.add(name, size, "cpu", "get", await compare(nbytes, self.reps, get, copy), "memcpy")
        await cpu.close()

        raw_dir = os.path.join(self.folder, "raw")
        os.makedirs(raw_dir, exist_ok=True)
        paths = [os.path.join(raw_dir, key) for key, _ in items]
        for case, direct, fsync in FILE_CASES:
            raw_name = ("O_DIRECT" if direct else "buffered") + ("+fsync" if fsync else "")
            url = f"file://{self.folder}/{case}"
            options = {"o_direct": direct, "fsync": fsync}
            tier = build_backend(url, capacity=2 * nbytes, options=options, pool=self.pool)
            await tier.open()

            async def clear_raw() -> None:
                await asyncio.to_thread(unlink_all, paths)
                await self.drop()

            async def clear_tier(tier: Backend = tier) -> None:
                await self.delete(tier, keys)
                await self.drop()

            write = partial(raw_write, paths, src, direct=direct, fsync=fsync)
            result = await compare(
                nbytes,
                self.reps,
                Measured(partial(self.put_all, tier, batches), before=clear_tier),
                Measured(partial(asyncio.to_thread, write), before=clear_raw),
            )
            self.add(name, size, f"file {case}", "put", result, f"{raw_name} write")
            get = self.get_all(tier, keys, before=self.drop)
            raw = self.raw_read(paths, size, direct=direct)
            result = await compare(nbytes, self.reps, get, raw)
            self.add(name, size, f"file {case}", "get", result, f"{raw_name} read", cold=True)
            await tier.close()
            shutil.rmtree(url.removeprefix("file://"))
        shutil.rmtree(raw_dir)
        for buf in (*src, *dst):
            buf.release()

    def raw_read(
        self,
        paths: list[str],
        size: int,
        *,
        direct: bool,
        threads: tuple[ThreadPoolExecutor, int] | None = None,
    ) -> Measured:
        """Timed reads into buffers leased from the pool the tier reads into, by one
        thread or by ``threads`` (an executor and how many of its threads to use).

        Tier and raw runs then reuse the same memory: O_DIRECT speed on these VMs
        depends on the buffer's physical layout (up to 2x), not only on the disk.
        """
        bufs: list[Buffer] = []
        read = partial(raw_read, paths, bufs, direct=direct)
        if threads is not None:
            executor, n = threads
            read = partial(raw_read_parallel, paths, bufs, direct=direct, threads=executor, n=n)

        async def before() -> None:
            bufs[:] = [self.pool.acquire(size) for _ in paths]
            await self.drop()

        async def after() -> None:
            for buf in bufs:
                buf.release()

        return Measured(partial(asyncio.to_thread, read), before, after)

    async def cold_batch(self, size: int) -> None:
        """One ``get_many`` of :data:`COLD_BATCH` cold chunk files of ``size`` bytes with
        each of :data:`COLD_BATCH_THREADS`, against O_DIRECT reads of the same files."""
        count, nbytes = COLD_BATCH, COLD_BATCH * size
        src = [self.pool.copy_of(os.urandom(size)) for _ in range(count)]
        items = [(f"bench.{i:032x}", buf) for i, buf in enumerate(src)]
        keys = [key for key, _ in items]
        url, options = f"file://{self.folder}/cold-batch", {"o_direct": True}
        writer = build_backend(url, capacity=2 * nbytes, options=options, pool=self.pool)
        assert isinstance(writer, FileBackend)
        async with writer:
            await self.put_all(writer, [items])
        paths = [writer.folder.path(key) for key in keys]
        runs: dict[str, Measured] = {}
        tiers = []
        with ThreadPoolExecutor(max(COLD_BATCH_THREADS)) as executor:
            for n in COLD_BATCH_THREADS:
                tier = build_backend(
                    url, capacity=2 * nbytes, options={**options, "threads": n}, pool=self.pool
                )
                await tier.open()
                tiers.append(tier)
                runs[f"tier {n}"] = self.get_all(tier, [keys], before=self.drop)
                parallel = (executor, n) if n > 1 else None
                runs[f"raw {n}"] = self.raw_read(paths, size, direct=True, threads=parallel)
            rates = await measure(nbytes, self.reps, runs)
        for tier in tiers:
            await tier.close()
        shutil.rmtree(url.removeprefix("file://"))
        for buf in src:
            buf.release()
        label = f"cold batch of {count}"
        pairs = [(n, n) for n in COLD_BATCH_THREADS] + [(max(COLD_BATCH_THREADS), 1)]
        for tier_n, raw_n in pairs:
            tier_rates, raw_rates = rates[f"tier {tier_n}"], rates[f"raw {raw_n}"]
            row = Row(
                label,
                size,
                f"file o_direct threads={tier_n}",
                "get",
                statistics.median(tier_rates),
                f"O_DIRECT preadv x{raw_n}",
                statistics.median(raw_rates),
                self.cold,
                (min(tier_rates), max(tier_rates)),
                (min(raw_rates), max(raw_rates)),
            )
            self.rows.append(row)

    @staticmethod
    async def put_all(backend: Backend, batches: list[list[tuple[str, Buffer]]]) -> None:
        for batch in batches:
            assert all(await backend.put_many(batch)), "a benchmark write was refused"

    @staticmethod
    async def delete(backend: Backend, keys: list[list[str]]) -> None:
        for batch in keys:
            await backend.delete_many(batch)

    @staticmethod
    def get_all(backend: Backend, keys: list[list[str]], before: Step = nothing) -> Measured:
        """Timed ``get_many`` of every batch; the buffers are released untimed."""
        got: list[Buffer | None] = []

        async def get() -> None:
            got.clear()
            for batch in keys:
                got.extend(await backend.get_many(batch))
            assert None not in got, "a benchmark key is missing"

        async def release() -> None:
            for buf in got:
                if buf is not None:
                    buf.release()

        return Measured(get, before, release)

    def add(
        self,
        chunk: str,
        size: int,
        case: str,
        op: str,
        result: tuple[float, float],
        raw: str,
        *,
        cold: bool = False,
    ) -> None:
        tier_gbps, raw_gbps = result
        was_cold = self.cold if cold else None
        self.rows.append(Row(chunk, size, case, op, tier_gbps, raw, raw_gbps, was_cold))


def table(rows: list[Row], batch: int) -> str:
    head = (
        f"{'chunk (batch ' + str(batch) + ')':<27} {'tier':<24} {'op':<4} {'GB/s':>8}  "
        f"{'raw baseline':<20} {'GB/s':>6} {'ratio':>7}  target"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = ""
        if r.target is not None:
            verdict = f">= {r.target}x {'ok' if r.ratio >= r.target else 'MISSED'}"
        if r.cold is False:
            verdict += " (WARM cache)"
        if r.tier_range is not None and r.raw_range is not None:
            verdict += " range {:.2f}-{:.2f} / {:.2f}-{:.2f}".format(*r.tier_range, *r.raw_range)
        label = f"{r.chunk} {r.chunk_bytes / 2**20:g} MiB"
        lines.append(
            f"{label:<27} {r.case:<24} {r.op:<4} {r.tier_gbps:8.2f}  {r.raw:<20} "
            f"{r.raw_gbps:6.2f} {r.ratio:7.2f}  {verdict}"
        )
    return "\n".join(lines)


def write_json(path: str, results: list[dict[str, Any]], **meta: Any) -> None:
    """Write ``{"meta": ..., "results": results}`` to ``path``; ``meta`` gets the command
    line, the machine and its CPU count added."""
    meta = {"command": " ".join(["python", *sys.argv]), **meta}
    meta.update(machine=platform.platform(), cpus=os.cpu_count())
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--dir", default="/var/tmp", help="a folder on the disk to test")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--batch", type=int, default=8, help="chunks per put_many/get_many")
    parser.add_argument(
        "--only", choices=SECTIONS, action="append", help="run only these sections (repeatable)"
    )
    return parser.parse_args(argv)


SECTIONS = ("tiers", "cold-batch")


async def run_all(folder: str, reps: int, batch: int, sections: Sequence[str]) -> list[Row]:
    bench = Bench(folder, reps, batch)
    if "tiers" in sections:
        for name, shape in CHUNKS.items():
            await bench.chunk(name, shape)
    if "cold-batch" in sections:
        for size in COLD_BATCH_CHUNKS:
            await bench.cold_batch(size)
    return bench.rows


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    folder = tempfile.mkdtemp(prefix="kvtier-bench-", dir=args.dir)
    try:
        torch.set_num_threads(1)  # copies on a loaded machine: more threads only contend
        rows = asyncio.run(run_all(folder, args.reps, args.batch, args.only or SECTIONS))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(table(rows, args.batch))
    print(
        "cpu tier: zero copy (get_many returns the stored buffer), so its GB/s is "
        "bytes / lookup time; range: slowest-fastest run GB/s, tier / raw"
    )
    if args.json:
        write_json(
            args.json,
            [{**asdict(r), "ratio": r.ratio, "target": r.target} for r in rows],
            reps=args.reps,
            batch=args.batch,
            dir=args.dir,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
