"""The checks of a blob's bytes, in the order that makes them safe (see
:func:`read_header`); :func:`kvtier.core.blob.verify` and :func:`~kvtier.core.blob.parse`
run them."""

from __future__ import annotations

import xxhash

from kvtier.core.blob.framing import (
    CHECKSUM,
    DIGEST_BYTES,
    FORMAT_VERSION,
    MAGIC,
    MAX_HEADER_BYTES,
    OVERHEAD,
    PREFIX,
    SIGNED,
    STRONG,
    body_digest,
    corrupt,
    trailer_bytes,
)
from kvtier.core.blob.header import BlobHeader, parse_header
from kvtier.core.integrity import MacKeys


def read_header(
    view: memoryview, expected_key: str | None, checksum: bool, keys: MacKeys | None
) -> BlobHeader:
    """The header of the blob ``view``, after every check of its frame: lengths first (so
    a lying prefix cannot make the reader allocate), then, with ``checksum``, the
    checksum or digest, then the header's fields, ``expected_key`` and, with ``keys``,
    the MAC. Raises :class:`ChunkCorruptedError`."""
    nbytes = view.nbytes
    if nbytes < OVERHEAD:
        raise corrupt(f"{nbytes} bytes is shorter than the {OVERHEAD}-byte minimum")
    magic, version, flags, header_len, payload_len = PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise corrupt(f"magic is {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise corrupt(f"format version {version}, this kvtier reads {FORMAT_VERSION}")
    signed = bool(flags & SIGNED)
    if flags & ~(SIGNED | STRONG) or (flags & STRONG and not signed):
        raise corrupt(f"unknown flags {flags:#06x}")
    if header_len > MAX_HEADER_BYTES:
        raise corrupt(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    trailer = trailer_bytes(signed)
    if PREFIX.size + trailer + header_len + payload_len != nbytes:
        raise corrupt(
            f"{nbytes} bytes, but the prefix declares {PREFIX.size + trailer} + {header_len} "
            f"(header) + {payload_len} (payload)"
        )
    body = nbytes - trailer
    if checksum and not signed:
        (stored,) = CHECKSUM.unpack_from(view, body)
        if xxhash.xxh3_64_intdigest(view[:body]) != stored:
            raise corrupt("checksum mismatch")
    digest = bytes(view[body : body + DIGEST_BYTES]) if signed else b""
    if checksum and signed and body_digest(view[:body], flags) != digest:
        raise corrupt("checksum mismatch")
    text = bytes(view[PREFIX.size : PREFIX.size + header_len])
    header = parse_header(text, payload_len, nbytes, signed)
    if expected_key is not None and header.key != expected_key:
        raise corrupt(f"foreign blob: key {header.key!r:.120}, expected {expected_key!r:.120}")
    if keys is not None and signed:
        signed_part = bytes(view[: PREFIX.size + header_len]) + digest
        if not keys.check(header.key, signed_part, bytes(view[body + DIGEST_BYTES :])):
            raise corrupt("signature (MAC) mismatch: not written with an accepted key")
    elif keys is not None and keys.required:
        raise corrupt("unsigned, and the integrity settings require a signature")
    return header
