"""botocore exceptions translated into kvtier errors whose messages name the bucket,
the endpoint and the fix, plus the expected outcomes callers act on (missing key,
failed precondition, unsatisfiable range, body cut short)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import ConnectionError as TransportError

from kvtier.core.errors import BackendError, BackendUnavailableError

_AUTH_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidClientTokenId",
    }
)
_REGION_CODES = frozenset(
    {"301", "PermanentRedirect", "AuthorizationHeaderMalformed", "IllegalLocationConstraint"}
)
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})
_BUSY_CODES = frozenset(
    {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable"}
)


class NotFound(Exception):
    """The key (or multipart upload) does not exist."""


class PreconditionFailed(Exception):
    """An ``If-None-Match`` / ``If-Match`` condition failed (412), or a concurrent
    conditional write of the same key won (409)."""


class InvalidRange(Exception):
    """A ranged GET asked for bytes the object does not have (416: it is empty)."""


class Unsupported(BackendError):
    """The store does not implement a request or header (501 NotImplemented)."""


class Truncated(Exception):
    """A response body ended early or the connection failed in the middle of it."""


@dataclass(frozen=True)
class Place:
    """What error messages name: the tier URL (without credentials), its bucket and
    endpoint."""

    url: str
    bucket: str
    endpoint: str

    def unreachable(self, detail: str) -> BackendUnavailableError:
        return BackendUnavailableError(
            f"s3 tier {self.url}: cannot reach {self.endpoint}: {detail}"
        )

    def missing_bucket(self) -> BackendError:
        return BackendError(
            f"s3 tier {self.url}: bucket {self.bucket!r} does not exist at {self.endpoint}; "
            f"create it (aws s3 mb s3://{self.bucket}, with --endpoint-url for a non-AWS "
            "store) or fix the bucket in the tier URL"
        )


def _client_error(exc: ClientError, place: Place, what: str) -> Exception:
    error = exc.response.get("Error", {})
    meta = exc.response.get("ResponseMetadata", {})
    code = str(error.get("Code") or meta.get("HTTPStatusCode", "unknown"))
    status = int(meta.get("HTTPStatusCode") or 0)
    tier = f"s3 tier {place.url}"
    if code == "NoSuchBucket":
        return place.missing_bucket()
    if code in _NOT_FOUND_CODES:
        return NotFound(what)
    if code in ("412", "PreconditionFailed") or code == "ConditionalRequestConflict":
        return PreconditionFailed(what)
    if code in ("416", "InvalidRange"):
        return InvalidRange(what)
    if code in ("501", "NotImplemented"):
        return Unsupported(f"{tier}: {place.endpoint} does not support {what} ({code})")
    if code in _AUTH_CODES:
        return BackendError(
            f"{tier}: {place.endpoint} denied {what} ({code}): check the tier's credentials "
            "(options access_key_id / secret_access_key / session_token or profile, else the "
            "default AWS chain: AWS_ACCESS_KEY_ID, ~/.aws, instance or pod role) and that "
            f"they may read, write and list bucket {place.bucket!r}"
        )
    if code in _REGION_CODES:
        region = meta.get("HTTPHeaders", {}).get("x-amz-bucket-region")
        where = f"region {region!r}" if region else "another region"
        return BackendError(
            f"{tier}: bucket {place.bucket!r} is in {where} ({code}); set the tier's "
            "'region' option to it"
        )
    if status >= 500 or code in _BUSY_CODES:
        return place.unreachable(f"{what} still failing after retries ({code})")
    message = error.get("Message", "")
    return BackendError(f"{tier}: {what} failed at {place.endpoint}: {code} {message}".rstrip())


def translate(exc: Exception, place: Place, what: str) -> Exception:
    """The kvtier error (or expected outcome) for a botocore exception."""
    if isinstance(exc, ClientError):
        return _client_error(exc, place, what)
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return BackendError(
            f"s3 tier {place.url}: no usable AWS credentials ({exc}); set access_key_id and "
            "secret_access_key in the tier's options, or configure the default chain "
            "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws/credentials, instance role)"
        )
    if isinstance(exc, (TransportError, HTTPClientError)):
        return place.unreachable(f"{what}: {exc}")
    return BackendError(f"s3 tier {place.url}: {what} failed: {type(exc).__name__}: {exc}")


@contextmanager
def translated(place: Place, what: str) -> Iterator[None]:
    """Re-raise botocore exceptions raised inside as :func:`translate` says."""
    try:
        yield
    except (BotoCoreError, ClientError) as exc:
        raise translate(exc, place, what) from exc
