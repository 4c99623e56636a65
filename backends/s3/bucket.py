"""The S3 client of one tier, bound to its bucket: connecting, and the blocking
requests on whole objects (HEAD, DELETE, ListObjectsV2). Every method blocks: call
them in the tier's worker threads."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

import boto3
from botocore.config import Config
from pydantic import SecretStr

from kvtier.backends.s3 import S3Options
from kvtier.backends.s3.errors import NotFound, Place, PreconditionFailed, translated
from kvtier.core.keys import is_valid_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ListObjectsV2RequestTypeDef

log = logging.getLogger(__name__)

LIST_PAGE = 1000
"""Keys per ListObjectsV2 request (S3's maximum)."""


def _no_expect_header(params: dict[str, Any], **_: Any) -> None:
    """Drop the ``Expect: 100-continue`` botocore puts on every streamed body: it costs
    a round trip per PUT, and after an early final answer (a 412 to a conditional PUT)
    botocore misreads the next response on that connection."""
    params["headers"].pop("Expect", None)


def _reveal(secret: SecretStr | None) -> str | None:
    return None if secret is None else secret.get_secret_value()


@dataclass(frozen=True)
class Bucket:
    """A connected client and the bucket (and key prefix) it serves; ``place`` names
    them in errors."""

    client: S3Client
    name: str
    prefix: str
    place: Place

    @classmethod
    def connect(cls, options: S3Options, name: str, prefix: str, place: Place) -> Bucket:
        """A client with ``options``' transport settings (``max_concurrency`` pooled
        connections), once the bucket answers a HEAD with these credentials."""
        o = options
        config = Config(
            s3={"addressing_style": o.addressing_style, "payload_signing_enabled": False},
            retries={"mode": o.retry_mode, "total_max_attempts": o.max_attempts},
            max_pool_connections=o.max_concurrency,
            connect_timeout=o.connect_timeout,
            read_timeout=o.read_timeout,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        with translated(place, "creating the S3 client"):
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
            with translated(place, f"access to bucket {name!r}"):
                client.head_bucket(Bucket=name)
        except NotFound:
            client.close()
            raise place.missing_bucket() from None
        except BaseException:
            client.close()
            raise
        return cls(client, name, prefix, place)

    def exists(self, key: str) -> bool:
        """Whether object ``key`` exists (one HEAD)."""
        try:
            with translated(self.place, f"HEAD {key}"):
                self.client.head_object(Bucket=self.name, Key=key)
        except NotFound:
            return False
        return True

    def head(self, key: str) -> tuple[datetime, str, int] | None:
        """``LastModified``, ``ETag`` and size of object ``key`` (one HEAD); ``None`` if
        it is absent."""
        try:
            with translated(self.place, f"HEAD {key}"):
                found = self.client.head_object(Bucket=self.name, Key=key)
        except NotFound:
            return None
        return found["LastModified"], found["ETag"], found["ContentLength"]

    def delete(self, key: str) -> bool:
        """Delete object ``key``; ``False`` if it was absent (S3's DELETE does not tell,
        so a HEAD asks first)."""
        if not self.exists(key):
            return False
        with translated(self.place, f"DELETE {key}"):
            self.client.delete_object(Bucket=self.name, Key=key)
        return True

    def delete_if_unchanged(self, key: str, etag: str) -> bool:
        """Delete object ``key`` if its ETag is still ``etag`` (``If-Match``); ``False``
        if it changed or went since."""
        try:
            with translated(self.place, f"DELETE {key} (If-Match)"):
                self.client.delete_object(Bucket=self.name, Key=key, IfMatch=etag)
        except (NotFound, PreconditionFailed):
            return False
        return True

    def delete_quietly(self, key: str) -> None:
        """Delete object ``key``, logging (not raising) a failure."""
        try:
            with translated(self.place, f"DELETE {key}"):
                self.client.delete_object(Bucket=self.name, Key=key)
        except Exception as exc:
            log.warning("s3 tier %s: could not delete %s: %s", self.place.url, key, exc)

    def list_page(self, prefix: str, token: str | None) -> tuple[list[str], str | None]:
        """One ListObjectsV2 page of the chunk keys under ``self.prefix + prefix`` (the
        tier prefix cut off; other objects skipped), and the next page's token."""
        request: ListObjectsV2RequestTypeDef = {
            "Bucket": self.name,
            "Prefix": self.prefix + prefix,
            "Delimiter": "/",  # chunks are never deeper than the prefix
            "MaxKeys": LIST_PAGE,
        }
        if token is not None:
            request["ContinuationToken"] = token
        with translated(self.place, f"LIST {self.prefix}{prefix}*"):
            page = self.client.list_objects_v2(**request)
        start = len(self.prefix)
        keys = [o["Key"][start:] for o in page.get("Contents", [])]
        return [k for k in keys if is_valid_key(k)], (
            page.get("NextContinuationToken") if page.get("IsTruncated") else None
        )

    def close(self) -> None:
        """Close the client's pooled connections."""
        self.client.close()
