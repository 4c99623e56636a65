"""KV events against vLLM 0.32 itself: kvtier's msgpack bytes equal those of vLLM's
classes, its ``sha256_cbor`` chunk hashes equal vLLM's block hashes, and events returned
through vLLM's KV-connector event API (``kvtier.plugins.events.vllm``) and sent by vLLM's
own ``ZmqEventPublisher`` let a consumer predict ``KVTier.lookup`` exactly."""

from __future__ import annotations

import random
import socket
from pathlib import Path
from typing import Any

import needs
import pytest

if not needs.HAS_VLLM:
    needs.missing_vllm()

import msgspec
from test_events import CHUNK, LAYOUT, VLLM_GOLDEN, golden_batch, kv_of, prompts
from vllm.distributed import kv_events as v
from vllm.utils.hashing import sha256_cbor
from vllm.v1.core import kv_cache_utils
from vllm.v1.outputs import KVConnectorOutput

from kvtier.core import KVTier
from kvtier.core.events import wire
from kvtier.core.events.index import PrefixIndex, Subscriber
from kvtier.plugins.events.vllm import SchedulerEvents, to_vllm, worker_events

pytestmark = pytest.mark.vllm
ENCODER = msgspec.msgpack.Encoder()
DECODER = msgspec.msgpack.Decoder(v.KVEventBatch)


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in msgspec.structs.fields(cls))


SAME_FIELDS = all(
    _fields(getattr(v, name)) == _fields(getattr(wire, name))
    for name in ("BlockStored", "BlockRemoved", "AllBlocksCleared")
)
"""The installed vLLM's event classes have exactly kvtier's fields (vLLM 0.32). Where
a later vLLM added fields (0.33.0: ``BlockStored.lookahead_token_ids``) its encoder
writes a wider map header, so only the decoded values can be compared."""


def test_vllms_extra_event_fields_are_optional() -> None:
    """A later vLLM may add fields (decoders ignore unknown ones); kvtier's events stay
    decodable by it only while every field it added has a default."""
    for name in ("BlockStored", "BlockRemoved", "AllBlocksCleared"):
        theirs = {f.name: f for f in msgspec.structs.fields(getattr(v, name))}
        mine = set(_fields(getattr(wire, name)))
        assert mine <= set(theirs), f"{name}: vLLM lacks {sorted(mine - set(theirs))}"
        required = [n for n, f in theirs.items() if n not in mine and f.required]
        assert not required, f"{name}: vLLM requires fields kvtier does not write: {required}"


def test_golden_batch_is_what_vllm_encodes() -> None:
    theirs = v.KVEventBatch(ts=1234.5, events=[to_vllm(e) for e in golden_batch().events])
    golden = bytes.fromhex(VLLM_GOLDEN)
    if SAME_FIELDS:
        assert ENCODER.encode(theirs) == golden
    assert DECODER.decode(golden) == theirs
    assert wire.decode(ENCODER.encode(theirs)) == golden_batch()


def random_event(rng: random.Random) -> Any:
    def h() -> bytes | int:
        return rng.randbytes(32) if rng.random() < 0.5 else rng.randrange(1 << 64)

    kind = rng.randrange(3)
    if kind == 0:
        n = rng.randrange(1, 4)
        return wire.BlockStored(
            block_hashes=[h() for _ in range(n)],
            parent_block_hash=rng.choice([None, h()]),
            token_ids=[rng.randrange(1 << 17) for _ in range(4 * n)],
            block_size=4,
            lora_id=rng.choice([None, 3]),
            medium=rng.choice([None, "cpu", "disk"]),
            lora_name=rng.choice([None, "adapter"]),
            extra_keys=rng.choice([None, [("salt",) for _ in range(n)]]),
            ownership=rng.choice([None, "redis://pool"]),
            group_idx=rng.choice([None, 0, 1]),
        )
    if kind == 1:
        return wire.BlockRemoved(
            block_hashes=[h()], medium=rng.choice([None, "file"]), ownership=rng.choice([None, "p"])
        )
    return wire.AllBlocksCleared()


def test_random_batches_encode_and_decode_as_vllm_does() -> None:
    rng = random.Random(13)
    for _ in range(200):
        events = [random_event(rng) for _ in range(rng.randrange(0, 5))]
        rank = rng.choice([None, 0, 2])
        mine = wire.KVEventBatch(ts=rng.random() * 1e9, events=events, data_parallel_rank=rank)
        theirs = v.KVEventBatch(
            ts=mine.ts, events=[to_vllm(e) for e in events], data_parallel_rank=rank
        )
        payload = wire.encode(mine)
        if SAME_FIELDS:
            assert payload == ENCODER.encode(theirs)
        assert DECODER.decode(payload) == theirs
        assert wire.decode(ENCODER.encode(theirs)) == mine


def test_sha256_cbor_chunk_hashes_are_vllms_block_hashes(tmp_path: Path) -> None:
    seed = kv_cache_utils.resolve_none_hash_seed(sha256_cbor)  # PYTHONHASHSEED or vLLM's
    kv_cache_utils.init_none_hash(sha256_cbor)
    tokens = prompts()[0]
    extra = [("alice",), None, None]  # e.g. a cache_salt on the first block, as vLLM does
    cfg = {
        "chunk_tokens": CHUNK,
        "hash": "sha256_cbor",
        "hash_seed": seed,
        "tiers": [{"url": "cpu://", "capacity": "1MiB"}],
        "events": {"publisher": "none"},
    }
    parent = None
    theirs = []
    for i in range(len(tokens) // CHUNK):
        block = tokens[i * CHUNK : (i + 1) * CHUNK]
        extra_i = extra[i] if i < len(extra) else None
        parent = kv_cache_utils.hash_block_tokens(sha256_cbor, parent, block, extra_i)
        theirs.append(bytes(parent))
    with KVTier.open(cfg, model="m", layout=LAYOUT) as kv:
        assert [k.digest for k in kv.hasher.keys(tokens, extra_keys=extra)] == theirs
        kv.store(tokens, kv_of(len(tokens), 0), extra_keys=extra)
        kv.flush()
        assert kv.events is not None
        (stored,) = kv.events.drain()
    assert isinstance(stored, wire.BlockStored)
    assert stored.block_hashes == theirs
    assert stored.extra_keys == [("alice",), None, None, None, None]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_events_through_vllms_connector_api_and_publisher(tmp_path: Path) -> None:
    """Two tensor-parallel ranks store the same prompts; vLLM combines their events,
    kvtier's scheduler side passes on those both reported, vLLM's publisher sends them."""
    cfg = {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": "cpu://", "capacity": 4 * LAYOUT.bytes_per_token() * CHUNK},
            {"url": f"file://{tmp_path / 'chunks'}", "capacity": "4MiB"},
        ],
        "events": {"publisher": "none", "media": "vllm-router"},
    }
    ranks = [KVTier.open(cfg, model="m", layout=LAYOUT, tp_rank=r, tp_size=2) for r in range(2)]
    endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    publisher = v.ZmqEventPublisher(
        data_parallel_rank=0, endpoint=endpoint, replay_endpoint=replay, topic="kv@pod@m"
    )
    sub = Subscriber(endpoint, replay, "kv@pod@m", DECODER.decode, PrefixIndex())
    scheduler = SchedulerEvents(workers=2)
    published = -1
    try:
        asked = prompts()
        for step, tokens in enumerate(asked[:4]):
            for r, kv in enumerate(ranks):
                if step == 3 and r == 1:
                    continue  # rank 1 is a step late with this one
                kv.store(tokens, kv_of(len(tokens), step))
                kv.flush()
            outputs = [worker_events(kv) for kv in ranks]
            combined = outputs[0]
            assert combined is not None
            if outputs[1] is not None:  # as vLLM's KVOutputAggregator combines workers
                combined.add_events(outputs[1].get_all_events())
                combined.increment_workers(1)
            scheduler.update(KVConnectorOutput(kv_cache_events=combined))
            events = scheduler.take()
            if events:
                publisher.publish(v.KVEventBatch(ts=float(step), events=events))
                published += 1
        sub.follow(published)
        check = asked[:3]  # rank 1 never stored the 4th prompt: not reported yet
        for tokens in check:
            assert sub.index.prefix(tokens) == min(kv.lookup(tokens) for kv in ranks)
        assert sub.index.prefix(asked[3]) < ranks[0].lookup(asked[3])
        ranks[1].store(asked[3], kv_of(len(asked[3]), 3))
        ranks[1].flush()
        late = worker_events(ranks[1])
        scheduler.update(KVConnectorOutput(kv_cache_events=late))
        publisher.publish(v.KVEventBatch(ts=9.0, events=scheduler.take()))
        sub.follow(published + 1)
        for tokens in asked:
            assert sub.index.prefix(tokens) == min(kv.lookup(tokens) for kv in ranks)
        media = {e.medium for b in sub.batches for e in b.events}
        assert media == {"host", "disk"}
    finally:
        publisher.shutdown()
        sub.close()
        for kv in ranks:
            kv.close()
