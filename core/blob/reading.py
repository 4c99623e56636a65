"""The checks of a blob's bytes, in the order that makes them safe (see
:func:`read_header`); :func:`kvtier.core.blob.verify` and :func:`~kvtier.core.blob.parse`
run them, and :func:`read_prefix` / :func:`read_head` let a reader that has only the
blob's first bytes learn its layout (:mod:`kvtier.core.blob.layered`)."""

from __future__ import annotations

from typing import NamedTuple

import xxhash

from kvtier.core.blob import layered
from kvtier.core.blob.framing import (
    CHECKSUM,
    DIGEST_BYTES,
    MAGIC,
    MAX_HEADER_BYTES,
    OVERHEAD,
    PREFIX,
    SIGNED,
    STRONG,
    VERSIONS,
    body_digest,
    corrupt,
    trailer_bytes,
)
from kvtier.core.blob.header import BlobHeader, parse_header
from kvtier.core.integrity import MacKeys


class Prefix(NamedTuple):
    """A blob's first :data:`~kvtier.core.blob.framing.PREFIX` bytes, checked."""

    version: int
    flags: int
    header_len: int
    payload_len: int

    @property
    def signed(self) -> bool:
        return bool(self.flags & SIGNED)

    @property
    def head_nbytes(self) -> int:
        """Bytes of prefix and header: what a reader needs to learn the layout."""
        return PREFIX.size + self.header_len


def read_prefix(view: memoryview) -> Prefix:
    """The checked prefix of a blob whose first bytes are ``view`` (at least
    ``PREFIX.size``): magic, a known version and flags, a header within the limit.
    Raises :class:`ChunkCorruptedError`."""
    if view.nbytes < PREFIX.size:
        raise corrupt(f"{view.nbytes} bytes is shorter than the {PREFIX.size}-byte prefix")
    magic, version, flags, header_len, payload_len = PREFIX.unpack_from(view, 0)
    if magic != MAGIC:
        raise corrupt(f"magic is {magic!r}, expected {MAGIC!r}")
    if version not in VERSIONS:
        raise corrupt(f"format version {version}, this kvtier reads {list(VERSIONS)}")
    if flags & ~(SIGNED | STRONG) or (flags & STRONG and not flags & SIGNED):
        raise corrupt(f"unknown flags {flags:#06x}")
    if header_len > MAX_HEADER_BYTES:
        raise corrupt(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    return Prefix(version, flags, header_len, payload_len)


def read_head(head: memoryview, expected_key: str | None) -> BlobHeader:
    """The header of a blob of which ``head`` holds at least prefix and header, its
    ``nbytes`` the size they declare; nothing is verified yet (see
    :func:`kvtier.core.blob.layered.check_head`). Raises :class:`ChunkCorruptedError`."""
    prefix = read_prefix(head)
    if head.nbytes < prefix.head_nbytes:
        raise corrupt(f"{head.nbytes} bytes do not hold the {prefix.head_nbytes}-byte head")
    text = bytes(head[PREFIX.size : prefix.head_nbytes])
    header = parse_header(text, prefix.payload_len, None, prefix.signed, prefix.version)
    _check_key(header, expected_key)
    return header


def _check_key(header: BlobHeader, expected_key: str | None) -> None:
    if expected_key is not None and header.key != expected_key:
        raise corrupt(f"foreign blob: key {header.key!r:.120}, expected {expected_key!r:.120}")


def read_header(
    view: memoryview, expected_key: str | None, checksum: bool, keys: MacKeys | None
) -> BlobHeader:
    """The header of the blob ``view``, after every check of its frame: lengths first (so
    a lying prefix cannot make the reader allocate), then, with ``checksum``, the
    checksum or digest (of a layered blob: of its head and of every section), then the
    header's fields, ``expected_key`` and, with ``keys``, the MAC. Raises
    :class:`ChunkCorruptedError`."""
    nbytes = view.nbytes
    if nbytes < OVERHEAD:
        raise corrupt(f"{nbytes} bytes is shorter than the {OVERHEAD}-byte minimum")
    prefix = read_prefix(view)
    signed = prefix.signed
    least = PREFIX.size + trailer_bytes(signed) + prefix.header_len + prefix.payload_len
    if (nbytes != least) if prefix.version == 1 else (nbytes < least):
        raise corrupt(
            f"{nbytes} bytes, but the prefix declares {PREFIX.size + trailer_bytes(signed)} + "
            f"{prefix.header_len} (header) + {prefix.payload_len} (payload)"
        )
    text = bytes(view[PREFIX.size : prefix.head_nbytes])
    if prefix.version != 1:
        header = parse_header(text, prefix.payload_len, nbytes, signed, prefix.version)
        if checksum:
            layered.check_head(view, header)
            layered.check_sections(view, header)
        _check_key(header, expected_key)
        check_signature(view, header, *layered.mac_parts(view, header), keys)
        return header
    body = nbytes - trailer_bytes(signed)
    if checksum and not signed:
        (stored,) = CHECKSUM.unpack_from(view, body)
        if xxhash.xxh3_64_intdigest(view[:body]) != stored:
            raise corrupt("checksum mismatch")
    digest = bytes(view[body : body + DIGEST_BYTES]) if signed else b""
    if checksum and signed and body_digest(view[:body], prefix.flags) != digest:
        raise corrupt("checksum mismatch")
    header = parse_header(text, prefix.payload_len, nbytes, signed)
    _check_key(header, expected_key)
    check_signature(view, header, digest, body + DIGEST_BYTES, keys)
    return header


def check_signature(
    view: memoryview, header: BlobHeader, digest: bytes, mac_at: int, keys: MacKeys | None
) -> None:
    """With ``keys``: a signed blob's MAC (at ``mac_at``, over prefix, header and
    ``digest``) must match one of them, and an unsigned blob is refused if they require
    signatures. Raises :class:`ChunkCorruptedError`."""
    if keys is not None and header.signed:
        signed_part = bytes(view[: header.payload_offset]) + digest
        if not keys.check(header.key, signed_part, bytes(view[mac_at : header.nbytes])):
            raise corrupt("signature (MAC) mismatch: not written with an accepted key")
    elif keys is not None and keys.required:
        raise corrupt("unsigned, and the integrity settings require a signature")
