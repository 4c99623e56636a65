"""TTL of the ``s3`` tier (``options: {ttl: SECONDS}``).

An object older than ``ttl`` (by its ``LastModified``, the store's clock against this
host's: keep clocks in sync; whole seconds, so up to one second late) is a miss for
``get_many`` and ``contains_many`` and is deleted when met, unless it changed since
(``If-Match`` on its ETag). A sweep lists one page of the prefix every ``ttl / 4``
seconds (at most a minute), resuming where the last one stopped, and deletes the
expired objects on it the same way. Pinned chunks never expire
(:mod:`~kvtier.backends.s3.pins`). (A bucket lifecycle rule, whole days only, can
still expire what no process meets.)
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import TYPE_CHECKING

from kvtier.backends.s3.bucket import LIST_PAGE, Bucket
from kvtier.backends.s3.errors import translated
from kvtier.backends.s3.pins import TIMESTAMP_RESOLUTION, is_pinned, pinned_keys
from kvtier.core.keys import is_valid_key

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import ListObjectsV2RequestTypeDef


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

    def expired_object(self, name: str, last_modified: datetime) -> bool:
        """Whether object ``name``, last modified then, is past ``ttl`` and not pinned
        (its marker is asked only when it is past ``ttl``: one HEAD)."""
        return self.is_expired(last_modified) and not is_pinned(self.bucket, name)

    def fresh(self, name: str) -> tuple[bool, bool]:
        """``(present and not expired, an expired object was deleted)`` for object
        ``name`` (one HEAD, and a conditional DELETE when it is expired)."""
        found = self.bucket.head(name)
        if found is None:
            return False, False
        if not self.expired_object(name, found[0]):
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
        expired = [
            entry
            for entry in page.get("Contents", [])
            if is_valid_key(entry["Key"][len(bucket.prefix) :])
            and self.is_expired(entry["LastModified"])
        ]
        pinned = pinned_keys(bucket) if expired else set()
        removed = 0
        for entry in expired:
            if entry["Key"][len(bucket.prefix) :] not in pinned:
                removed += bucket.delete_if_unchanged(entry["Key"], entry["ETag"])
        return removed
