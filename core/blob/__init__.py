"""kvtier's self-describing blob format: the one module that knows its bytes.

Layout (integers little-endian)::

    0                magic b"KVTB"
    4                format version, u16: 1 (whole chunk) or 2 (layered, below)
    6                flags, u16: 0, or 1 for a signed blob (anything else is corrupt)
    8                header_len, u32 (at most MAX_HEADER_BYTES)
    12               payload_len, u64
    20               header: UTF-8 JSON, header_len bytes
                     {"key": str, "dtype": "float16", "shape": [L, 2, T, H, D],
                      "stages": [{"name": "int8", "params": {...}}, ...],
                      "sizes": [n0, n1, ...],
                      "segment": {"start": s},      (only in segment chunks)
                      "layers": [[n0, n1, ...], ...]}  (only in layered blobs)
    20+header_len    payload, payload_len bytes
    end-8            xxh3_64 of every byte before it, u64
                     or, in a signed blob (flags 1, see kvtier.core.integrity):
    end-48           xxh3_128 of every byte before it, 16 bytes
    end-32           keyed BLAKE2b-256 of the prefix, the header and that checksum

``sizes[i]`` is the payload size after stage ``i``; the last equals payload_len.
``segment`` marks a chunk of a position-independent segment: its keys are rotated to
canonical positions ``s .. s+T-1`` (``s``, its offset in the segment, is the canonical
start). Blobs written before segments existed have no ``segment`` and read as before.
A layered blob (version 2, :mod:`~kvtier.core.blob.layered`) encodes each layer of the
chunk on its own, one payload section after another; ``layers[i]`` are layer ``i``'s
section sizes after each stage (adding up to ``sizes``), and its trailer starts with a
digest per section, so that a reader can check one layer before the others arrive.
Readers read both versions; writers write version 2 where the config asks for it
(``blob_layout: layers``). The
encoder pads the JSON with spaces so that the payload starts at a multiple of 64
bytes. Everything read from a blob is validated before it is used: lengths first
(so a lying header cannot make the reader allocate), then the checksum, then the
header's fields. Any inconsistency raises :class:`ChunkCorruptedError`, which the
tier chain treats as a miss (and deletes the blob).

Checksums are computed once per hop: :func:`seal` when a blob first leaves the
process, :func:`verify` when its bytes come back from outside it. A blob that never
left the process (an in-process tier keeps the buffers it was given) is read with
:func:`parse`, which checks framing and header but not the checksum. Writing blobs is
:class:`~kvtier.core.codecs.pipeline.CodecPipeline`'s job, through :func:`frame`;
reading them back, :mod:`kvtier.core.codecs.decode`'s.

Modules: :mod:`~kvtier.core.blob.framing` (the prefix, limits, trailer; :func:`frame`,
the whole-chunk seal), :mod:`~kvtier.core.blob.header` (the JSON header, written and
validated), :mod:`~kvtier.core.blob.layered` (layered blobs: seal, head and section
checks), :mod:`~kvtier.core.blob.reading` (the checks of :func:`verify` and
:func:`parse`, and of a blob's head); this module holds :class:`Blob` and the functions
to read one. Import everything from here.
"""

from __future__ import annotations

from kvtier.core.blob import framing, layered
from kvtier.core.blob.framing import (
    FORMAT_VERSION,
    LAYERED_VERSION,
    MAGIC,
    MAX_BLOB_BYTES,
    MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    MAX_PADDED_HEADER,
    MAX_STAGE_BYTES,
    MAX_STAGES,
    OVERHEAD,
    SIGNED,
    STRONG,
    frame,
    padded_header_len,
    payload_start,
    signing_flags,
    trailer_bytes,
)
from kvtier.core.blob.header import BlobHeader, header_json
from kvtier.core.blob.layered import check_head, check_section
from kvtier.core.blob.reading import (
    Prefix,
    check_signature,
    read_head,
    read_header,
    read_prefix,
)
from kvtier.core.buffers import Buffer, BytesLike, Releasable
from kvtier.core.errors import ChunkCorruptedError
from kvtier.core.integrity import MacKeys

__all__ = [
    "FORMAT_VERSION",
    "LAYERED_VERSION",
    "MAGIC",
    "MAX_BLOB_BYTES",
    "MAX_CHUNK_BYTES",
    "MAX_HEADER_BYTES",
    "MAX_PADDED_HEADER",
    "MAX_STAGES",
    "MAX_STAGE_BYTES",
    "OVERHEAD",
    "SIGNED",
    "STRONG",
    "Blob",
    "BlobHeader",
    "ChunkCorruptedError",
    "Prefix",
    "check_head",
    "check_section",
    "check_signature",
    "frame",
    "header_json",
    "padded_header_len",
    "parse",
    "payload_of",
    "payload_start",
    "read_head",
    "read_prefix",
    "seal",
    "signing_flags",
    "trailer_bytes",
    "verify",
]


class Blob(Releasable):
    """An encoded chunk in a :class:`Buffer`, with its validated header.

    The holder owns one reference of ``buf``: pass it on or :meth:`release` it (or use
    the blob as a context manager). ``sealed``: its checksum is known to be written
    (see :meth:`ensure_sealed`).
    """

    __slots__ = ("buf", "header", "sealed")

    def __init__(self, buf: Buffer, header: BlobHeader, *, sealed: bool) -> None:
        self.buf = buf
        self.header = header
        self.sealed = sealed

    def ensure_sealed(self, keys: MacKeys | None = None) -> None:
        """Write the checksum (and, for a signed blob, the MAC with ``keys``) unless it is
        known to be there: before the blob's bytes leave the process. Sealing again
        rewrites the same bytes."""
        if not self.sealed:
            seal(self.buf.view, keys, self.key, self.header)
            self.sealed = True

    @property
    def key(self) -> str:
        return self.header.key

    @property
    def view(self) -> memoryview:
        return self.buf.view

    @property
    def nbytes(self) -> int:
        return self.buf.nbytes

    def retain(self) -> Blob:
        """Another reference to the same bytes; release each."""
        return Blob(self.buf.retain(), self.header, sealed=self.sealed)

    def release(self) -> None:
        self.buf.release()

    def __repr__(self) -> str:
        return f"Blob({self.key!r}, {self.header.pipeline}, {self.nbytes} bytes)"


def seal(
    view: memoryview, keys: MacKeys | None = None, key: str = "", header: BlobHeader | None = None
) -> None:
    """Write the checksum of a framed blob (the one pass over its bytes on the way in);
    a signed blob gets its digest and MAC instead, which need ``keys`` and the blob's
    chunk ``key``. A layered blob's ``header`` is parsed from ``view`` unless given."""
    if read_prefix(view).version == FORMAT_VERSION:
        framing.seal(view, keys, key)
        return
    layered.seal(view, header or parse(view), keys, key)


def _view_of(blob: BytesLike | Buffer | Blob) -> memoryview:
    view = blob.view if isinstance(blob, (Buffer, Blob)) else memoryview(blob)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def verify(
    blob: BytesLike | Buffer | Blob,
    *,
    expected_key: str | None = None,
    keys: MacKeys | None = None,
) -> BlobHeader:
    """Validate framing, checksum and header (and that the header's key is
    ``expected_key``): the one check for bytes that come from outside this process.
    With ``keys``, a signed blob's MAC must match one of them, and an unsigned blob is
    refused if they say signatures are required. Raises :class:`ChunkCorruptedError`."""
    return read_header(_view_of(blob), expected_key, True, keys)


def parse(
    blob: BytesLike | Buffer | Blob,
    *,
    expected_key: str | None = None,
    keys: MacKeys | None = None,
) -> BlobHeader:
    """:func:`verify` without the checksum, for blobs that never left this process or
    whose checksum was verified when they entered it. With ``keys`` the MAC is checked
    (against the stored digest: no pass over the payload)."""
    return read_header(_view_of(blob), expected_key, False, keys)


def payload_of(blob: BytesLike | Buffer | Blob, header: BlobHeader) -> memoryview:
    """A zero-copy view of the payload of ``blob`` described by ``header``."""
    start = header.payload_offset
    return _view_of(blob)[start : start + header.payload_nbytes]
