"""One chunk as vineyard objects: a blob with the chunk's bytes, held by an object that
a name can point to (vineyard refuses names on blobs).

Writing a chunk is: allocate its blob in vineyardd's shared memory, copy the bytes in
(once, with the GIL released), seal it, wrap it in a persisted ``kvtier::Chunk`` object
(``nbytes``, ``key``) and name that object (:mod:`~kvtier.backends.vineyard.names`).
Over RPC the blob is sent from the caller's buffer as it is (no staging copy).

All functions here block; the backend runs them in its worker threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvtier.backends.vineyard.client import MISSING, Client, ObjectID, ObjectMeta, RemoteBlobBuilder
from kvtier.core.buffers import Buffer, address_of


def typename(key_prefix: str) -> str:
    """The typename of a tier's chunk objects: listing it lists exactly the tier's."""
    return f"kvtier::Chunk@{key_prefix}"


@dataclass(frozen=True)
class Chunk:
    """A chunk object as its metadata describes it."""

    object_id: int
    blob_id: int
    nbytes: int
    instance_id: int
    """The vineyardd holding the blob (another host's, in a distributed deployment)."""


def copy_into(dst: memoryview, src: memoryview) -> None:
    """Copy ``src`` into ``dst`` (same length); numpy releases the GIL while it copies."""
    if src.nbytes:
        np.copyto(np.frombuffer(dst, np.uint8), np.frombuffer(src, np.uint8))


def _chunk_meta(type_name: str, key: str, blob: Any, nbytes: int) -> ObjectMeta:
    meta = ObjectMeta()
    meta["typename"] = type_name
    meta["nbytes"] = nbytes
    meta["key"] = key
    meta.add_member("buffer", blob)
    return meta


def write_local(client: Client, type_name: str, items: Sequence[tuple[str, Buffer]]) -> list[int]:
    """Store each blob in this host's vineyardd as a persisted, unnamed chunk object;
    returns their object IDs. Raises vineyard's ``NotEnoughMemoryException`` when the
    shared memory is full (blobs allocated by then are released)."""
    sizes = [buf.nbytes for _, buf in items if buf.nbytes]
    builders = list(client.create_blob(sizes)) if sizes else []
    blobs: list[Any] = []
    try:
        for _, buf in items:
            if not buf.nbytes:
                blobs.append(client.create_empty_blob())
                continue
            builder = builders.pop(0)
            copy_into(memoryview(builder).cast("B"), buf.view)
            blobs.append(builder.seal(client))
    except BaseException:
        for builder in builders:
            builder.abort(client.ipc_client)
        if blobs:
            client.delete([b.id for b in blobs if int(b.id) != EMPTY_BLOB])
        raise
    metas = [
        _chunk_meta(type_name, key, blob, buf.nbytes)
        for (key, buf), blob in zip(items, blobs, strict=True)
    ]
    return _persist(client, metas)


def write_remote(client: Client, type_name: str, items: Sequence[tuple[str, Buffer]]) -> list[int]:
    """Store each blob in the vineyardd at the other end of an RPC client (sent from the
    caller's buffer, not staged); returns the chunk objects' IDs."""
    builders = [
        RemoteBlobBuilder.wrap(address_of(_writable(buf)), buf.nbytes)
        if buf.nbytes
        else RemoteBlobBuilder.make(0)
        for _, buf in items
    ]
    blob_metas = client.create_remote_blob(builders)
    metas = [
        _chunk_meta(type_name, key, blob, buf.nbytes)
        for (key, buf), blob in zip(items, blob_metas, strict=True)
    ]
    return _persist(client, metas)


def _writable(buf: Buffer) -> memoryview:
    """A writable view of ``buf``'s bytes, for taking their address (nothing writes)."""
    view = buf.view
    return view if not view.readonly else memoryview(bytearray(view))


def _persist(client: Client, metas: list[ObjectMeta]) -> list[int]:
    created = client.create_metadata(metas)
    ids = [int(meta.id) for meta in created]
    for object_id in ids:
        client.persist(ObjectID(object_id))
    return ids


EMPTY_BLOB = 0x8000000000000000
"""vineyard's ID of the one empty blob: never allocated, never freed."""


def lookup(client: Client, names: Sequence[str]) -> list[int | None]:
    """The object each name points to, ``None`` where a name is not there."""
    found: list[int | None] = []
    for name in names:
        try:
            found.append(int(client.get_name(name)))
        except MISSING:
            found.append(None)
    return found


def describe(client: Client, type_name: str, object_ids: Sequence[int]) -> list[Chunk | None]:
    """The chunk each object holds; ``None`` where the object is gone (deleted after its
    name was read) or is not a chunk."""
    ids = [ObjectID(i) for i in object_ids]
    try:
        metas = list(client.get_metas(ids))
    except MISSING:  # one of them is gone: ask one at a time
        metas = []
        for object_id in ids:
            try:
                metas.append(client.get_meta(object_id))
            except MISSING:
                metas.append(None)
    return [_chunk(type_name, meta) for meta in metas]


def _chunk(type_name: str, meta: ObjectMeta | None) -> Chunk | None:
    if meta is None or meta.typename != type_name:
        return None
    blob = meta["buffer"]  # the member's metadata: the blob itself is not mapped here
    return Chunk(int(meta.id), int(blob.id), int(meta["nbytes"]), int(meta.instance_id))
