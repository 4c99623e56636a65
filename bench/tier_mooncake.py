"""Throughput of the ``mooncake`` tier against raw Mooncake Store calls, in one run.

    python bench/tier_mooncake.py [--json out.json] [--reps 5] [--batch 8] [--inflight 1]

Starts a Mooncake master and metadata server on 127.0.0.1 (free ports). Each case moves
KV chunks (kvtier blobs of random fp16 KV, ``raw`` codec, in pool buffers) through the
Backend API (``put_many`` / ``get_many`` in batches of ``--batch``, ``--inflight``
batches at a time) and through the raw calls the tier builds on, on the same bytes, the
same client and the same concurrency: ``batch_put_from`` from the same registered
buffers and ``batch_get_into`` into preallocated registered buffers of known sizes.

* ``put``: before each timed run the keys are removed (untimed), so both write new keys;
  the tier upserts (``OVERWRITE``).
* ``create``: the same with ``PutMode.CREATE`` (put sessions), as the tier chain writes.
* ``get``: sizes remembered by the tier (it wrote or read the keys before).
* ``get cold``: a new backend that never saw the keys asks the sizes of its first batch
  from the master and guesses the others' from them.
* ``get+decode``: ``get_many`` then ``decode_blob`` into KV tensors (header, xxh3
  checksum, copy): the whole get path kvtier adds on top of the raw read.
* ``decode``: that decode alone, against copying the same payload bytes into the same
  tensors with ``copy_``.

Placements: ``local``, the store's memory is this process's segment (the transfer is a
memcpy inside the process); ``remote``, a helper process lends the only segment and the
bytes cross loopback TCP. Medians of ``--reps`` alternating runs; ratio = tier / raw.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tiers import CHUNKS, MIN_RUN_BYTES, Measured, compare, write_json

from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import Buffer, BufferPool, address_of
from kvtier.core.codecs.decode import decode_blob
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.factory import build_backend
from kvtier.core.plugins import get_registry

TARGET = 0.9
"""Minimum tier / raw ratio reported against (put and get)."""
SEGMENT = 1 << 30
Items = list[tuple[str, Buffer]]

HOLDER = """
import sys
from mooncake.store import MooncakeDistributedStore
store = MooncakeDistributedStore()
code = store.setup("127.0.0.1", sys.argv[1], int(sys.argv[3]), 0, "tcp", "", sys.argv[2])
print(code, flush=True)
sys.stdin.read()
"""
"""A process lending a segment to the store until its stdin closes."""


@dataclass
class Row:
    chunk: str
    chunk_bytes: int
    placement: str
    op: str
    tier_gbps: float
    raw: str
    raw_gbps: float

    @property
    def ratio(self) -> float:
        return self.tier_gbps / self.raw_gbps

    @property
    def target(self) -> float | None:
        return TARGET if self.op in ("put", "create", "get") else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(ready: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except OSError:
        return False


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


@contextmanager
def mooncake_store(folder: str) -> Iterator[dict[str, str]]:
    """A master and metadata server on 127.0.0.1; yields the tier's URL and options."""
    import mooncake

    master_bin = Path(next(iter(mooncake.__path__))) / "mooncake_master"
    rpc, admin, meta = free_port(), free_port(), free_port()
    log = open(os.path.join(folder, "servers.log"), "ab")  # noqa: SIM115 - closed below
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mooncake.http_metadata_server", "--host", "127.0.0.1",
             "--port", str(meta)],
            stdout=log, stderr=log,
        ),
        subprocess.Popen(
            [str(master_bin), "-rpc_address=127.0.0.1", f"-rpc_port={rpc}",
             "-metrics_host=127.0.0.1", f"-metrics_port={admin}"],
            stdout=log, stderr=log,
        ),
    ]  # fmt: skip
    try:
        wait_until(lambda: answers(f"http://127.0.0.1:{admin}/health"), "mooncake_master")
        wait_until(lambda: listening(meta), "mooncake_http_metadata_server")
        yield {
            "url": f"mooncake://127.0.0.1:{rpc}",
            "master": f"127.0.0.1:{rpc}",
            "metadata_server": f"http://127.0.0.1:{meta}/metadata",
        }
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()
        log.close()


@contextmanager
def segment_holder(store: dict[str, str]) -> Iterator[None]:
    """Another process lending the store a segment (the remote placement)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, store["metadata_server"], store["master"], str(SEGMENT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    if proc.stdout.readline().strip() != "0":
        raise RuntimeError("the segment holder could not join the store")
    try:
        yield
    finally:
        proc.stdin.close()
        proc.wait(60)


def kv_blobs(shape: tuple[int, ...], count: int, pool: BufferPool, tag: str) -> Items:
    """``count`` kvtier blobs (raw codec) of random fp16 KV chunks."""
    pipeline = CodecPipeline.from_config("raw", get_registry())
    items = []
    for i in range(count):
        key = f"bench-{tag}.{i:032x}"
        chunk = torch.randn(shape, generator=torch.Generator().manual_seed(i)).half()
        items.append((key, pipeline.encode(key, chunk, pool).buf))
    return items


class Case:
    """One chunk shape in one placement: the tier's and the raw runs on the same bytes."""

    def __init__(
        self,
        backend: Backend,
        items: Items,
        targets: dict[str, torch.Tensor],
        batch: int,
        inflight: int,
    ) -> None:
        self.backend = backend
        self.targets = targets
        self.items = items
        self.batches = [items[i : i + batch] for i in range(0, len(items), batch)]
        self.inflight = inflight
        self.store = backend._client.store  # type: ignore[attr-defined]  # the tier's own client
        self.threads = ThreadPoolExecutor(inflight)
        self.sink = [backend.pool.acquire(buf.nbytes) for _, buf in items]  # registered
        for buf in self.sink:
            buf.view[:] = b"\0" * buf.nbytes  # touched, as the pool's reused buffers are
        self.got: list[Buffer | None] = []

    async def each_batch(self, step: Callable[[Items], Awaitable[object]]) -> None:
        limit = asyncio.Semaphore(self.inflight)

        async def one(batch: Items) -> None:
            async with limit:
                await step(batch)

        await asyncio.gather(*(one(batch) for batch in self.batches))

    async def raw_each_batch(self, step: Callable[[int, Items], object]) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(
                loop.run_in_executor(self.threads, step, i, batch)
                for i, batch in enumerate(self.batches)
            )
        )

    def offset(self, i: int) -> int:
        return sum(len(b) for b in self.batches[:i])

    # -- the operations ---------------------------------------------------------------

    async def tier_put(self, mode: PutMode = PutMode.OVERWRITE) -> None:
        async def put(batch: Items) -> None:
            stored = await self.backend.put_many(batch, mode)
            assert all(stored), "a benchmark write was refused"

        await self.each_batch(put)

    def raw_put_batch(self, i: int, batch: Items) -> None:
        codes = self.store.batch_put_from(
            [k for k, _ in batch],
            [address_of(b.block) for _, b in batch],
            [b.nbytes for _, b in batch],
        )
        assert codes == [0] * len(batch), codes

    async def raw_put(self) -> None:
        await self.raw_each_batch(self.raw_put_batch)

    async def remove(self) -> None:
        for batch in self.batches:
            await self.backend.delete_many([k for k, _ in batch])

    async def tier_get(self, backend: Backend | None = None, decode: bool = False) -> None:
        backend = backend or self.backend
        results: dict[int, list[Buffer | None]] = {}

        async def get(batch: Items) -> None:
            got = await backend.get_many([k for k, _ in batch])
            assert None not in got, "a benchmark key is missing"
            if decode:
                for (key, _), blob in zip(batch, got, strict=True):
                    assert blob is not None
                    decode_blob(blob, get_registry(), self.targets[key], expected_key=key)
            results[id(batch)] = got

        await self.each_batch(get)
        self.got = [blob for batch in self.batches for blob in results[id(batch)]]

    async def decode(self) -> None:
        """``decode_blob`` of the fetched blobs into the KV tensors (header, checksum, copy)."""
        for (key, _), blob in zip(self.items, self.got, strict=True):
            assert blob is not None
            decode_blob(blob, get_registry(), self.targets[key], expected_key=key)

    async def copy(self) -> None:
        """The same payload bytes copied into the KV tensors with no checks."""
        for (key, _), blob in zip(self.items, self.got, strict=True):
            assert blob is not None
            target = self.targets[key].view(-1).view(torch.uint8)
            target.copy_(torch.frombuffer(blob.view, dtype=torch.uint8)[-target.numel() :])

    async def release(self) -> None:
        for blob in self.got:
            if blob is not None:
                blob.release()
        self.got = []

    def raw_get_batch(self, i: int, batch: Items) -> None:
        sink = self.sink[self.offset(i) : self.offset(i) + len(batch)]
        codes = self.store.batch_get_into(
            [k for k, _ in batch], [address_of(b.block) for b in sink], [b.nbytes for b in sink]
        )
        assert codes == [b.nbytes for b in sink], codes

    async def raw_get(self) -> None:
        await self.raw_each_batch(self.raw_get_batch)


async def run_case(
    name: str, shape: tuple[int, ...], placement: str, options: dict[str, Any], args: Any
) -> list[Row]:
    pool = BufferPool(max_idle_bytes=8 << 30)
    size = 2 * torch.Size(shape).numel()
    count = args.batch * -(-MIN_RUN_BYTES // (size * args.batch))
    backend = build_backend(args.store["url"], options=options, pool=pool)
    await backend.open()
    items = kv_blobs(shape, count, pool, f"{placement}-{shape[2]}")
    targets = {k: torch.empty(shape, dtype=torch.float16) for k, _ in items}
    case = Case(backend, items, targets, args.batch, args.inflight)
    nbytes = sum(buf.nbytes for _, buf in items)
    rows = []

    def add(op: str, result: tuple[float, float], raw: str) -> None:
        rows.append(Row(name, nbytes // count, placement, op, result[0], raw, result[1]))

    put = Measured(case.tier_put, before=case.remove)
    raw_put = Measured(case.raw_put, before=case.remove)
    add("put", await compare(nbytes, args.reps, put, raw_put), "batch_put_from")
    create = Measured(partial(case.tier_put, PutMode.CREATE), before=case.remove)
    add("create", await compare(nbytes, args.reps, create, raw_put), "batch_put_from")
    await case.tier_put()
    raw_get = Measured(case.raw_get)
    get = Measured(case.tier_get, after=case.release)
    add("get", await compare(nbytes, args.reps, get, raw_get), "batch_get_into")
    cold_backend: list[Backend] = []

    async def fresh() -> None:
        cold_backend.append(build_backend(args.store["url"], options=options, pool=pool))
        await cold_backend[-1].open()  # shares the client: no new connection

    async def cold_get() -> None:
        await case.tier_get(cold_backend[-1])

    async def cold_done() -> None:
        await case.release()
        await cold_backend.pop().close()

    cold = Measured(cold_get, before=fresh, after=cold_done)
    add("get cold", await compare(nbytes, args.reps, cold, raw_get), "batch_get_into")
    decoded = Measured(partial(case.tier_get, decode=True), after=case.release)
    add("get+decode", await compare(nbytes, args.reps, decoded, raw_get), "batch_get_into")
    await case.tier_get()
    result = await compare(nbytes, args.reps, Measured(case.decode), Measured(case.copy))
    add("decode", result, "torch copy_")
    await case.release()
    await case.remove()
    for _, buf in items:
        buf.release()
    for buf in case.sink:
        buf.release()
    await backend.close()
    return rows


async def run_all(args: Any) -> list[Row]:
    rows = []
    base = {"metadata_server": args.store["metadata_server"], "threads": max(4, args.inflight)}
    for name, shape in CHUNKS.items():
        rows += await run_case(name, shape, "local", {**base, "global_segment_size": SEGMENT}, args)
    with segment_holder(args.store):
        for name, shape in CHUNKS.items():
            rows += await run_case(name, shape, "remote", {**base, "global_segment_size": 0}, args)
    return rows


def table(rows: Sequence[Row], batch: int, inflight: int) -> str:
    head = (
        f"{f'chunk (batch {batch}, inflight {inflight})':<34} {'placement':<9} "
        f"{'op':<10} {'tier GB/s':>9}  {'raw':<15} {'GB/s':>6} {'ratio':>6}  target"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        verdict = ""
        if r.target is not None:
            verdict = f">= {r.target}x {'ok' if r.ratio >= r.target else 'MISSED'}"
        label = f"{r.chunk} {r.chunk_bytes / 2**20:.2f} MiB"
        lines.append(
            f"{label:<34} {r.placement:<9} {r.op:<10} {r.tier_gbps:9.2f}  {r.raw:<15} "
            f"{r.raw_gbps:6.2f} {r.ratio:6.2f}  {verdict}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--batch", type=int, default=8, help="chunks per put_many/get_many")
    parser.add_argument("--inflight", type=int, default=1, help="batches in flight at once")
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="kvtier-bench-") as folder,
        mooncake_store(folder) as store,
    ):
        args.store = store
        rows = asyncio.run(run_all(args))
    print(table(rows, args.batch, args.inflight))
    if args.json:
        write_json(
            args.json,
            [{**asdict(r), "ratio": r.ratio, "target": r.target} for r in rows],
            reps=args.reps,
            batch=args.batch,
            inflight=args.inflight,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
