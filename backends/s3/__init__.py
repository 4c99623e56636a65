"""The ``s3`` tier: one object per chunk in any S3-compatible store (AWS, MinIO, Ceph,
SeaweedFS). URL: ``s3://bucket`` or ``s3://bucket/key/prefix``.

This module registers the tier and validates its options without importing boto3; the
implementation (:mod:`kvtier.backends.s3.backend`) needs ``pip install 'kvtier[s3]'``.
Example tier::

    - url: s3://kv-cache/llama3
      write_policy: back
      options:
        endpoint_url: http://minio:9000     # omit for AWS
        region: eu-west-1
        access_key_id: AKIA...              # omit both to use the default AWS chain
        secret_access_key: ...              # (env, ~/.aws, instance or pod role)
        addressing_style: path
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvtier.core.config import ByteSize, Secret
from kvtier.core.errors import ConfigError
from kvtier.core.hookspecs import hookimpl
from kvtier.core.specs import BackendSpec

MiB = 1 << 20
MIN_PART_SIZE = 5 * MiB
"""S3's smallest multipart part (all but the last)."""
MAX_PART_SIZE = 1 << 30
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
"""A region name as botocore accepts it (a DNS label)."""


class S3Options(BaseModel):
    """Options of the ``s3`` tier. Secrets are :class:`~pydantic.SecretStr`: reprs and
    logs never show them."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    endpoint_url: str | None = None
    """``http(s)://host:port`` of a non-AWS store (MinIO, Ceph, SeaweedFS); ``None``: AWS."""
    region: str | None = None
    """Region to sign requests for; ``None``: the AWS default chain's (else us-east-1)."""
    access_key_id: str | None = None
    secret_access_key: Secret | None = None
    session_token: Secret | None = None
    """Temporary credentials' token (with the two keys above)."""
    profile: str | None = None
    """A profile of ``~/.aws/config``; exclusive with the keys above. Neither given: the
    default chain (environment, config files, instance or pod role)."""
    addressing_style: Literal["auto", "path", "virtual"] = "auto"
    """``path``: ``endpoint/bucket/key`` (most self-hosted stores); ``virtual``:
    ``bucket.endpoint/key``; ``auto``: boto3 decides."""
    verify: bool | str = True
    """TLS verification: ``false``, or a CA bundle path for a private CA."""
    max_concurrency: int = Field(default=16, ge=1, le=512)
    """Requests in flight at once (threads and pooled connections)."""
    multipart_threshold: ByteSize = 16 * MiB
    """Blobs larger than this are uploaded in parallel multipart parts."""
    part_size: ByteSize = Field(default=8 * MiB, ge=MIN_PART_SIZE, le=MAX_PART_SIZE)
    """Size of multipart parts (the last takes the remainder) and of the parallel ranged
    GETs that read a larger blob."""
    retry_mode: Literal["standard", "adaptive", "legacy"] = "standard"
    """botocore retry mode for throttling, 5xx and connection errors (``adaptive``
    also rate-limits the client when the store throttles)."""
    max_attempts: int = Field(default=3, ge=1, le=20)
    """Attempts per request, the first included."""
    connect_timeout: float = Field(default=3.0, gt=0, allow_inf_nan=False)
    read_timeout: float = Field(default=15.0, gt=0, allow_inf_nan=False)
    """Seconds a request may wait for the next bytes from the store."""
    pinned_bytes: ByteSize = 0
    """Bytes of chunks this process may pin: exempt from the ``ttl`` and from ``kvtier
    purge --older-than`` (S3 never evicts; :mod:`~kvtier.backends.s3.pins`)."""
    ttl: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds a chunk lives after it was written; older ones are misses and are
    deleted when met and by a sweep (:mod:`kvtier.backends.s3.expiry`)."""
    conditional_put: Literal["auto", "native", "emulated"] = "auto"
    """How ``PutMode.CREATE`` works: ``native`` sends ``If-None-Match: *`` (atomic;
    AWS since 2024, MinIO, Ceph, SeaweedFS); ``emulated`` checks with HEAD first (not
    atomic between concurrent writers); ``auto`` probes the store at the first CREATE."""

    @field_validator("endpoint_url")
    @classmethod
    def _check_endpoint(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None:
            raise ValueError(
                "endpoint_url must not hold credentials; set access_key_id and "
                "secret_access_key instead"
            )
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"endpoint_url must look like http://host:port or https://host, got {value!r}"
            )
        parts.port  # noqa: B018  ValueError for a port out of range
        return value

    @field_validator("region")
    @classmethod
    def _check_region(cls, value: str | None) -> str | None:
        if value is not None and not _REGION.fullmatch(value):
            raise ValueError(
                f"region must be a region name like us-east-1 (letters, digits and '-'), "
                f"got {value!r}"
            )
        return value

    @field_validator("verify")
    @classmethod
    def _check_ca_bundle(cls, value: bool | str) -> bool | str:
        if isinstance(value, str) and not Path(value).is_file():
            raise ValueError(
                f"verify names a CA bundle {value!r} that is not a file; give the path of "
                "a PEM file, true (the system's CAs) or false"
            )
        return value

    @model_validator(mode="after")
    def _check_credentials(self) -> S3Options:
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError(
                "give both access_key_id and secret_access_key, or neither to use the "
                "default AWS credential chain"
            )
        if self.session_token is not None and self.access_key_id is None:
            raise ValueError("session_token needs access_key_id and secret_access_key")
        if self.profile is not None and self.access_key_id is not None:
            raise ValueError("give either a profile or access keys, not both")
        if self.multipart_threshold < self.part_size:
            raise ValueError(
                f"multipart_threshold ({self.multipart_threshold}) must be at least "
                f"part_size ({self.part_size})"
            )
        return self


def parse_s3_url(url: str) -> tuple[str, str]:
    """``(bucket, key prefix)`` of ``s3://bucket/a/b`` (prefix ``"a/b/"``, or ``""``);
    :class:`ConfigError` for anything else."""
    hint = "write it as s3://bucket or s3://bucket/key/prefix"
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise ConfigError(f"{url!r} is not an s3 URL; {hint}")
    if parts.query or parts.fragment:
        raise ConfigError(f"{url!r} has a query or fragment; put settings in 'options': {hint}")
    if "@" in parts.netloc or ":" in parts.netloc:
        raise ConfigError(
            f"{url!r}: put credentials and the endpoint in the tier's options "
            f"(access_key_id, secret_access_key, endpoint_url), not in the URL; {hint}"
        )
    bucket = parts.netloc
    if not _BUCKET_RE.match(bucket) or ".." in bucket:
        raise ConfigError(
            f"{url!r}: {bucket!r} is not a valid bucket name (3-63 lowercase letters, "
            f"digits, '.' and '-', starting and ending with a letter or digit); {hint}"
        )
    segments = [unquote(s) for s in parts.path.strip("/").split("/")] if parts.path else []
    if parts.path not in ("", "/") and any(s in ("", ".", "..") for s in segments):
        raise ConfigError(f"{url!r}: the key prefix has an empty, '.' or '..' part; {hint}")
    return bucket, "".join(f"{s}/" for s in segments if s)


@hookimpl
def kvtier_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="s3",
            schemes=("s3",),
            cls="kvtier.backends.s3.backend:S3Backend",
            options=S3Options,
            check_url=parse_s3_url,
            extra="s3",
            description="one object per chunk in an S3-compatible store (AWS, MinIO, Ceph, ...)",
        )
    ]
