"""Reads of the s3 tier: GETs straight into pool buffers.

One GET of the first ``part_size`` (+ :data:`FRAMING_SLACK`) bytes tells the object's
size; the rest of a larger object comes in parallel ranged GETs pinned to the first
response's ETag (``If-Match``), so an object rewritten mid-read is read again, never
mixed. A body that ends early or is cut off is never returned: the key is read
again, and after :data:`READ_ATTEMPTS` the read fails with
:class:`BackendUnavailableError`.

An object larger than any blob (:data:`MAX_OBJECT_BYTES`) is malformed: it is a miss
(its body is never read) and is deleted with ``If-Match`` on the ETag the read saw, so
an object written over it since is never deleted. S3 makes a write visible only once
whole, so no writer is ever half way through an object a reader sees. The deletion is
best effort (a failure, or a store without conditional deletes, is logged) and counted
as ``malformed_removed``.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import TYPE_CHECKING, Any

from kvtier.backends.s3.bucket import Bucket
from kvtier.backends.s3.calls import Operation
from kvtier.backends.s3.errors import (
    InvalidRange,
    NotFound,
    PreconditionFailed,
    Truncated,
    translated,
)
from kvtier.backends.s3.streams import read_into
from kvtier.core.blob import MAX_BLOB_BYTES
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.errors import KVTierError

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import GetObjectOutputTypeDef

log = logging.getLogger(__name__)

FRAMING_SLACK = 64 << 10
"""The first GET reads ``part_size`` plus this: a blob of a ``part_size`` chunk and its
header comes in one request."""
MAX_OBJECT_BYTES = MAX_BLOB_BYTES
"""Larger objects are no blobs: reading one would only allocate, so it is a miss, and
the object is deleted."""
READ_ATTEMPTS = 3
"""Reads of one key per ``get_many``: a key rewritten during each is a miss, a body
cut short each time an error."""


@dataclass
class _Opened:
    """A GET response holding the first ``nbytes`` of a ``total``-byte object, unread."""

    body: Any
    nbytes: int
    total: int
    etag: str


@dataclass(frozen=True)
class _Expired:
    """An object past the tier's ``ttl`` (its body unread), and the ETag it had."""

    etag: str


@dataclass(frozen=True)
class _Malformed:
    """An object that is no blob (its body unread): ``why``, and the ETag it had."""

    why: str
    etag: str


def _dispose(result: Buffer | _Opened | _Malformed | _Expired | None) -> None:
    """Free a first GET's result nobody will receive."""
    if isinstance(result, Buffer):
        result.release()
    elif isinstance(result, _Opened):
        result.body.close()


def _total_size(response: GetObjectOutputTypeDef) -> int:
    """The object's size: from ``Content-Range: bytes 0-9/1234``, else the body's."""
    content_range = response.get("ContentRange")
    if content_range:
        return int(content_range.rpartition("/")[2])
    return response["ContentLength"]


class Reader:
    """Reads whole objects of ``bucket`` into buffers of ``pool``, with the requests
    in ``workers``; counts ``ranged_reads`` and ``reads_retried`` in ``counts``."""

    def __init__(
        self,
        bucket: Bucket,
        workers: BlockingPool,
        pool: BufferPool,
        part_size: int,
        counts: Counter[str],
        expired: Callable[[str, datetime], bool] | None = None,
    ) -> None:
        self.bucket = bucket
        self.expired = expired
        """Whether object ``name``, last modified then, is past the tier's ``ttl`` (if
        any) and not pinned."""
        self.workers = workers
        self.pool = pool
        self.part_size = part_size
        self.counts = counts

    async def get(self, name: str) -> Buffer | None:
        """Object ``name`` in a pool buffer the caller owns; ``None`` if absent (or
        deleted or rewritten during every attempt, or larger than any blob)."""
        failure: Truncated | None = None
        for attempt in range(READ_ATTEMPTS):
            if attempt:
                self.counts["reads_retried"] += 1
            try:
                first = await self.workers.run(partial(self._get_first, name), orphan=_dispose)
                if isinstance(first, _Malformed):
                    await self._remove(name, first)
                    return None
                if isinstance(first, _Expired):
                    delete = partial(self.bucket.delete_if_unchanged, name, first.etag)
                    self.counts["expired"] += await self.workers.run(delete)
                    return None
                if not isinstance(first, _Opened):
                    return first
                return await self._get_rest(name, first)
            except (NotFound, PreconditionFailed):  # rewritten or deleted mid-read
                pass
            except Truncated as exc:
                failure = exc
        if failure is None:
            return None
        raise self.bucket.place.unreachable(f"GET {name}: {failure} ({READ_ATTEMPTS} attempts)")

    async def _remove(self, name: str, found: _Malformed) -> None:
        """Delete the malformed object ``name`` unless it changed since it was read."""
        url = self.bucket.place.url
        try:
            removed = await self.workers.run(
                partial(self.bucket.delete_if_unchanged, name, found.etag)
            )
        except KVTierError as exc:
            log.warning("s3 tier %s: could not delete %s (%s): %s", url, name, found.why, exc)
            return
        if removed:
            log.warning("s3 tier %s: deleted %s: %s", url, name, found.why)
            self.counts["malformed_removed"] += 1

    async def _get_rest(self, name: str, first: _Opened) -> Buffer:
        """Read the first response's body and the remaining ranges in parallel."""
        buf = self.pool.acquire(first.total)
        view, rest = buf.view, first.total - first.nbytes
        step = -(-rest // -(-rest // self.part_size))  # even ranges <= part_size
        reads = [partial(read_into, first.body, view[: first.nbytes])]
        for start in range(first.nbytes, first.total, step):
            end = min(start + step, first.total)
            reads.append(partial(self._get_range, name, first, start, view[start:end]))
        operation = Operation(self.workers)
        try:
            await operation.run_all(reads)
        except BaseException:

            def cleanup() -> None:
                first.body.close()
                buf.release()

            operation.after(cleanup)
            raise
        self.counts["ranged_reads"] += 1
        return buf

    def _get_first(self, name: str) -> Buffer | _Opened | _Malformed | _Expired | None:
        """GET the first ``part_size + FRAMING_SLACK`` bytes: the whole blob (read into a
        pool buffer), an :class:`_Opened` response for a larger one, ``None`` if there
        is none, or :class:`_Malformed` for an object that is no blob."""
        bucket, what = self.bucket, f"GET {name}"
        last = self.part_size + FRAMING_SLACK - 1
        try:
            try:
                with translated(bucket.place, what):
                    response = bucket.client.get_object(
                        Bucket=bucket.name, Key=name, Range=f"bytes=0-{last}"
                    )
            except InvalidRange:  # an empty object has no byte 0
                with translated(bucket.place, what):
                    response = bucket.client.get_object(Bucket=bucket.name, Key=name)
        except NotFound:
            return None
        if self.expired is not None and self.expired(name, response["LastModified"]):
            response["Body"].close()
            return _Expired(response["ETag"])
        nbytes, total = response["ContentLength"], _total_size(response)
        if total > MAX_OBJECT_BYTES:
            response["Body"].close()
            return _Malformed(f"it holds {total} bytes, more than any blob", response["ETag"])
        if nbytes < total:
            return _Opened(response["Body"], nbytes, total, response["ETag"])
        buf = self.pool.acquire(nbytes)
        try:
            read_into(response["Body"], buf.view)
        except BaseException:
            buf.release()
            raise
        return buf

    def _get_range(self, name: str, first: _Opened, start: int, view: memoryview) -> None:
        """Read bytes ``[start, start + len(view))`` of the object ``first`` began."""
        bucket, end = self.bucket, start + view.nbytes
        with translated(bucket.place, f"GET {name} bytes {start}-{end - 1}"):
            response = bucket.client.get_object(
                Bucket=bucket.name, Key=name, Range=f"bytes={start}-{end - 1}", IfMatch=first.etag
            )
        if response["ContentLength"] != view.nbytes or _total_size(response) != first.total:
            response["Body"].close()
            raise PreconditionFailed(f"{name} changed during the read")
        read_into(response["Body"], view)
