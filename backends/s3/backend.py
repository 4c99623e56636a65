"""The ``s3`` tier's backend: one object per chunk, boto3 in the tier's worker threads.

* Layout: chunk ``key`` is the object ``<prefix><key>`` in the URL's bucket. Other
  objects under the prefix are ignored by ``iter_keys``.
* Every request runs in the backend's :class:`~kvtier.core.blocking.BlockingPool` of
  ``max_concurrency`` threads (and as many pooled connections), so the event loop
  never blocks on boto3. Requests are retried by botocore (``retry_mode``,
  ``max_attempts``) on throttling, 5xx and connection errors.
* Reads (:mod:`~kvtier.backends.s3.reads`): GETs straight into pool buffers, larger
  objects in parallel ranged GETs pinned to one ETag; bodies cut short are read again.
* Writes (:mod:`~kvtier.backends.s3.writes`): one PUT, or a multipart upload of
  ``part_size`` parts in parallel; a cancelled or failed write leaves the key absent
  or complete. ``PutMode.CREATE`` is one conditional request (``If-None-Match: *``)
  where the store honours it, else a HEAD then a PUT.
* Malformed objects: an object larger than any blob is a miss and is deleted, unless
  it changed since it was read (:mod:`~kvtier.backends.s3.reads`); counted as
  ``malformed_removed``. Blobs that are damaged inside are the tier chain's to find.
* Unbounded: capacity is the bucket's; expire old chunks with ``ttl``
  (:mod:`~kvtier.backends.s3.expiry`) or a lifecycle rule.
  ``stats()`` reports request counters, not key counts (a listing would be needed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from functools import partial
from typing import TYPE_CHECKING, Any

from kvtier.backends.s3 import S3Options, parse_s3_url
from kvtier.backends.s3.bucket import Bucket
from kvtier.backends.s3.calls import each
from kvtier.backends.s3.errors import Place
from kvtier.backends.s3.expiry import Expiry
from kvtier.backends.s3.pins import S3Pins, drop_pins
from kvtier.backends.s3.reads import Reader
from kvtier.backends.s3.writes import Writer, native_create
from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import Buffer
from kvtier.core.errors import BackendUnavailableError, ConfigError, KVTierError

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


log = logging.getLogger(__name__)


def _release(buf: Buffer | None) -> None:
    if buf is not None:
        buf.release()


@dataclass(frozen=True)
class _Connected:
    """What an open backend sends its requests with."""

    bucket: Bucket
    workers: BlockingPool
    reader: Reader
    writer: Writer
    expiry: Expiry | None


class S3Backend(S3Pins, Backend):
    """An unbounded, persistent, shared byte store: one S3 object per chunk.

    ``capabilities.create_mode``: ``PutMode.CREATE`` costs one conditional request per
    chunk where the store honours ``If-None-Match`` (AWS since 2024, MinIO, Ceph,
    SeaweedFS), atomic between concurrent writers for blobs sent in one PUT, and for
    multipart uploads where the store's conditional completion is (see
    :mod:`~kvtier.backends.s3.writes`). Where it does not (``conditional_put:
    emulated``, or ``auto`` found it ignored), CREATE is a HEAD then a PUT, not atomic
    between concurrent writers: the instance then says ``create_mode=False``, and the
    tier chain writes with ``OVERWRITE`` (one request).
    """

    capabilities = Capabilities(
        persistent=True, shared=True, bounded=False, listing=True, create_mode=True
    )
    options: S3Options
    options_model = S3Options

    def _configure(self) -> None:
        if self.capacity is not None:
            raise ConfigError(
                f"tier {self.safe_url!r}: the s3 tier does not enforce a capacity (the "
                "bucket holds what it is given); remove 'capacity' and expire old chunks "
                "with a bucket lifecycle rule"
            )
        self.bucket, self.prefix = parse_s3_url(self.url)
        region = self.options.region or "default region"
        endpoint = self.options.endpoint_url or f"AWS S3 ({region})"
        self._place = Place(self.safe_url, self.bucket, endpoint)
        self._connected: _Connected | None = None
        self._counts: Counter[str] = Counter()
        self._pinned: dict[str, int] = {}
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    async def _open(self) -> None:
        """Connect and check that the bucket exists and the credentials are accepted."""
        if self._connected is not None:
            return
        workers = self._start_workers(self.options.max_concurrency)
        bucket = await self._blocking(
            partial(Bucket.connect, self.options, self.bucket, self.prefix, self._place),
            orphan=Bucket.close,
        )
        ttl = self.options.ttl
        expiry = None if ttl is None else Expiry(ttl, bucket)
        expired = None if expiry is None else expiry.expired_object
        reader = Reader(bucket, workers, self.pool, self.options.part_size, self._counts, expired)
        writer = Writer(bucket, workers, self.options, self._counts)
        self._connected = _Connected(bucket, workers, reader, writer, expiry)
        if expiry is not None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_forever(expiry))
        if native_create(self.options) is False:
            self.capabilities = replace(self.capabilities, create_mode=False)

    async def _sweep_forever(self, expiry: Expiry) -> None:
        while True:
            await asyncio.sleep(expiry.period)
            try:
                self._counts["expired"] += await self._blocking(expiry.sweep)
            except KVTierError as exc:
                log.warning("%s: sweeping expired chunks failed: %s", self.safe_url, exc)

    async def _close(self) -> None:
        """Disconnect (the workers, and with them every request, have ended)."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        connected, self._connected = self._connected, None
        if connected is not None:
            connected.bucket.close()

    def _io(self) -> _Connected:
        if self._connected is None:
            raise BackendUnavailableError(f"{self.safe_url}: not open; await backend.open() first")
        return self._connected

    @property
    def client(self) -> S3Client:
        """The boto3 client of an open backend."""
        return self._io().bucket.client

    # -- the Backend hooks -------------------------------------------------------------

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        reader = self._io().reader
        return await each([self.prefix + key for key in keys], reader.get, drop=_release)

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        writer = self._io().writer
        try:
            return await each(items, lambda item: writer.put(self.prefix + item[0], item[1], mode))
        finally:
            if writer.native_create is False:  # configured, or found by the auto probe
                self.capabilities = replace(self.capabilities, create_mode=False)

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        io = self._io()
        if io.expiry is not None:
            checked = await io.workers.run_all(
                [partial(io.expiry.fresh, self.prefix + k) for k in keys]
            )
            self._counts["expired"] += sum(removed for _, removed in checked)
            return [ok for ok, _ in checked]
        return await io.workers.run_all([partial(io.bucket.exists, self.prefix + k) for k in keys])

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        io = self._io()
        names = [self.prefix + k for k in keys]
        done = await io.workers.run_all([partial(io.bucket.delete, name) for name in names])
        gone = [name for name, was in zip(names, done, strict=True) if was]
        if gone:
            await io.workers.run(partial(drop_pins, io.bucket, gone))
        return done

    def _pins_io(self) -> tuple[Bucket, BlockingPool]:
        io = self._io()
        return io.bucket, io.workers

    async def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        """Keys from ListObjectsV2, a page at a time."""
        bucket = self._io().bucket
        token: str | None = None
        while True:
            keys, token = await self._blocking(partial(bucket.list_page, prefix, token))
            for key in keys:
                yield key
            if token is None:
                return

    async def _stats(self) -> BackendStats:
        creates = native_create(self.options)
        if self._connected is not None:
            creates = self._connected.writer.native_create
        details: dict[str, Any] = {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "endpoint": self._place.endpoint,
            "conditional_put": {None: "not probed yet", True: "native", False: "emulated"}[creates],
        }
        for name in ("multipart_uploads", "ranged_reads", "reads_retried", "malformed_removed"):
            details[name] = self._counts[name]
        if self.options.ttl is not None:
            details["expired"] = self._counts["expired"]
        if self.options.pinned_bytes:
            details["pinned_bytes"] = sum(self._pinned.values())
        return BackendStats(details=details)
