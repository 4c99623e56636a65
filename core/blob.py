"""kvtier's self-describing blob format: the one module that knows its bytes.

Layout (integers little-endian)::

    0                magic b"KVTB"
    4                format version, u16 (1)
    6                flags, u16: 0, or 1 for a signed blob (anything else is corrupt)
    8                header_len, u32 (at most MAX_HEADER_BYTES)
    12               payload_len, u64
    20               header: UTF-8 JSON, header_len bytes
                     {"key": str, "dtype": "float16", "shape": [L, 2, T, H, D],
                      "stages": [{"name": "int8", "params": {...}}, ...],
                      "sizes": [n0, n1, ...],
                      "segment": {"start": s}}      (only in segment chunks)
    20+header_len    payload, payload_len bytes
    end-8            xxh3_64 of every byte before it, u64
                     or, in a signed blob (flags 1, see kvtier.core.integrity):
    end-48           xxh3_128 of every byte before it, 16 bytes
    end-32           keyed BLAKE2b-256 of the prefix, the header and that checksum

``sizes[i]`` is the payload size after stage ``i``; the last equals payload_len.
``segment`` marks a chunk of a position-independent segment: its keys are rotated to
canonical positions ``s .. s+T-1`` (``s``, its offset in the segment, is the canonical
start). Blobs written before segments existed have no ``segment`` and read as before. The
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
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import torch
import xxhash

from kvtier.core.buffers import Buffer, BytesLike
from kvtier.core.errors import ChunkCorruptedError, ConfigError
from kvtier.core.integrity import MAC_BYTES, MacKeys
from kvtier.core.layout import DTYPES, dtype_name

MAGIC = b"KVTB"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 64 << 10
MAX_CHUNK_BYTES = 4 << 30
MAX_STAGES = 8
MAX_STAGE_BYTES = MAX_CHUNK_BYTES + (64 << 20)
"""Largest payload any stage may declare: a chunk plus what compression may add."""

_PREFIX = struct.Struct("<4sHHIQ")
_CHECKSUM = struct.Struct("<Q")
SIGNED = 0x0001
"""Flag of a signed blob: a 128-bit digest and a MAC in place of the checksum."""
STRONG = 0x0002
"""Flag of a signed blob whose digest is BLAKE2b-128 (cryptographic) instead of xxh3-128."""
_DIGEST_BYTES = 16
_SIGNED_TRAILER = _DIGEST_BYTES + MAC_BYTES
OVERHEAD = _PREFIX.size + _CHECKSUM.size
"""Bytes of a blob besides its header and payload: the size of the smallest blob."""
MAX_BLOB_BYTES = _PREFIX.size + _SIGNED_TRAILER + MAX_HEADER_BYTES + MAX_STAGE_BYTES
"""The largest blob a reader accepts."""


def trailer_bytes(signed: bool) -> int:
    """Bytes after the payload: the checksum, or in a signed blob the digest and MAC."""
    return _SIGNED_TRAILER if signed else _CHECKSUM.size


def _digest(body: memoryview, flags: int) -> bytes:
    """The 128-bit digest a signed blob carries of its ``body`` (all bytes before it)."""
    if flags & STRONG:
        return hashlib.blake2b(body, digest_size=_DIGEST_BYTES).digest()
    return xxhash.xxh3_128_digest(body)


_PAYLOAD_ALIGN = 64
_HEADER_KEYS = frozenset({"key", "dtype", "shape", "stages", "sizes"})
_OPTIONAL_KEYS = frozenset({"segment"})
_STAGE_KEYS = frozenset({"name", "params"})


@dataclass(frozen=True)
class BlobHeader:
    """A validated blob header; ``nbytes`` is the whole blob's size."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stages: tuple[tuple[str, dict[str, Any]], ...]
    sizes: tuple[int, ...]
    payload_nbytes: int
    nbytes: int
    signed: bool = False
    """The blob carries a MAC (:mod:`kvtier.core.integrity`)."""
    segment_start: int | None = None
    """Canonical position of the first token of a segment chunk; ``None`` for a prefix
    chunk (whose keys sit at their absolute positions)."""

    @property
    def payload_offset(self) -> int:
        """Where the payload starts in the blob."""
        return self.nbytes - trailer_bytes(self.signed) - self.payload_nbytes

    @property
    def pipeline(self) -> str:
        """The pipeline that wrote the blob, as a config names it (``int8+zstd``)."""
        return "+".join(name for name, _ in self.stages)


class Blob:
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
            seal(self.buf.view, keys, self.key)
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

    def __enter__(self) -> Blob:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Blob({self.key!r}, {self.header.pipeline}, {self.nbytes} bytes)"


# -- writing --------------------------------------------------------------------------


def header_json(
    key: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    stages: list[tuple[str, dict[str, Any]]],
    sizes: list[int],
    segment_start: int | None = None,
) -> bytes:
    """The header's JSON text; :class:`ConfigError` if it would exceed the limit.
    ``segment_start`` marks a segment chunk and records its canonical start."""
    header: dict[str, Any] = {
        "key": key,
        "dtype": dtype_name(dtype),
        "shape": list(shape),
        "stages": [{"name": name, "params": params} for name, params in stages],
        "sizes": sizes,
    }
    if segment_start is not None:
        if not _is_count(segment_start):
            raise ConfigError(f"segment_start must be a non-negative int, got {segment_start!r}")
        header["segment"] = {"start": segment_start}
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if padded_header_len(len(text)) > MAX_PADDED_HEADER:
        raise ConfigError(
            f"blob header for key {key[:80]!r} is {len(text)} bytes; the limit is "
            f"{MAX_HEADER_BYTES} (is the key that long?)"
        )
    return text


def padded_header_len(nbytes: int) -> int:
    """Header length >= ``nbytes`` that puts the payload on a 64-byte boundary."""
    return -(-(_PREFIX.size + nbytes) // _PAYLOAD_ALIGN) * _PAYLOAD_ALIGN - _PREFIX.size


MAX_PADDED_HEADER = (
    _PREFIX.size + MAX_HEADER_BYTES
) // _PAYLOAD_ALIGN * _PAYLOAD_ALIGN - _PREFIX.size


def payload_start(header_len: int) -> int:
    """Offset of the payload in a blob whose (padded) header is ``header_len`` bytes."""
    return _PREFIX.size + header_len


def signing_flags(keys: MacKeys | None) -> int:
    """The prefix flags of blobs written with ``keys`` (``0``: unsigned)."""
    if keys is None:
        return 0
    return SIGNED | (STRONG if keys.strong else 0)


def frame(view: memoryview, header: bytes, header_len: int, payload_len: int, flags: int) -> None:
    """Write the prefix (with ``flags``, see :func:`signing_flags`) and the space-padded
    header in front of a payload already in place; ``view`` is the whole blob
    (:func:`trailer_bytes` longer than prefix, header and payload). The blob still
    needs :func:`seal`."""
    _PREFIX.pack_into(view, 0, MAGIC, FORMAT_VERSION, flags, header_len, payload_len)
    end = _PREFIX.size + header_len
    view[_PREFIX.size : _PREFIX.size + len(header)] = header
    view[_PREFIX.size + len(header) : end] = b" " * (header_len - len(header))


def seal(view: memoryview, keys: MacKeys | None = None, key: str = "") -> None:
    """Write the checksum of a framed blob (the one pass over its bytes on the way in);
    a signed blob gets its digest and MAC instead, which need ``keys`` and the blob's
    chunk ``key``."""
    _, _, flags, header_len, _ = _PREFIX.unpack_from(view, 0)
    if not flags & SIGNED:
        body = view.nbytes - _CHECKSUM.size
        _CHECKSUM.pack_into(view, body, xxhash.xxh3_64_intdigest(view[:body]))
        return
    if keys is None:
        raise ConfigError("a signed blob needs the integrity keys to be sealed")
    body = view.nbytes - _SIGNED_TRAILER
    digest = _digest(view[:body], flags)
    view[body : body + _DIGEST_BYTES] = digest
    signed_part = bytes(view[: _PREFIX.size + header_len]) + digest
    view[body + _DIGEST_BYTES :] = keys.sign(key, signed_part)


# -- reading ----------------------------------------------------------------------------


def _view_of(blob: BytesLike | Buffer | Blob) -> memoryview:
    view = blob.view if isinstance(blob, (Buffer, Blob)) else memoryview(blob)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _corrupt(what: str) -> ChunkCorruptedError:
    return ChunkCorruptedError(f"corrupt blob: {what}")


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _parse_header(text: bytes, payload_len: int, nbytes: int, signed: bool) -> BlobHeader:
    try:
        obj = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise _corrupt(f"header is not UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict) or not _HEADER_KEYS <= set(obj) <= _HEADER_KEYS | _OPTIONAL_KEYS:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise _corrupt(
            f"header must be an object with keys {sorted(_HEADER_KEYS)} (and optionally "
            f"{sorted(_OPTIONAL_KEYS)}), got {keys}"
        )
    key, dtype, shape, stages, sizes = (
        obj[k] for k in ("key", "dtype", "shape", "stages", "sizes")
    )
    if not isinstance(key, str):
        raise _corrupt(f"key must be a string, got {key!r:.80}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise _corrupt(f"unsupported dtype {dtype!r:.80}")
    torch_dtype = DTYPES[dtype]
    if not isinstance(shape, list) or len(shape) != 5 or not all(map(_is_count, shape)):
        raise _corrupt(f"shape must be 5 non-negative integers, got {shape!r:.120}")
    if math.prod(shape) * torch_dtype.itemsize > MAX_CHUNK_BYTES:
        raise _corrupt(f"shape {shape} holds more than {MAX_CHUNK_BYTES} bytes")
    if not isinstance(stages, list) or not 1 <= len(stages) <= MAX_STAGES:
        raise _corrupt(f"stages must be a list of 1..{MAX_STAGES} stages, got {stages!r:.120}")
    parsed = []
    for stage in stages:
        if (
            not isinstance(stage, dict)
            or set(stage) != _STAGE_KEYS
            or not isinstance(stage["name"], str)
            or not isinstance(stage["params"], dict)
        ):
            raise _corrupt(f"a stage must be {{name: str, params: {{...}}}}, got {stage!r:.120}")
        parsed.append((stage["name"], stage["params"]))
    if not isinstance(sizes, list) or len(sizes) != len(stages) or not all(map(_is_count, sizes)):
        raise _corrupt(f"sizes must be one non-negative integer per stage, got {sizes!r:.120}")
    if max(sizes) > MAX_STAGE_BYTES:
        raise _corrupt(f"a stage size exceeds {MAX_STAGE_BYTES} bytes: {sizes}")
    if sizes[-1] != payload_len:
        raise _corrupt(f"last stage size {sizes[-1]} != payload length {payload_len}")
    segment = obj.get("segment")
    if segment is not None and (
        not isinstance(segment, dict)
        or set(segment) != {"start"}
        or not _is_count(segment["start"])
    ):
        raise _corrupt(f"segment must be {{start: non-negative int}}, got {segment!r:.120}")
    return BlobHeader(
        key,
        torch_dtype,
        tuple(shape),
        tuple(parsed),
        tuple(sizes),
        payload_len,
        nbytes,
        signed,
        segment_start=None if segment is None else segment["start"],
    )


def _read(
    view: memoryview, expected_key: str | None, checksum: bool, keys: MacKeys | None
) -> BlobHeader:
    nbytes = view.nbytes
    if nbytes < OVERHEAD:
        raise _corrupt(f"{nbytes} bytes is shorter than the {OVERHEAD}-byte minimum")
    magic, version, flags, header_len, payload_len = _PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise _corrupt(f"magic is {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise _corrupt(f"format version {version}, this kvtier reads {FORMAT_VERSION}")
    signed = bool(flags & SIGNED)
    if flags & ~(SIGNED | STRONG) or (flags & STRONG and not signed):
        raise _corrupt(f"unknown flags {flags:#06x}")
    if header_len > MAX_HEADER_BYTES:
        raise _corrupt(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    trailer = trailer_bytes(signed)
    if _PREFIX.size + trailer + header_len + payload_len != nbytes:
        raise _corrupt(
            f"{nbytes} bytes, but the prefix declares {_PREFIX.size + trailer} + {header_len} "
            f"(header) + {payload_len} (payload)"
        )
    body = nbytes - trailer
    if checksum and not signed:
        (stored,) = _CHECKSUM.unpack_from(view, body)
        if xxhash.xxh3_64_intdigest(view[:body]) != stored:
            raise _corrupt("checksum mismatch")
    digest = bytes(view[body : body + _DIGEST_BYTES]) if signed else b""
    if checksum and signed and _digest(view[:body], flags) != digest:
        raise _corrupt("checksum mismatch")
    text = bytes(view[_PREFIX.size : _PREFIX.size + header_len])
    header = _parse_header(text, payload_len, nbytes, signed)
    if expected_key is not None and header.key != expected_key:
        raise _corrupt(f"foreign blob: key {header.key!r:.120}, expected {expected_key!r:.120}")
    if keys is not None and signed:
        signed_part = bytes(view[: _PREFIX.size + header_len]) + digest
        if not keys.check(header.key, signed_part, bytes(view[body + _DIGEST_BYTES :])):
            raise _corrupt("signature (MAC) mismatch: not written with an accepted key")
    elif keys is not None and keys.required:
        raise _corrupt("unsigned, and the integrity settings require a signature")
    return header


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
    return _read(_view_of(blob), expected_key, True, keys)


def parse(
    blob: BytesLike | Buffer | Blob,
    *,
    expected_key: str | None = None,
    keys: MacKeys | None = None,
) -> BlobHeader:
    """:func:`verify` without the checksum, for blobs that never left this process or
    whose checksum was verified when they entered it. With ``keys`` the MAC is checked
    (against the stored digest: no pass over the payload)."""
    return _read(_view_of(blob), expected_key, False, keys)


def payload_of(blob: BytesLike | Buffer | Blob, header: BlobHeader) -> memoryview:
    """A zero-copy view of the payload of ``blob`` described by ``header``."""
    start = header.payload_offset
    return _view_of(blob)[start : start + header.payload_nbytes]
