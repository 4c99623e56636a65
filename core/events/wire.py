"""vLLM 0.32's KV event wire format, mirrored struct for struct.

These are msgspec structs with the names, field order, defaults and options of
``vllm/distributed/kv_events.py`` (vLLM 0.32), so that msgpack bytes are identical to
what vLLM's own publisher sends: an :class:`EventBatch` is an array ``[ts, events,
data_parallel_rank?]``; each event is a map tagged ``"type": "<class name>"`` whose
fields equal to their defaults are left out. The tests encode the same events with
vLLM's classes and compare bytes; update both when vLLM changes its structs.

A ZMQ message is three frames: topic, an 8-byte big-endian sequence number, and the
msgpack payload of one batch.
"""

from __future__ import annotations

from typing import Any, TypeAlias

from kvtier.core.errors import MissingExtraError

try:
    import msgspec
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise MissingExtraError("KV events", "events", exc) from exc

ExternalBlockHash: TypeAlias = "bytes | int"
"""A block hash on the wire: the digest's bytes, or an unsigned 64-bit integer."""

END_SEQ = (-1).to_bytes(8, "big", signed=True)
"""The sequence frame that ends a replay."""


class EventBatch(
    msgspec.Struct,
    array_like=True,
    omit_defaults=True,
    gc=False,
):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(
    msgspec.Struct,
    omit_defaults=True,
    gc=False,
    tag=True,
):
    """Base of the three events; the tag is the class name."""


class BlockStored(KVCacheEvent):
    """Blocks ``block_hashes`` (a chain: each one's parent is the one before, the
    first's is ``parent_block_hash``, ``None`` at the start of a sequence) now hold the
    KV of ``token_ids`` (``block_size`` tokens each) in ``medium``."""

    block_hashes: list[bytes | int]
    parent_block_hash: bytes | int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[tuple[Any, ...] | None] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None


class BlockRemoved(KVCacheEvent):
    """Blocks ``block_hashes`` left ``medium``."""

    block_hashes: list[bytes | int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    """Every block the publisher reported is gone."""


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


KVEvent: TypeAlias = "BlockStored | BlockRemoved | AllBlocksCleared"

_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(KVEventBatch)


def encode(batch: EventBatch) -> bytes:
    """msgpack bytes of ``batch``, as vLLM's publisher encodes it."""
    return _encoder.encode(batch)


def decode(payload: bytes) -> KVEventBatch:
    """The batch in ``payload``; ``msgspec.DecodeError`` for bytes that are not one."""
    return _decoder.decode(payload)
