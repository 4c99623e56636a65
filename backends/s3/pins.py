"""Pins and ages of the ``s3`` tier (a mixin of its backend).

S3 never evicts, so a pin only exempts a chunk from what kvtier itself removes by
age: the tier's ``ttl`` (read, ``contains`` and sweep) and ``kvtier purge
--older-than``. A pin is an empty marker object, ``<prefix>pins/<key>``, so every
process sees it (listings of chunks never show it: it sits one folder down). A
bucket lifecycle rule does not know the markers and still expires pinned chunks.
``pinned_bytes`` bounds the bytes *this* process pins (one HEAD per chunk gives its
size). Deleting a chunk drops its marker (one listing of the markers per batch).
Unpinned chunks age from when they were written (``LastModified``): one older than
the ``ttl`` expires at once.

Checks cost requests only where a pin could matter: an expired object's marker is
asked (one HEAD) before it is treated as expired; a sweep that found expired objects
lists the markers once.
"""

from __future__ import annotations

from datetime import datetime, timezone
from functools import partial
from typing import TYPE_CHECKING

from kvtier.backends.s3 import S3Options
from kvtier.backends.s3.bucket import LIST_PAGE, Bucket
from kvtier.backends.s3.errors import translated
from kvtier.core.blocking import BlockingPool

if TYPE_CHECKING:
    from mypy_boto3_s3.type_defs import ListObjectsV2RequestTypeDef

    from kvtier.core.backend import Backend

    _Base = Backend
else:
    _Base = object

TIMESTAMP_RESOLUTION = 1.0
"""Seconds: S3's ``LastModified`` (an HTTP date) has whole seconds only."""
PINS = "pins/"
"""Folder of the pin markers, under the tier's prefix."""


def marker(bucket: Bucket, name: str) -> str:
    """The marker object of chunk object ``name``."""
    return bucket.prefix + PINS + name[len(bucket.prefix) :]


def is_pinned(bucket: Bucket, name: str) -> bool:
    """Whether chunk object ``name`` is pinned (one HEAD)."""
    return bucket.exists(marker(bucket, name))


def pinned_keys(bucket: Bucket) -> set[str]:
    """The keys of every pinned chunk (one listing page per 1000 pins)."""
    folder = bucket.prefix + PINS
    request: ListObjectsV2RequestTypeDef = {
        "Bucket": bucket.name,
        "Prefix": folder,
        "MaxKeys": LIST_PAGE,
    }
    keys: set[str] = set()
    while True:
        with translated(bucket.place, f"LIST {folder}*"):
            page = bucket.client.list_objects_v2(**request)
        keys.update(entry["Key"][len(folder) :] for entry in page.get("Contents", []))
        if not page.get("IsTruncated"):
            return keys
        request["ContinuationToken"] = page["NextContinuationToken"]


def _pin(bucket: Bucket, name: str) -> None:
    with translated(bucket.place, f"PUT {marker(bucket, name)}"):
        bucket.client.put_object(Bucket=bucket.name, Key=marker(bucket, name), Body=b"")


def _unpin(bucket: Bucket, name: str) -> bool:
    return bucket.delete(marker(bucket, name))


def drop_pins(bucket: Bucket, names: list[str]) -> None:
    """Delete the markers of those chunk objects ``names`` that have one."""
    pinned = pinned_keys(bucket)
    for name in names:
        if name[len(bucket.prefix) :] in pinned:
            _unpin(bucket, name)


class S3Pins(_Base):
    """``pin_many``, ``unpin_many`` and ``ages`` of
    :class:`~kvtier.backends.s3.backend.S3Backend` (see the module doc)."""

    options: S3Options
    prefix: str
    _pinned: dict[str, int]
    """Chunks this process pinned -> their sizes (within ``pinned_bytes``)."""

    if TYPE_CHECKING:

        def _pins_io(self) -> tuple[Bucket, BlockingPool]: ...

    async def pin_many(self, keys: list[str]) -> list[bool]:
        """Put the markers of stored chunks while this process's pinned bytes stay
        within ``pinned_bytes``; ``True`` where a chunk is pinned now."""
        bucket, workers = self._pins_io()
        names = [self.prefix + key for key in keys]
        found = await workers.run_all([partial(bucket.head, name) for name in names])
        room = self.options.pinned_bytes - sum(self._pinned.values())
        chosen: list[tuple[str, int]] = []
        for key, stored in zip(keys, found, strict=True):
            if stored is None:
                self._pinned.pop(key, None)
            elif key in self._pinned:
                chosen.append((key, stored[2]))  # again: another process may have unpinned it
            elif stored[2] <= room:
                chosen.append((key, stored[2]))
                room -= stored[2]
        await workers.run_all([partial(_pin, bucket, self.prefix + key) for key, _ in chosen])
        self._pinned.update(chosen)
        return [key in self._pinned for key in keys]

    async def unpin_many(self, keys: list[str]) -> list[bool]:
        """Delete the markers of ``keys``; ``True`` where one was there (any process's)."""
        bucket, workers = self._pins_io()
        done = await workers.run_all([partial(_unpin, bucket, self.prefix + k) for k in keys])
        for key in keys:
            self._pinned.pop(key, None)
        return done

    async def ages(self, keys: list[str]) -> list[float | None]:
        """Seconds since each chunk was written (``LastModified``, one HEAD each; up to a
        second less), ``None`` where absent or pinned (for ``kvtier purge --older-than``)."""
        bucket, workers = self._pins_io()
        found = await workers.run_all([partial(bucket.head, self.prefix + k) for k in keys])
        pinned = await workers.run(partial(pinned_keys, bucket))
        now = datetime.now(timezone.utc)
        return [
            None if stored is None or key in pinned else _age(now, stored[0])
            for key, stored in zip(keys, found, strict=True)
        ]


def _age(now: datetime, last_modified: datetime) -> float:
    """Seconds since an object was written, never more: ``LastModified`` has whole
    seconds, so it is up to :data:`TIMESTAMP_RESOLUTION` older than it looks (a purge by
    age never deletes a chunk younger than asked)."""
    return max(0.0, (now - last_modified).total_seconds() - TIMESTAMP_RESOLUTION)
