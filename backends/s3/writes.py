"""Writes of the s3 tier: single PUTs, multipart uploads and their aborts, and
``PutMode.CREATE`` as a conditional write.

A blob up to ``multipart_threshold`` is one PUT, a larger one a multipart upload of
``part_size`` parts sent in parallel (aborted if it fails or is cancelled). S3 makes
an object visible only once whole, so a cancelled or failed write leaves the key
absent or complete. Request bodies are zero-copy views of the pool buffer.

``PutMode.CREATE`` is one conditional request where the store honours
``If-None-Match: *`` (``conditional_put``: ``native``, or ``auto`` once a probe found
it): the PUT, or the multipart upload's completion, which the store refuses if the
key exists. It costs no HEAD; a multipart CREATE of a key that exists uploads its
parts before the completion is refused (and the upload aborted). A conditional PUT
is atomic between concurrent writers (AWS, MinIO, SeaweedFS); a conditional
completion is as atomic as the store makes it: AWS and MinIO check under a lock,
SeaweedFS 4.48 lets several racing completions of one key succeed (the last one's
value stays, whole). Where the store ignores the header (``emulated``), CREATE is a
HEAD and then a plain write: two requests, not atomic between concurrent writers.
"""

from __future__ import annotations

import itertools
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import IO, TYPE_CHECKING, Any, cast

from kvtier.backends.s3 import S3Options
from kvtier.backends.s3.bucket import Bucket
from kvtier.backends.s3.calls import Operation
from kvtier.backends.s3.errors import NotFound, PreconditionFailed, Unsupported, translated
from kvtier.backends.s3.streams import ViewReader
from kvtier.core.backend import PutMode
from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import Buffer
from kvtier.core.errors import BackendUnavailableError

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        CompleteMultipartUploadRequestTypeDef,
        PutObjectRequestTypeDef,
    )

log = logging.getLogger(__name__)


def native_create(options: S3Options) -> bool | None:
    """Whether ``options`` make CREATE send ``If-None-Match``; ``None``: probe first."""
    return {"native": True, "emulated": False}.get(options.conditional_put)


class Writer:
    """Writes objects of ``bucket`` from pool buffers, with the requests in
    ``workers``; counts ``multipart_uploads`` in ``counts``."""

    def __init__(
        self, bucket: Bucket, workers: BlockingPool, options: S3Options, counts: Counter[str]
    ) -> None:
        self.bucket = bucket
        self.workers = workers
        self.part_size = options.part_size
        self.multipart_threshold = options.multipart_threshold
        self.counts = counts
        self.native_create = native_create(options)
        """Whether CREATE sends ``If-None-Match``; ``None`` until ``auto`` has probed."""

    async def put(self, name: str, buf: Buffer, mode: PutMode) -> bool:
        """Store ``buf`` as object ``name``; ``False`` where ``CREATE`` found it."""
        create = mode is PutMode.CREATE
        if create and not await self._native_creates():
            if await self.workers.run(partial(self.bucket.exists, name)):
                return False
            create = False
        operation = Operation(self.workers)
        buf.retain()  # held until no thread sends from it, even if the caller is cancelled
        try:
            if buf.nbytes <= self.multipart_threshold:
                return await operation.run(partial(self._put_object, name, buf.view, create))
            return await self._put_multipart(operation, name, buf.view, create)
        finally:
            operation.after(buf.release)

    async def _native_creates(self) -> bool:
        """Whether CREATE can rely on ``If-None-Match``, probing the store once."""
        if self.native_create is None:
            self.native_create = await self.workers.run(self._probe_conditional_put)
        return self.native_create

    def _probe_conditional_put(self) -> bool:
        """Whether the store refuses a second ``If-None-Match: *`` PUT of one object
        (``.kvtier-probe-*``: never a key, deleted after)."""
        bucket = self.bucket
        name = f"{bucket.prefix}.kvtier-probe-{secrets.token_hex(8)}"
        what = f"a conditional PUT (If-None-Match) of {name}"
        try:
            for _ in range(2):
                with translated(bucket.place, what):
                    bucket.client.put_object(
                        Bucket=bucket.name, Key=name, Body=b"", IfNoneMatch="*"
                    )
        except PreconditionFailed:
            return True
        except Unsupported:
            pass
        finally:
            bucket.delete_quietly(name)
        log.warning(
            "s3 tier %s: %s ignores If-None-Match; PutMode.CREATE falls back to HEAD then "
            "PUT, which is not atomic between concurrent writers",
            bucket.place.url,
            bucket.place.endpoint,
        )
        return False

    async def _put_multipart(
        self, operation: Operation, name: str, view: memoryview, create: bool
    ) -> bool:
        upload = await self.workers.run(
            partial(self._create_upload, name), orphan=partial(self._abort_later, name)
        )
        part = self.part_size
        bounds = [i * part for i in range(view.nbytes // part)] + [view.nbytes]
        uploads = [  # parts of part_size; the last one takes the remainder
            partial(self._upload_part, name, upload, number, view[start:end])
            for number, (start, end) in enumerate(itertools.pairwise(bounds), start=1)
        ]
        try:
            parts = await operation.run_all(uploads)
            stored = await operation.run(partial(self._complete, name, upload, parts, create))
        except BaseException:
            operation.after(partial(self._abort_later, name, upload))
            raise
        self.counts["multipart_uploads"] += 1
        return stored

    def _put_object(self, name: str, view: memoryview, create: bool) -> bool:
        bucket = self.bucket
        request: PutObjectRequestTypeDef = {
            "Bucket": bucket.name,
            "Key": name,
            "Body": cast("IO[Any]", ViewReader(view)),  # botocore only reads, seeks and tells
            "ContentLength": view.nbytes,
        }
        if create:
            request["IfNoneMatch"] = "*"
        return self._unless_refused(f"PUT {name}", partial(bucket.client.put_object, **request))

    def _create_upload(self, name: str) -> str:
        bucket = self.bucket
        with translated(bucket.place, f"starting a multipart upload of {name}"):
            return bucket.client.create_multipart_upload(Bucket=bucket.name, Key=name)["UploadId"]

    def _upload_part(
        self, name: str, upload: str, number: int, view: memoryview
    ) -> CompletedPartTypeDef:
        bucket = self.bucket
        with translated(bucket.place, f"uploading part {number} of {name}"):
            response = bucket.client.upload_part(
                Bucket=bucket.name,
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
        bucket = self.bucket
        request: CompleteMultipartUploadRequestTypeDef = {
            "Bucket": bucket.name,
            "Key": name,
            "UploadId": upload,
            "MultipartUpload": {"Parts": parts},
        }
        if create:
            request["IfNoneMatch"] = "*"
        what = f"completing the multipart upload of {name}"
        if self._unless_refused(what, partial(bucket.client.complete_multipart_upload, **request)):
            return True
        self._abort(name, upload)
        return False

    def _unless_refused(self, what: str, send: Callable[[], object]) -> bool:
        """Send a request; ``False`` where the store refused its ``If-None-Match``."""
        try:
            with translated(self.bucket.place, what):
                send()
        except PreconditionFailed:
            return False
        return True

    def _abort_later(self, name: str, upload: str) -> None:
        """Abort an unfinished multipart upload in the workers (from callbacks)."""
        try:
            self.workers.submit(partial(self._abort, name, upload))
        except BackendUnavailableError:  # closed meanwhile
            log.warning(
                "s3 tier %s: left the multipart upload of %s unfinished (closed); a lifecycle "
                "rule with AbortIncompleteMultipartUpload removes such uploads",
                self.bucket.place.url,
                name,
            )

    def _abort(self, name: str, upload: str) -> None:
        bucket = self.bucket
        try:
            with translated(bucket.place, f"aborting the multipart upload of {name}"):
                bucket.client.abort_multipart_upload(Bucket=bucket.name, Key=name, UploadId=upload)
        except NotFound:
            pass  # completed or aborted already
        except Exception as exc:
            log.warning("s3 tier %s: %s", bucket.place.url, exc)
