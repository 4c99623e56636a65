"""Throughput of the ``vineyard`` tier against raw vineyard client calls on the same
bytes, in one run.

    python bench/tier_vineyard.py [--json out.json] [--reps 5] [--batch 8]

Starts a vineyardd (IPC socket in a temporary folder, RPC off, 2 GiB) and stops it at
the end. For 2 MiB and 32 MiB chunks (fp16 KV, bench/tiers.py's generator), in batches
of ``--batch``:

* ``put``: ``put_many`` against raw calls that make the same bytes readable by name:
  ``create_blob`` for the batch, ``BlobBuilder.copy`` (vineyard's own memcpy), ``seal``,
  ``create_metadata``, ``persist`` and ``put_name`` per chunk. Deleted before each run.
* ``get``: ``get_many`` (zero-copy views, pinned) against raw ``get_name``, ``get_metas``
  and ``get_blobs`` (zero-copy views, not pinned); the buffers are released after each run.

``same process``: this process writes and reads. ``second process``: this process
writes the chunks (through the tier and raw), and another process on the host (this
script with ``--peer``) reads them, and times its own writes.

Tier and raw runs alternate (bench/tiers.py's ``compare``: order flipped each
repetition, after a warm-up); the table shows medians of ``--reps`` runs and the ratio
tier / raw. Targets: put >= 0.9x raw; get zero copy (reported in the ``zero copy`` column).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from kvtier.backends.vineyard.client import ObjectMeta, reachable
from kvtier.backends.vineyard.leases import LeasedView
from kvtier.backends.vineyard.url import parse_url
from kvtier.core.backend import Backend
from kvtier.core.buffers import Buffer, BufferPool, address_of
from kvtier.core.factory import build_backend

sys.path.insert(0, str(Path(__file__).parent))
from tiers import MIN_RUN_BYTES, Measured, compare, random_chunks, write_json

SHAPES = {"2MiB": (32, 2, 16, 8, 128), "32MiB": (32, 2, 256, 8, 128)}
"""fp16 ``[layers, K/V, tokens, kv heads, head dim]`` chunks of Llama-3-8B."""
TARGET_PUT = 0.9
PREFIX = "bench/"
Items = list[tuple[str, Buffer]]


@dataclass
class Row:
    chunk: str
    chunk_bytes: int
    where: str
    op: str
    tier_gbps: float
    raw_gbps: float
    zero_copy: bool | None
    """For ``get``: whether every buffer the tier returned was a view of shared memory."""

    @property
    def ratio(self) -> float:
        return self.tier_gbps / self.raw_gbps

    @property
    def verdict(self) -> str:
        if self.op == "put":
            return f">= {TARGET_PUT}x {'ok' if self.ratio >= TARGET_PUT else 'MISSED'}"
        return f"zero copy {'ok' if self.zero_copy else 'MISSED'}"


@contextmanager
def vineyardd(folder: str) -> Iterator[str]:
    """A throwaway vineyardd on an IPC socket, RPC off; yields the tier URL."""
    import vineyard

    socket = f"{folder}/vineyard.sock"
    binary = Path(next(iter(vineyard.__path__))) / "bdist" / "vineyardd"
    argv = [str(binary), f"--socket={socket}", "--size=2Gi", "--meta=local", "--rpc=false"]
    with open(f"{folder}/vineyardd.log", "ab") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not reachable(parse_url(f"vineyard://{socket}"), 0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"vineyardd did not start (see {folder}/vineyardd.log)")
            time.sleep(0.05)
        yield f"vineyard://{socket}"
    finally:
        proc.terminate()
        proc.wait()


class Case:
    """One chunk shape: tier and raw runs on the same bytes and keys."""

    def __init__(self, backend: Backend, items: Items, batch: int) -> None:
        self.backend = backend
        self.client = backend.connection.client()  # type: ignore[attr-defined]  # the tier's
        self.items = items
        self.batches = [items[i : i + batch] for i in range(0, len(items), batch)]
        self.got: list[Any] = []
        self.zero_copy = True

    @staticmethod
    def raw_name(key: str) -> str:
        return f"raw/{key}"

    async def tier_put(self) -> None:
        for batch in self.batches:
            assert all(await self.backend.put_many(batch)), "a benchmark write was refused"

    async def tier_clear(self) -> None:
        for batch in self.batches:
            await self.backend.delete_many([k for k, _ in batch])

    async def raw_put(self) -> None:
        c = self.client
        for batch in self.batches:
            builders = c.create_blob([buf.nbytes for _, buf in batch])
            metas = []
            for (_, buf), builder in zip(batch, builders, strict=True):
                builder.copy(0, address_of(buf.block), buf.nbytes)
                meta = ObjectMeta()
                meta["typename"] = "bench::Raw"
                meta["nbytes"] = buf.nbytes
                meta.add_member("buffer", builder.seal(c))
                metas.append(meta)
            for (key, _), meta in zip(batch, c.create_metadata(metas), strict=True):
                c.persist(meta.id)
                c.put_name(meta.id, self.raw_name(key))

    async def raw_clear(self) -> None:
        c = self.client
        for key, _ in self.items:
            try:
                object_id = c.get_name(self.raw_name(key))
            except Exception:  # not written
                continue
            c.drop_name(self.raw_name(key))
            c.delete(object_id, False, True)

    async def tier_get(self) -> None:
        for batch in self.batches:
            got = await self.backend.get_many([k for k, _ in batch])
            assert None not in got, "a benchmark key is missing"
            self.zero_copy &= all(isinstance(b, LeasedView) for b in got)
            self.got += got

    async def raw_get(self) -> None:
        c = self.client
        for batch in self.batches:
            ids = [c.get_name(self.raw_name(k)) for k, _ in batch]
            metas = c.get_metas(ids)
            blobs = c.get_blobs([meta["buffer"].id for meta in metas])
            self.got += [memoryview(blob) for blob in blobs]

    async def release(self) -> None:
        for got in self.got:
            got.release()
        self.got = []


def chunks(name: str, tag: str, batch: int, pool: BufferPool) -> Items:
    """``(key, blob)`` of at least 128 MiB of ``name``-sized chunks, keys ``<tag>-<name>.*``;
    the same bytes in every process (fixed seeds)."""
    shape = SHAPES[name]
    size = 2 * torch.Size(shape).numel()
    count = batch * -(-MIN_RUN_BYTES // (size * batch))
    bufs = random_chunks(shape, count, pool)
    return [(f"{tag}-{name}.{i:032x}", buf) for i, buf in enumerate(bufs)]


async def measure(url: str, name: str, args: Any, *, peer: bool) -> list[Row]:
    """One chunk shape in this process: put, then get of the chunks the first process
    wrote (``peer``) or of this process's own."""
    pool = BufferPool(max_idle_bytes=4 << 30)
    where = "second process" if peer else "same process"
    options = {"key_prefix": PREFIX, "threads": 4}
    rows = []
    async with build_backend(url, capacity=3 << 29, options=options, pool=pool) as backend:
        items = chunks(name, "peer" if peer else "first", args.batch, pool)
        nbytes = sum(buf.nbytes for _, buf in items)
        case = Case(backend, items, args.batch)
        tier = Measured(case.tier_put, before=case.tier_clear)
        raw = Measured(case.raw_put, before=case.raw_clear)
        result = await compare(nbytes, args.reps, tier, raw)
        rows.append(Row(name, items[0][1].nbytes, where, "put", *result, None))
        await case.tier_clear()
        await case.raw_clear()
        if peer:
            case = Case(backend, chunks(name, "first", args.batch, pool), args.batch)
        else:
            await case.tier_put()
            await case.raw_put()
        tier = Measured(case.tier_get, after=case.release)
        raw = Measured(case.raw_get, after=case.release)
        result = await compare(nbytes, args.reps, tier, raw)
        rows.append(Row(name, items[0][1].nbytes, where, "get", *result, case.zero_copy))
        await case.tier_clear()
        await case.raw_clear()
        for _, buf in case.items + items:
            if buf.refcount:
                buf.release()
    return rows


async def with_peer(url: str, name: str, args: Any) -> list[Row]:
    """Write ``name``'s chunks here (tier and raw), then run the second process on them."""
    pool = BufferPool(max_idle_bytes=4 << 30)
    options = {"key_prefix": PREFIX, "threads": 4}
    async with build_backend(url, capacity=3 << 29, options=options, pool=pool) as backend:
        items = chunks(name, "first", args.batch, pool)
        case = Case(backend, items, args.batch)
        await case.tier_put()
        await case.raw_put()
        argv = [sys.executable, __file__, "--peer", url, "--shape", name, "--reps", str(args.reps)]
        argv += ["--batch", str(args.batch)]
        out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
        for _, buf in items:
            buf.release()
    return [Row(**row) for row in json.loads(out.splitlines()[-1])]


def table(rows: list[Row], batch: int) -> str:
    head = (
        f"{f'chunk (batch {batch})':<16} {'where':<15} {'op':<4} {'tier GB/s':>9} "
        f"{'raw GB/s':>9} {'ratio':>6}  target"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.chunk:<16} {r.where:<15} {r.op:<4} {r.tier_gbps:9.2f} {r.raw_gbps:9.2f} "
            f"{r.ratio:6.2f}  {r.verdict}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--batch", type=int, default=8, help="chunks per put_many/get_many")
    parser.add_argument("--peer", help=argparse.SUPPRESS)  # URL: run as the second process
    parser.add_argument("--shape", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.peer:  # the second process: its own puts, then gets of what the first wrote
        rows = asyncio.run(measure(args.peer, args.shape, args, peer=True))
        print(json.dumps([asdict(r) for r in rows]))
        return 0
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-") as folder, vineyardd(folder) as url:
        rows = []
        for name in SHAPES:
            rows += asyncio.run(measure(url, name, args, peer=False))
        for name in SHAPES:
            rows += asyncio.run(with_peer(url, name, args))
    print(table(rows, args.batch))
    if args.json:
        write_json(
            args.json,
            [{**asdict(r), "ratio": r.ratio, "verdict": r.verdict} for r in rows],
            reps=args.reps,
            batch=args.batch,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
