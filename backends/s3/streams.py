"""Moving blobs between pool buffers and HTTP bodies without intermediate copies."""

from __future__ import annotations

import http.client
from typing import Any

from kvtier.backends.s3.errors import Truncated


class ViewReader:
    """A read-only, seekable file over a memoryview, handed to botocore as a request
    body. Reads return zero-copy slices, so the buffer goes to the socket uncopied;
    ``seek`` lets botocore rewind it to retry."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    def read(self, size: int | None = -1) -> memoryview:
        end = self._view.nbytes if size is None or size < 0 else self._pos + size
        chunk = self._view[self._pos : end]
        self._pos += chunk.nbytes
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = (0, self._pos, self._view.nbytes)[whence]
        self._pos = min(max(base + offset, 0), self._view.nbytes)
        return self._pos

    def tell(self) -> int:
        return self._pos


def read_into(body: Any, view: memoryview) -> None:
    """Fill ``view`` with the whole of ``body`` (a botocore ``StreamingBody`` whose
    length is ``view.nbytes``) and release its connection.

    Reads straight from the socket into ``view`` when the body is a plain
    ``http.client`` response (urllib3's own ``readinto`` reads into a temporary
    ``bytes`` first). Raises :class:`Truncated` when the body ends early, holds more
    bytes than expected, or the connection fails mid-body; the connection is then
    closed, never reused.
    """
    raw: Any = getattr(body, "_raw_stream", None)  # urllib3's response
    fp: Any = getattr(raw, "_fp", None)  # http.client's, under it
    direct = isinstance(fp, http.client.HTTPResponse) and not raw.headers.get("content-encoding")
    readinto = fp.readinto if direct else body.readinto
    done = 0
    try:
        while done < view.nbytes:
            n = readinto(view[done:])
            if not n:
                raise Truncated(f"the body ended after {done} of {view.nbytes} bytes")
            done += n
        extra = fp.read(1) if direct else body.read(1)
        if extra:
            raise Truncated(f"the body is longer than the expected {view.nbytes} bytes")
    except Exception as exc:
        body.close()
        if isinstance(exc, Truncated):
            raise
        raise Truncated(f"reading the body failed after {done} bytes: {exc!r}") from exc
    if direct:
        raw.release_conn()  # the body is consumed: the connection is clean to reuse
