"""The ``s3`` tier's implementation: boto3 on a bounded thread pool.

* Layout: chunk ``key`` is the object ``<prefix><key>`` in the URL's bucket. Other
  objects under the prefix are ignored by ``iter_keys``.
* Every request runs on a pool of ``max_concurrency`` threads (and as many pooled
  connections), so the event loop never blocks on boto3. Requests are retried by
  botocore (``retry_mode``, ``max_attempts``) on throttling, 5xx and connection errors.
* Writes: a blob up to ``multipart_threshold`` is one PUT, a larger one a multipart
  upload of ``part_size`` parts sent in parallel (aborted if it fails or is
  cancelled). S3 makes an object visible only once whole, so a cancelled or failed
  write leaves the key absent or complete. Request bodies are zero-copy views of
  the pool buffer.
* Reads: one GET of the first ``part_size`` (+ 64 KiB) bytes tells the object's size;
  the rest of a larger object comes in parallel ranged GETs pinned to the first response's
  ETag (``If-Match``), so an object rewritten mid-read is read again, never mixed.
  Bodies are read straight into one pool buffer. A body that ends early or is cut
  off is never returned: the key is read again, and after ``READ_ATTEMPTS`` the batch
  fails with :class:`BackendUnavailableError`.
* ``PutMode.CREATE``: ``If-None-Match: *`` where the store honours it (the
  ``conditional_put`` option; ``auto`` probes at the first CREATE), else HEAD then PUT,
  which is not atomic between concurrent writers.
* Unbounded: capacity is the bucket's; expire old chunks with a lifecycle rule.
  ``stats()`` reports request counters, not key counts (a listing would be needed).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import IO, TYPE_CHECKING, Any, ClassVar, cast

import boto3
from botocore.config import Config
from pydantic import BaseModel, SecretStr

from kvtier.backends.s3 import S3Options, parse_s3_url
from kvtier.backends.s3.calls import Calls, gather_all
from kvtier.backends.s3.errors import (
    InvalidRange,
    NotFound,
    Place,
    PreconditionFailed,
    Truncated,
    Unsupported,
    translated,
)
from kvtier.backends.s3.streams import ViewReader, read_into
from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode
from kvtier.core.blob import MAX_CHUNK_BYTES, MAX_HEADER_BYTES
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.errors import BackendUnavailableError, ConfigError
from kvtier.core.keys import is_valid_key, validate_key
from kvtier.core.plugins import PluginRegistry

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        GetObjectOutputTypeDef,
        ListObjectsV2RequestTypeDef,
    )

log = logging.getLogger(__name__)

LIST_PAGE = 1000
"""Keys per ListObjectsV2 request (S3's maximum)."""
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
    """Free a read result nobody will receive."""
    if isinstance(result, Buffer):
        result.release()
    elif isinstance(result, _Opened):
        result.body.close()


def _release(buf: Buffer | None) -> None:
    if buf is not None:
        buf.release()


def _total_size(response: GetObjectOutputTypeDef) -> int:
    """The object's size: from ``Content-Range: bytes 0-9/1234``, else the body's."""
    content_range = response.get("ContentRange")
    if content_range:
        return int(content_range.rpartition("/")[2])
    return response["ContentLength"]


def _no_expect_header(params: dict[str, Any], **_: Any) -> None:
    """Drop the ``Expect: 100-continue`` botocore puts on every streamed body: it costs
    a round trip per PUT, and after an early final answer (a 412 to a conditional PUT)
    botocore misreads the next response on that connection."""
    params["headers"].pop("Expect", None)


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


class S3Backend(Backend):
    """An unbounded, persistent, shared byte store: one S3 object per chunk."""

    capabilities: ClassVar[Capabilities] = Capabilities(
        persistent=True, shared=True, bounded=False, listing=True, create_mode=True
    )
    options: S3Options

    def __init__(
        self,
        url: str,
        options: BaseModel,
        *,
        capacity: int | None = None,
        pool: BufferPool | None = None,
        registry: PluginRegistry | None = None,
    ) -> None:
        super().__init__(url, options, capacity=capacity, pool=pool, registry=registry)
        if not isinstance(options, S3Options):
            raise ConfigError(f"{url}: options must be S3Options, got {type(options).__name__}")
        if capacity is not None:
            raise ConfigError(
                f"tier {url!r}: the s3 tier does not enforce a capacity (the bucket holds "
                "what it is given); remove 'capacity' and expire old chunks with a bucket "
                "lifecycle rule"
            )
        self.bucket, self.prefix = parse_s3_url(url)
        endpoint = options.endpoint_url or f"AWS S3 ({options.region or 'default region'})"
        self._place = Place(url, self.bucket, endpoint)
        self._native_create: bool | None = {"native": True, "emulated": False}.get(
            options.conditional_put
        )
        """Whether CREATE sends ``If-None-Match``; ``None`` until ``auto`` has probed."""
        self._client: S3Client | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._counts: Counter[str] = Counter()

    # -- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect and check that the bucket exists and the credentials are accepted."""
        super()._check_open()
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(self.options.max_concurrency, thread_name_prefix="kvtier-s3")
        try:
            client = await asyncio.get_running_loop().run_in_executor(executor, self._connect)
        except BaseException:
            executor.shutdown(wait=False, cancel_futures=True)
            raise
        self._client, self._executor = client, executor

    async def close(self) -> None:
        """Wait for requests in flight (unstarted ones are dropped), then disconnect."""
        if self._closed:
            return
        await super().close()
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.to_thread(executor.shutdown, True, cancel_futures=True)
        client, self._client = self._client, None
        if client is not None:
            client.close()

    def _check_open(self) -> None:
        super()._check_open()
        if self._executor is None:
            raise BackendUnavailableError(f"{self.url}: not open; await backend.open() first")

    def _check_keys(self, keys: Iterable[str]) -> None:
        self._check_open()
        for key in keys:
            validate_key(key)

    def _calls(self) -> Calls:
        assert self._executor is not None
        return Calls(self._executor, self.url)

    @property
    def client(self) -> S3Client:
        client = self._client
        if client is None:
            raise BackendUnavailableError(f"{self.url}: backend is closed")
        return client

    def _connect(self) -> S3Client:
        o = self.options
        config = Config(
            s3={"addressing_style": o.addressing_style, "payload_signing_enabled": False},
            retries={"mode": o.retry_mode, "total_max_attempts": o.max_attempts},
            max_pool_connections=o.max_concurrency,
            connect_timeout=o.connect_timeout,
            read_timeout=o.read_timeout,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        with translated(self._place, "creating the S3 client"):
            session = boto3.session.Session(
                aws_access_key_id=o.access_key_id,
                aws_secret_access_key=_reveal(o.secret_access_key),
                aws_session_token=_reveal(o.session_token),
                region_name=o.region,
                profile_name=o.profile,
            )
            client = session.client(
                "s3", endpoint_url=o.endpoint_url, verify=o.verify, config=config
            )
        client.meta.events.register_last("before-call.s3", _no_expect_header)
        try:
            with translated(self._place, f"access to bucket {self.bucket!r}"):
                client.head_bucket(Bucket=self.bucket)
        except NotFound:
            client.close()
            raise self._place.missing_bucket() from None
        except BaseException:
            client.close()
            raise
        return client

    async def _native_creates(self, calls: Calls) -> bool:
        """Whether CREATE can rely on ``If-None-Match``, probing the store once."""
        if self._native_create is None:
            self._native_create = await calls.run(self._probe_conditional_put)
        return self._native_create

    def _probe_conditional_put(self) -> bool:
        """Whether the store refuses a second ``If-None-Match: *`` PUT of one object
        (``.kvtier-probe-*``: never a key, deleted after)."""
        name = f"{self.prefix}.kvtier-probe-{secrets.token_hex(8)}"
        what = f"a conditional PUT (If-None-Match) of {name}"
        try:
            for _ in range(2):
                with translated(self._place, what):
                    self.client.put_object(Bucket=self.bucket, Key=name, Body=b"", IfNoneMatch="*")
        except PreconditionFailed:
            return True
        except Unsupported:
            pass
        finally:
            self._delete_quietly(name)
        log.warning(
            "s3 tier %s: %s ignores If-None-Match; PutMode.CREATE falls back to HEAD then "
            "PUT, which is not atomic between concurrent writers",
            self.url,
            self._place.endpoint,
        )
        return False

    def _delete_quietly(self, name: str) -> None:
        try:
            with translated(self._place, f"DELETE {name}"):
                self.client.delete_object(Bucket=self.bucket, Key=name)
        except Exception as exc:
            log.warning("s3 tier %s: could not delete %s: %s", self.url, name, exc)

    # -- Backend API -------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        self._check_keys(keys)
        unique = list(dict.fromkeys(keys))
        got = await gather_all([self._get(k) for k in unique], _release)
        blobs = dict(zip(unique, got, strict=True))
        out: list[Buffer | None] = []
        handed: set[str] = set()
        for key in keys:
            blob = blobs[key]
            if blob is not None and key in handed:
                blob.retain()  # a duplicate key: one more reference to the same blob
            handed.add(key)
            out.append(blob)
        return out

    async def put_many(
        self, items: Sequence[tuple[str, Buffer]], mode: PutMode = PutMode.OVERWRITE
    ) -> list[bool]:
        self._check_keys(key for key, _ in items)
        todo = list(range(len(items)))
        if mode is PutMode.CREATE:  # after the first CREATE of a key, it exists
            first = {key: i for i, (key, _) in reversed(list(enumerate(items)))}
            todo = sorted(first.values())
        stored = await gather_all([self._put(*items[i], mode) for i in todo])
        results = [False] * len(items)
        for i, ok in zip(todo, stored, strict=True):
            results[i] = ok
        return results

    async def contains_many(self, keys: Sequence[str]) -> list[bool]:
        self._check_keys(keys)
        unique = list(dict.fromkeys(keys))
        found = await gather_all(
            [self._calls().run(partial(self._exists, self.prefix + k)) for k in unique]
        )
        present = dict(zip(unique, found, strict=True))
        return [present[key] for key in keys]

    async def delete_many(self, keys: Sequence[str]) -> list[bool]:
        self._check_keys(keys)
        unique = list(dict.fromkeys(keys))
        deleted = await gather_all(
            [self._calls().run(partial(self._delete, self.prefix + k)) for k in unique]
        )
        first = dict(zip(unique, deleted, strict=True))
        return [first.pop(key, False) for key in keys]  # a repeated key is gone already

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Keys from ListObjectsV2, a page of up to ``LIST_PAGE`` at a time."""
        self._check_open()
        token: str | None = None
        while True:
            keys, token = await self._calls().run(partial(self._list_page, prefix, token))
            for key in keys:
                yield key
            if token is None:
                return

    async def stats(self) -> BackendStats:
        self._check_open()
        details: dict[str, Any] = {
            "bucket": self.bucket,
            "prefix": self.prefix,
            "endpoint": self._place.endpoint,
            "conditional_put": {None: "not probed yet", True: "native", False: "emulated"}[
                self._native_create
            ],
        }
        for name in ("multipart_uploads", "ranged_reads", "reads_retried"):
            details[name] = self._counts[name]
        return BackendStats(details=details)

    # -- reads -------------------------------------------------------------------------

    async def _get(self, key: str) -> Buffer | None:
        name = self.prefix + key
        failure: Truncated | None = None
        for attempt in range(READ_ATTEMPTS):
            if attempt:
                self._counts["reads_retried"] += 1
            calls = self._calls()
            try:
                first = await calls.run(partial(self._get_first, name), orphan=_dispose)
                if not isinstance(first, _Opened):
                    return first
                return await self._get_rest(calls, name, first)
            except (NotFound, PreconditionFailed):  # rewritten or deleted mid-read
                pass
            except Truncated as exc:
                failure = exc
        if failure is None:
            return None
        raise self._place.unreachable(f"GET {name}: {failure} ({READ_ATTEMPTS} attempts)")

    async def _get_rest(self, calls: Calls, name: str, first: _Opened) -> Buffer:
        """Read the first response's body and the remaining ranges in parallel."""
        buf = self.pool.acquire(first.total)
        view, rest = buf.view, first.total - first.nbytes
        step = -(-rest // -(-rest // self.options.part_size))  # even ranges <= part_size
        reads = [partial(read_into, first.body, view[: first.nbytes])]
        for start in range(first.nbytes, first.total, step):
            end = min(start + step, first.total)
            reads.append(partial(self._get_range, name, first, start, view[start:end]))
        try:
            await calls.run_all(reads)
        except BaseException:

            def cleanup() -> None:
                first.body.close()
                buf.release()

            calls.after(cleanup)
            raise
        self._counts["ranged_reads"] += 1
        return buf

    def _get_first(self, name: str) -> Buffer | _Opened | None:
        """GET the first ``part_size + FRAMING_SLACK`` bytes: the whole blob (read into a
        pool buffer), an :class:`_Opened` response for a larger one, or ``None``."""
        what = f"GET {name}"
        last = self.options.part_size + FRAMING_SLACK - 1
        try:
            try:
                with translated(self._place, what):
                    response = self.client.get_object(
                        Bucket=self.bucket, Key=name, Range=f"bytes=0-{last}"
                    )
            except InvalidRange:  # an empty object has no byte 0
                with translated(self._place, what):
                    response = self.client.get_object(Bucket=self.bucket, Key=name)
        except NotFound:
            return None
        nbytes, total = response["ContentLength"], _total_size(response)
        if total > MAX_OBJECT_BYTES:
            response["Body"].close()
            log.warning("s3 tier %s: %s holds %d bytes, more than any blob", self.url, name, total)
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
        end = start + view.nbytes
        with translated(self._place, f"GET {name} bytes {start}-{end - 1}"):
            response = self.client.get_object(
                Bucket=self.bucket, Key=name, Range=f"bytes={start}-{end - 1}", IfMatch=first.etag
            )
        if response["ContentLength"] != view.nbytes or _total_size(response) != first.total:
            response["Body"].close()
            raise PreconditionFailed(f"{name} changed during the read")
        read_into(response["Body"], view)

    # -- writes ------------------------------------------------------------------------

    async def _put(self, key: str, buf: Buffer, mode: PutMode) -> bool:
        name = self.prefix + key
        create = mode is PutMode.CREATE
        calls = self._calls()
        buf.retain()  # held until no thread sends from it, even if the caller is cancelled
        try:
            if create and not await self._native_creates(calls):
                if await calls.run(partial(self._exists, name)):
                    return False
                create = False
            if buf.nbytes <= self.options.multipart_threshold:
                return await calls.run(partial(self._put_object, name, buf.view, create))
            return await self._put_multipart(calls, name, buf.view, create)
        finally:
            calls.after(buf.release)

    async def _put_multipart(self, calls: Calls, name: str, view: memoryview, create: bool) -> bool:
        if create and await calls.run(partial(self._exists, name)):
            return False  # upload nothing that cannot be stored
        upload = await calls.run(
            partial(self._create_upload, name), orphan=partial(self._abort_later, name)
        )
        part = self.options.part_size
        bounds = [i * part for i in range(view.nbytes // part)] + [view.nbytes]
        uploads = [  # parts of part_size; the last one takes the remainder
            partial(self._upload_part, name, upload, number, view[start:end])
            for number, (start, end) in enumerate(itertools.pairwise(bounds), start=1)
        ]
        try:
            parts = await calls.run_all(uploads)
            stored = await calls.run(partial(self._complete, name, upload, parts, create))
        except BaseException:
            calls.after(partial(self._abort_later, name, upload))
            raise
        self._counts["multipart_uploads"] += 1
        return stored

    def _put_object(self, name: str, view: memoryview, create: bool) -> bool:
        body = cast("IO[Any]", ViewReader(view))  # botocore only reads, seeks and tells
        try:
            with translated(self._place, f"PUT {name}"):
                if create:
                    self.client.put_object(
                        Bucket=self.bucket,
                        Key=name,
                        Body=body,
                        ContentLength=view.nbytes,
                        IfNoneMatch="*",
                    )
                else:
                    self.client.put_object(
                        Bucket=self.bucket, Key=name, Body=body, ContentLength=view.nbytes
                    )
        except PreconditionFailed:
            return False
        return True

    def _create_upload(self, name: str) -> str:
        with translated(self._place, f"starting a multipart upload of {name}"):
            return self.client.create_multipart_upload(Bucket=self.bucket, Key=name)["UploadId"]

    def _upload_part(
        self, name: str, upload: str, number: int, view: memoryview
    ) -> CompletedPartTypeDef:
        with translated(self._place, f"uploading part {number} of {name}"):
            response = self.client.upload_part(
                Bucket=self.bucket,
                Key=name,
                UploadId=upload,
                PartNumber=number,
                Body=cast("IO[Any]", ViewReader(view)),
                ContentLength=view.nbytes,
            )
        return {"ETag": response["ETag"], "PartNumber": number}

    def _complete(
        self, name: str, upload: str, parts: list[CompletedPartTypeDef], create: bool
    ) -> bool:
        """Finish the upload; ``False`` (upload aborted) if ``create`` found the key."""
        try:
            with translated(self._place, f"completing the multipart upload of {name}"):
                if create:
                    self.client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=name,
                        UploadId=upload,
                        MultipartUpload={"Parts": parts},
                        IfNoneMatch="*",
                    )
                else:
                    self.client.complete_multipart_upload(
                        Bucket=self.bucket,
                        Key=name,
                        UploadId=upload,
                        MultipartUpload={"Parts": parts},
                    )
        except PreconditionFailed:
            self._abort(name, upload)
            return False
        return True

    def _abort_later(self, name: str, upload: str) -> None:
        """Abort an unfinished multipart upload on the pool (called from callbacks)."""
        executor = self._executor
        try:
            if executor is not None:
                executor.submit(self._abort, name, upload)
                return
        except RuntimeError:  # shut down meanwhile
            pass
        log.warning(
            "s3 tier %s: left the multipart upload of %s unfinished (closed); a lifecycle "
            "rule with AbortIncompleteMultipartUpload removes such uploads",
            self.url,
            name,
        )

    def _abort(self, name: str, upload: str) -> None:
        try:
            with translated(self._place, f"aborting the multipart upload of {name}"):
                self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload)
        except NotFound:
            pass  # completed or aborted already
        except Exception as exc:
            log.warning("s3 tier %s: %s", self.url, exc)

    # -- keys --------------------------------------------------------------------------

    def _exists(self, name: str) -> bool:
        try:
            with translated(self._place, f"HEAD {name}"):
                self.client.head_object(Bucket=self.bucket, Key=name)
        except NotFound:
            return False
        return True

    def _delete(self, name: str) -> bool:
        """Delete ``name``; ``False`` if it was absent (S3's DELETE does not tell)."""
        if not self._exists(name):
            return False
        with translated(self._place, f"DELETE {name}"):
            self.client.delete_object(Bucket=self.bucket, Key=name)
        return True

    def _list_page(self, prefix: str, token: str | None) -> tuple[list[str], str | None]:
        """One ListObjectsV2 page of keys under ``prefix`` and the next page's token."""
        request: ListObjectsV2RequestTypeDef = {
            "Bucket": self.bucket,
            "Prefix": self.prefix + prefix,
            "Delimiter": "/",  # chunks are never deeper than the prefix
            "MaxKeys": LIST_PAGE,
        }
        if token is not None:
            request["ContinuationToken"] = token
        with translated(self._place, f"LIST {self.prefix}{prefix}*"):
            page = self.client.list_objects_v2(**request)
        start = len(self.prefix)
        keys = [
            o["Key"][start:] for o in page.get("Contents", []) if is_valid_key(o["Key"][start:])
        ]
        return keys, page.get("NextContinuationToken") if page.get("IsTruncated") else None
