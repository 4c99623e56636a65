"""The frame of a blob: its prefix, limits and trailer (the checksum, or a signed
blob's digest and MAC; a layered blob's section digests before them), written by
:func:`frame` and, for whole-chunk blobs, :func:`seal` (layered blobs:
:mod:`kvtier.core.blob.layered`); see :mod:`kvtier.core.blob` for the layout."""

from __future__ import annotations

import hashlib
import struct

import xxhash

from kvtier.core.errors import ChunkCorruptedError, ConfigError
from kvtier.core.integrity import MAC_BYTES, MacKeys

MAGIC = b"KVTB"
FORMAT_VERSION = 1
"""A blob whose payload is one section, covered by one checksum."""
LAYERED_VERSION = 2
"""A layer-addressable blob: one payload section per layer, each with its own digest."""
VERSIONS = (FORMAT_VERSION, LAYERED_VERSION)
MAX_HEADER_BYTES = 64 << 10
MAX_CHUNK_BYTES = 4 << 30
MAX_STAGES = 8
MAX_STAGE_BYTES = MAX_CHUNK_BYTES + (64 << 20)
"""Largest payload any stage may declare: a chunk plus what compression may add."""

PREFIX = struct.Struct("<4sHHIQ")
CHECKSUM = struct.Struct("<Q")
SIGNED = 0x0001
"""Flag of a signed blob: a 128-bit digest and a MAC in place of the checksum."""
STRONG = 0x0002
"""Flag of a signed blob whose digest is BLAKE2b-128 (cryptographic) instead of xxh3-128."""
DIGEST_BYTES = 16
SIGNED_TRAILER = DIGEST_BYTES + MAC_BYTES
OVERHEAD = PREFIX.size + CHECKSUM.size
"""Bytes of a blob besides its header and payload: the size of the smallest blob."""
MAX_SECTIONS = 4096
"""Most layers (sections) a layered blob may hold."""
MAX_BLOB_BYTES = (
    PREFIX.size + SIGNED_TRAILER + MAX_SECTIONS * DIGEST_BYTES + MAX_HEADER_BYTES + MAX_STAGE_BYTES
)
"""The largest blob a reader accepts."""


def section_digest_bytes(signed: bool) -> int:
    """Bytes of one section digest of a layered blob: xxh3-64, or in a signed blob the
    128-bit digest its flags name (see :func:`body_digest`)."""
    return DIGEST_BYTES if signed else CHECKSUM.size


def trailer_bytes(signed: bool, sections: int = 0) -> int:
    """Bytes after the payload: the checksum, or in a signed blob the digest and MAC,
    after the table of ``sections`` section digests of a layered blob."""
    return sections * section_digest_bytes(signed) + (SIGNED_TRAILER if signed else CHECKSUM.size)


def body_digest(body: memoryview, flags: int) -> bytes:
    """The 128-bit digest a signed blob carries of its ``body`` (all bytes before it)."""
    if flags & STRONG:
        return hashlib.blake2b(body, digest_size=DIGEST_BYTES).digest()
    return xxhash.xxh3_128_digest(body)


PAYLOAD_ALIGN = 64
"""The payload starts at a multiple of this many bytes (the header is padded)."""


def padded_header_len(nbytes: int) -> int:
    """Header length >= ``nbytes`` that puts the payload on a 64-byte boundary."""
    return -(-(PREFIX.size + nbytes) // PAYLOAD_ALIGN) * PAYLOAD_ALIGN - PREFIX.size


MAX_PADDED_HEADER = (PREFIX.size + MAX_HEADER_BYTES) // PAYLOAD_ALIGN * PAYLOAD_ALIGN - PREFIX.size


def payload_start(header_len: int) -> int:
    """Offset of the payload in a blob whose (padded) header is ``header_len`` bytes."""
    return PREFIX.size + header_len


def signing_flags(keys: MacKeys | None) -> int:
    """The prefix flags of blobs written with ``keys`` (``0``: unsigned)."""
    if keys is None:
        return 0
    return SIGNED | (STRONG if keys.strong else 0)


def frame(
    view: memoryview,
    header: bytes,
    header_len: int,
    payload_len: int,
    flags: int,
    version: int = FORMAT_VERSION,
) -> None:
    """Write the prefix (with ``flags``, see :func:`signing_flags`, and ``version``) and
    the space-padded header in front of a payload already in place; ``view`` is the
    whole blob (:func:`trailer_bytes` longer than prefix, header and payload). The blob
    still needs sealing (:func:`kvtier.core.blob.seal`)."""
    PREFIX.pack_into(view, 0, MAGIC, version, flags, header_len, payload_len)
    end = PREFIX.size + header_len
    view[PREFIX.size : PREFIX.size + len(header)] = header
    view[PREFIX.size + len(header) : end] = b" " * (header_len - len(header))


def seal(view: memoryview, keys: MacKeys | None = None, key: str = "") -> None:
    """Write the checksum of a framed whole-chunk blob (the one pass over its bytes on
    the way in); a signed blob gets its digest and MAC instead, which need ``keys`` and
    the blob's chunk ``key``."""
    _, _, flags, header_len, _ = PREFIX.unpack_from(view, 0)
    if not flags & SIGNED:
        body = view.nbytes - CHECKSUM.size
        CHECKSUM.pack_into(view, body, xxhash.xxh3_64_intdigest(view[:body]))
        return
    body = view.nbytes - SIGNED_TRAILER
    sign(view, body, body_digest(view[:body], flags), header_len, keys, key)


def sign(
    view: memoryview, at: int, digest: bytes, header_len: int, keys: MacKeys | None, key: str
) -> None:
    """Write a signed blob's ``digest`` at ``at`` and, after it, the MAC of prefix,
    header and digest with ``keys`` for chunk ``key``."""
    if keys is None:
        raise ConfigError("a signed blob needs the integrity keys to be sealed")
    view[at : at + DIGEST_BYTES] = digest
    signed_part = bytes(view[: PREFIX.size + header_len]) + digest
    view[at + DIGEST_BYTES :] = keys.sign(key, signed_part)


def corrupt(what: str) -> ChunkCorruptedError:
    """The error for a blob that fails a check: ``corrupt blob: <what>``."""
    return ChunkCorruptedError(f"corrupt blob: {what}")
