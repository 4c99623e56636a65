"""Reads of the s3 tier: GETs straight into pool buffers.

One GET of the first ``part_size`` (+ :data:`FRAMING_SLACK`) bytes tells the object's
size; the rest of a larger object comes in parallel ranged GETs pinned to the first
response's ETag (``If-Match``), so an object rewritten mid-read is read again, never
mixed. A body that ends early or is cut off is never returned: the key is read
again, and after :data:`READ_ATTEMPTS` the read fails with
:class:`BackendUnavailableError`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
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
from kvtier.core.blob import MAX_CHUNK_BYTES, MAX_HEADER_BYTES
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import Buffer, BufferPool

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import GetObjectOutputTypeDef

log = logging.getLogger(__name__)

FRAMING_SLACK = 64 << 10
"""The first GET reads ``part_size`` plus this: a blob of a ``part_size`` chunk and its
header comes in one request."""
MAX_OBJECT_BYTES = MAX_CHUNK_BYTES + MAX_HEADER_BYTES + FRAMING_SLACK
"""Larger objects are no blobs: reading one would only allocate, so it is a miss."""
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


def _dispose(result: Buffer | _Opened | None) -> None:
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
    ) -> None:
        self.bucket = bucket
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

    def _get_first(self, name: str) -> Buffer | _Opened | None:
        """GET the first ``part_size + FRAMING_SLACK`` bytes: the whole blob (read into a
        pool buffer), an :class:`_Opened` response for a larger one, or ``None``."""
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
        nbytes, total = response["ContentLength"], _total_size(response)
        if total > MAX_OBJECT_BYTES:
            response["Body"].close()
            log.warning(
                "s3 tier %s: %s holds %d bytes, more than any blob", bucket.place.url, name, total
            )
            return None
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
