"""TTL of the ``s3`` tier (``options: {ttl: SECONDS}``).

An object older than ``ttl`` (by its ``LastModified``, the store's clock against this
host's: keep clocks in sync; whole seconds, so up to one second late) is a miss for
``get_many`` and ``contains_many`` and is deleted when met, unless it changed since
(``If-Match`` on its ETag). A sweep lists one page of the prefix every ``ttl / 4``
seconds (at most a minute), resuming where the last one stopped, and deletes the
expired objects on it the same way. (A bucket lifecycle rule, whole days only, can
still expire what no process meets.)
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from kvtier.backends.s3.bucket import LIST_PAGE, Bucket
from kvtier.backends.s3.errors import NotFound, translated
from kvtier.core.keys import is_valid_key

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import ListObjectsV2RequestTypeDef

TIMESTAMP_RESOLUTION = 1.0
"""Seconds: S3's ``LastModified`` (an HTTP date) has whole seconds only."""


def head(bucket: Bucket, name: str) -> tuple[datetime, str] | None:
    """``LastModified`` and ``ETag`` of object ``name`` (one HEAD); ``None`` if absent."""
    try:
        with translated(bucket.place, f"HEAD {name}"):
            found = bucket.client.head_object(Bucket=bucket.name, Key=name)
    except NotFound:
        return None
    return found["LastModified"], found["ETag"]


def age(bucket: Bucket, name: str) -> float | None:
    """Seconds since object ``name`` was written; ``None`` if it is absent."""
    found = head(bucket, name)
    return None if found is None else (datetime.now(timezone.utc) - found[0]).total_seconds()


class Expiry:
    """Which objects are expired, and their removal (blocking: worker threads only)."""

    def __init__(self, ttl: float, bucket: Bucket) -> None:
        self.ttl = ttl
        self.bucket = bucket
        self._token: str | None = None

    @property
    def period(self) -> float:
        """Seconds between two sweeps."""
        return min(max(self.ttl / 4, 0.05), 60.0)

    def is_expired(self, last_modified: datetime) -> bool:
        """Whether an object last modified then is past ``ttl``. ``LastModified`` is
        truncated to whole seconds, so an object may be up to one second younger than
        it looks: it expires :data:`TIMESTAMP_RESOLUTION` late, never early (a chunk
        written again just after its old copy expired must read back)."""
        age = (datetime.now(timezone.utc) - last_modified).total_seconds()
        return age >= self.ttl + TIMESTAMP_RESOLUTION

    def fresh(self, name: str) -> tuple[bool, bool]:
        """``(present and not expired, an expired object was deleted)`` for object
        ``name`` (one HEAD, and a conditional DELETE when it is expired)."""
        found = head(self.bucket, name)
        if found is None:
            return False, False
        if not self.is_expired(found[0]):
            return True, False
        return False, self.bucket.delete_if_unchanged(name, found[1])

    def sweep(self) -> int:
        """Delete the expired objects of the next listing page; how many went."""
        bucket = self.bucket
        request: ListObjectsV2RequestTypeDef = {
            "Bucket": bucket.name,
            "Prefix": bucket.prefix,
            "Delimiter": "/",
            "MaxKeys": LIST_PAGE,
        }
        if self._token is not None:
            request["ContinuationToken"] = self._token
        with translated(bucket.place, f"LIST {bucket.prefix}*"):
            page = bucket.client.list_objects_v2(**request)
        self._token = page.get("NextContinuationToken") if page.get("IsTruncated") else None
        removed = 0
        for entry in page.get("Contents", []):
            name = entry["Key"]
            if is_valid_key(name[len(bucket.prefix) :]) and self.is_expired(entry["LastModified"]):
                removed += bucket.delete_if_unchanged(name, entry["ETag"])
        return removed
