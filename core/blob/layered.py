"""Layer-addressable blobs (format 2): a reader can check and use one layer of a chunk
before the rest of the blob has arrived.

Layout (see :mod:`kvtier.core.blob` for the prefix and header)::

    prefix | header (with "layers") | payload: the section of layer 0, of layer 1, ...
           | table: one digest per section | trailer

Each section is the chunk's layer ``i`` (``[1, 2, T, H, D]``) encoded by the whole
codec pipeline on its own. The table holds the xxh3-64 of each section, or in a signed
blob the 128-bit digest its flags name; the trailer holds the xxh3-64 of prefix, header
and table, or in a signed blob the digest of them and the MAC of prefix, header and
that digest. So the trailer covers everything but the payload, and the table covers
the payload: a reader that has the head (prefix and header), the table and the trailer
checks them with :func:`check_head`, then each section as it arrives with
:func:`check_section`. Checking a whole blob is still one pass over its bytes.
"""

from __future__ import annotations

import hashlib

import xxhash

from kvtier.core.blob.framing import (
    CHECKSUM,
    DIGEST_BYTES,
    PREFIX,
    SIGNED,
    STRONG,
    body_digest,
    corrupt,
    sign,
)
from kvtier.core.blob.header import BlobHeader
from kvtier.core.integrity import MacKeys


def _flags(view: memoryview) -> int:
    return int(PREFIX.unpack_from(view, 0)[2])


def _section_digest(section: memoryview, flags: int) -> bytes:
    if flags & SIGNED:
        return body_digest(section, flags)
    return CHECKSUM.pack(xxhash.xxh3_64_intdigest(section))


def _table(header: BlobHeader) -> tuple[int, int]:
    """``(offset, end)`` of the section digests in the blob."""
    start = header.payload_offset + header.payload_nbytes
    assert header.layers is not None
    return start, start + len(header.layers) * header.digest_at(0)[1]


def _head_digest(view: memoryview, header: BlobHeader, flags: int) -> bytes:
    """The digest the trailer holds: of prefix, header and table."""
    start, end = _table(header)
    parts = (view[: header.payload_offset], view[start:end])
    if not flags & SIGNED:
        h64 = xxhash.xxh3_64()
        for part in parts:
            h64.update(part)
        return CHECKSUM.pack(h64.intdigest())
    h = hashlib.blake2b(digest_size=DIGEST_BYTES) if flags & STRONG else xxhash.xxh3_128()
    for part in parts:
        h.update(part)
    return h.digest()


def seal(view: memoryview, header: BlobHeader, keys: MacKeys | None, key: str) -> None:
    """Write the section digests and the trailer of the framed layered blob ``view``
    described by ``header`` (a signed one needs ``keys`` and the chunk ``key``)."""
    assert header.layers is not None
    flags = _flags(view)
    start, end = _table(header)
    width = header.digest_at(0)[1]
    for layer in range(len(header.layers)):
        offset, nbytes = header.section(layer)
        at = start + layer * width
        view[at : at + width] = _section_digest(view[offset : offset + nbytes], flags)
    digest = _head_digest(view, header, flags)
    if flags & SIGNED:
        sign(view, end, digest, header.payload_offset - PREFIX.size, keys, key)
    else:
        view[end : end + CHECKSUM.size] = digest


def check_head(view: memoryview, header: BlobHeader) -> None:
    """Check prefix, header and section table of ``view`` (the blob's bytes, of which
    only head, table and trailer need to be in place) against the trailer. Raises
    :class:`ChunkCorruptedError`."""
    _, end = _table(header)
    digest = _head_digest(view, header, _flags(view))
    if digest != bytes(view[end : end + len(digest)]):
        raise corrupt("checksum mismatch (head)")


def check_section(view: memoryview, header: BlobHeader, layer: int) -> None:
    """Check the section of ``layer`` against its digest in the table (itself checked
    by :func:`check_head`). Raises :class:`ChunkCorruptedError`."""
    offset, nbytes = header.section(layer)
    at, width = header.digest_at(layer)
    digest = _section_digest(view[offset : offset + nbytes], _flags(view))
    if digest != bytes(view[at : at + width]):
        raise corrupt(f"checksum mismatch (layer {layer})")


def check_sections(view: memoryview, header: BlobHeader) -> None:
    """:func:`check_section` of every layer."""
    assert header.layers is not None
    for layer in range(len(header.layers)):
        check_section(view, header, layer)


def mac_parts(view: memoryview, header: BlobHeader) -> tuple[bytes, int]:
    """A signed layered blob's stored digest and where its MAC starts."""
    _, end = _table(header)
    return bytes(view[end : end + DIGEST_BYTES]), end + DIGEST_BYTES
