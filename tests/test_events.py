"""KV events: kvtier's tier events as vLLM 0.32 KV events, published over ZMQ.

A consumer that knows only the events (``PrefixIndex`` fed by a ``Subscriber`` on the
real sockets, decoding with vLLM's own ``KVEventBatch`` when vLLM is installed) must
predict exactly the prefix ``KVTier.lookup`` reports, after stores, evictions,
promotions and a restart. ``test_events_vllm.py`` checks the bytes against vLLM's
encoder and the hashes against vLLM's block hashes."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvtier.core import KVLayout, KVTier
from kvtier.core.errors import ConfigError
from kvtier.core.events import wire
from kvtier.core.events.config import EventsConfig
from kvtier.core.events.index import PrefixIndex, Subscriber
from kvtier.core.events.source import block_hashes

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float32)
CHUNK = 16
CHUNK_BYTES = LAYOUT.bytes_per_token() * CHUNK

# One batch encoded by vLLM 0.32's own classes and msgspec encoder (see
# test_events_vllm.py, which recomputes it): kvtier's structs must give these bytes.
VLLM_GOLDEN = (
    "93cb40934a00000000009389a474797065ab426c6f636b53746f726564ac626c6f636b5f6861736865"
    "7392c41001010101010101010101010101010101c41002020202020202020202020202020202b1706172"
    "656e745f626c6f636b5f68617368c0a9746f6b656e5f6964739401020304aa626c6f636b5f73697a6502"
    "a76c6f72615f6964c0a66d656469756da3637075a96c6f72615f6e616d65c0aa65787472615f6b657973"
    "9291a161c083a474797065ac426c6f636b52656d6f766564ac626c6f636b5f6861736865739105a66d65"
    "6469756da466696c6581a474797065b0416c6c426c6f636b73436c6561726564c0"
)


def golden_batch() -> wire.KVEventBatch:
    stored = wire.BlockStored(
        block_hashes=[b"\x01" * 16, b"\x02" * 16],
        parent_block_hash=None,
        token_ids=[1, 2, 3, 4],
        block_size=2,
        lora_id=None,
        medium="cpu",
        lora_name=None,
        extra_keys=[("a",), None],
    )
    removed = wire.BlockRemoved(block_hashes=[5], medium="file")
    return wire.KVEventBatch(ts=1234.5, events=[stored, removed, wire.AllBlocksCleared()])


def vllm_decoder() -> Callable[[bytes], Any]:
    """vLLM's own decoder when vLLM is installed, else kvtier's mirror of it."""
    try:
        import msgspec
        from vllm.distributed.kv_events import KVEventBatch
    except ImportError:
        return wire.decode
    decoder = msgspec.msgpack.Decoder(KVEventBatch)
    return decoder.decode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def kv_of(n: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(LAYOUT.chunk_shape(n), generator=gen)


def config(tmp_path: Path, **events: Any) -> dict[str, Any]:
    return {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": "cpu://", "capacity": 3 * CHUNK_BYTES},
            {"url": f"file://{tmp_path / 'chunks'}", "capacity": 40 * CHUNK_BYTES},
        ],
        "events": {
            "endpoint": "tcp://127.0.0.1:0",
            "replay_endpoint": "tcp://127.0.0.1:0",
            **events,
        },
    }


class Fleet:
    """One KVTier with a live subscriber indexing its events."""

    def __init__(self, cfg: dict[str, Any], index: PrefixIndex | None = None) -> None:
        self.kv = KVTier.open(cfg, model="m", layout=LAYOUT)
        events = self.kv.events
        assert events is not None and events.publisher is not None
        self.publisher = events.publisher
        self.sub_topic = events.topic
        self.sub = Subscriber(
            events.publisher.endpoint,
            events.publisher.replay_endpoint,
            events.topic,
            vllm_decoder(),
            index,
        )

    def sync(self) -> None:
        self.kv.flush()
        assert self.kv.events is not None
        self.kv.events.flush()
        self.sub.follow(self.publisher.last_seq)

    def close(self) -> None:
        self.kv.close()
        self.sub.follow(self.publisher.last_seq)
        self.sub.close()


@pytest.fixture
def fleets() -> Iterator[list[Fleet]]:
    made: list[Fleet] = []
    yield made
    for fleet in made:
        if not fleet.kv._closed:
            fleet.kv.close()
        fleet.sub.close() if not fleet.sub._sub.closed else None


def prompts() -> list[list[int]]:
    system = list(range(1000, 1000 + 2 * CHUNK))  # shared by every prompt
    out = []
    for user in range(5):
        out.append(system + [user * 100 + t for t in range(3 * CHUNK)] + [7])  # + partial
    return out


def check(fleet: Fleet, asked: list[list[int]]) -> None:
    for tokens in asked:
        assert fleet.sub.index.prefix(tokens) == fleet.kv.lookup(tokens), tokens[:40]


# -- the wire ---------------------------------------------------------------------


def test_batches_encode_as_vllm_does() -> None:
    assert wire.encode(golden_batch()).hex() == VLLM_GOLDEN
    back = wire.decode(bytes.fromhex(VLLM_GOLDEN))
    assert back == golden_batch()


def test_events_config_is_checked(tmp_path: Path) -> None:
    assert EventsConfig().endpoint.startswith("tcp://127.0.0.1:")
    with pytest.raises(ConfigError, match="ZMQ endpoint"):
        KVTier.open(config(tmp_path, endpoint="127.0.0.1:5557"), model="m", layout=LAYOUT)
    with pytest.raises(ConfigError, match="not in the chain"):
        KVTier.open(config(tmp_path, medium={"ssd": "disk"}), model="m", layout=LAYOUT)
    with pytest.raises(ConfigError, match="must divide chunk_tokens"):
        KVTier.open(config(tmp_path, block_size=5), model="m", layout=LAYOUT)


def test_an_endpoint_that_cannot_bind_is_a_clear_error(tmp_path: Path) -> None:
    port = free_port()
    cfg = config(tmp_path, endpoint=f"tcp://127.0.0.1:{port}")
    with KVTier.open(cfg, model="m", layout=LAYOUT) as first:
        with pytest.raises(ConfigError, match=rf"events.endpoint: cannot bind .*:{port}"):
            KVTier.open(cfg, model="m", layout=LAYOUT)
        first.store(prompts()[0], kv_of(len(prompts()[0]), 0))  # the first still works
        first.flush()
    with pytest.raises(ConfigError, match=r"events.endpoint: cannot bind"):
        KVTier.open(config(tmp_path, endpoint="tcp://192.0.2.1:1"), model="m", layout=LAYOUT)


def test_topic_names_instance_and_model(tmp_path: Path) -> None:
    cfg = config(tmp_path, instance="pod-7")
    with KVTier.open(cfg, model="org/llama", layout=LAYOUT) as kv:
        assert kv.events is not None
        assert kv.events.topic == "kv@pod-7@org/llama"
    cfg = config(tmp_path)
    with KVTier.open(cfg, model="m", layout=LAYOUT) as kv:
        assert kv.events is not None
        assert kv.events.topic == f"kv@{socket.gethostname()}@m"


# -- what a consumer learns ----------------------------------------------------------


def test_stored_chunks_are_one_chained_event_per_tier(tmp_path: Path, fleets: list[Fleet]) -> None:
    fleet = Fleet(config(tmp_path))
    fleets.append(fleet)
    tokens = prompts()[0]
    fleet.kv.store(tokens, kv_of(len(tokens), 1))
    fleet.sync()
    stored = [e for b in fleet.sub.batches for e in b.events]
    assert sorted(e.medium for e in stored if type(e).__name__ == "BlockStored") == [
        "cpu",
        "file",
    ]
    by_medium = {e.medium: e for e in stored if type(e).__name__ == "BlockStored"}
    file_event = by_medium["file"]
    keys = fleet.kv.hasher.keys(tokens)  # full chunks only: the partial one is not stored
    assert file_event.block_hashes == [k.digest for k in keys]
    assert file_event.parent_block_hash is None
    assert file_event.token_ids == tokens[: len(keys) * CHUNK]
    assert file_event.block_size == CHUNK
    # the cpu tier holds 3 chunks: it evicted the first ones as the rest came in
    removed = [e for e in stored if type(e).__name__ == "BlockRemoved"]
    assert {e.medium for e in removed} == {"cpu"}
    check(fleet, prompts())


def test_consumer_predicts_lookup_after_stores_evictions_and_restart(
    tmp_path: Path, fleets: list[Fleet]
) -> None:
    port, replay = free_port(), free_port()
    cfg = config(
        tmp_path, endpoint=f"tcp://127.0.0.1:{port}", replay_endpoint=f"tcp://127.0.0.1:{replay}"
    )
    cfg["tiers"][1]["capacity"] = 9 * CHUNK_BYTES  # the file tier evicts too
    asked = prompts()
    fleet = Fleet(cfg)
    fleets.append(fleet)
    for i, tokens in enumerate(asked[:3]):
        fleet.kv.store(tokens, kv_of(len(tokens), i))
        fleet.sync()
        check(fleet, asked)
    assert fleet.kv.stats().tier("file").evictions > 0
    assert fleet.kv.stats().tier("cpu").evictions > 0
    # a retrieve from the file tier promotes into cpu: reported as stored there
    seen = len(fleet.sub.batches)
    n, _ = fleet.kv.retrieve(asked[2])
    assert n == len(asked[2]) - 1
    fleet.sync()
    promoted = [e for b in fleet.sub.batches[seen:] for e in b.events if e.medium == "cpu"]
    assert "BlockStored" in {type(e).__name__ for e in promoted}
    check(fleet, asked)
    index = fleet.sub.index
    assert index.held("cpu") > 0
    fleet.close()  # the cpu tier's chunks go with the process: reported removed
    assert index.held("cpu") == 0

    again = Fleet(cfg, index)  # a restart: same file tier, same endpoints
    fleets.append(again)
    again.sync()
    check(again, asked)
    for i, tokens in enumerate(asked[3:]):
        again.kv.store(tokens, kv_of(len(tokens), 10 + i))
        again.sync()
        check(again, asked)


def test_block_size_splits_chunks_and_int_hashes(tmp_path: Path, fleets: list[Fleet]) -> None:
    fleet = Fleet(config(tmp_path, block_size=4, block_hashes="int"))
    fleets.append(fleet)
    asked = prompts()
    for i, tokens in enumerate(asked[:2]):
        fleet.kv.store(tokens, kv_of(len(tokens), i))
    fleet.sync()
    check(fleet, asked)
    stored = [e for b in fleet.sub.batches for e in b.events if type(e).__name__ == "BlockStored"]
    first = next(e for e in stored if e.medium == "file" and e.parent_block_hash is None)
    assert first.block_size == 4
    assert len(first.block_hashes) * 4 == len(first.token_ids)
    assert all(isinstance(h, int) and 0 <= h < 1 << 64 for h in first.block_hashes)
    digest = fleet.kv.hasher.keys(asked[0])[0].digest
    assert first.block_hashes[:4] == [int.from_bytes(h[:8], "big") for h in block_hashes(digest, 4)]
    assert first.block_hashes[3] == int.from_bytes(digest[:8], "big")


def test_media_for_vllm_router(tmp_path: Path) -> None:
    cfg = config(tmp_path, media="vllm-router", publisher="none")
    cfg["tiers"].append({"url": "redis://127.0.0.1:1/0", "name": "shared"})
    with KVTier.open(cfg, model="m", layout=LAYOUT) as kv:
        assert kv.events is not None and kv.events.publisher is None
        media = {name: (m.medium, m.ownership) for name, m in kv.events._media.items()}
    assert media == {
        "cpu": ("host", None),
        "file": ("disk", None),
        "shared": ("external", "redis://127.0.0.1:1/0"),
    }
    cfg["events"]["medium"] = {"file": "nvme"}
    cfg["events"]["ownership"] = {"file": "pool-a", "shared": ""}
    with KVTier.open(cfg, model="m", layout=LAYOUT) as kv:
        assert kv.events is not None
        media = {name: (m.medium, m.ownership) for name, m in kv.events._media.items()}
    assert media["file"] == ("nvme", "pool-a")
    assert media["shared"] == ("external", None)


def test_collected_events_without_a_publisher(tmp_path: Path) -> None:
    cfg = config(tmp_path, publisher="none")
    cfg["events"]["journal_chunks"] = 2
    cfg["tiers"][0]["capacity"] = 40 * CHUNK_BYTES
    tokens = prompts()[0]
    with KVTier.open(cfg, model="m", layout=LAYOUT) as kv:
        assert kv.events is not None
        kv.store(tokens, kv_of(len(tokens), 0))
        kv.flush()
        events = kv.events.drain()
        assert kv.events.drain() == []
        # only the last 2 chunks' tokens were remembered: 3 of 5 are unreported per tier
        assert kv.events.unreported == 2 * 3
        stored = [e for e in events if isinstance(e, wire.BlockStored)]
        assert {len(e.block_hashes) for e in stored} == {2}
        assert stored[0].parent_block_hash == kv.hasher.keys(tokens)[2].digest


def test_other_namespaces_are_not_reported(tmp_path: Path) -> None:
    cfg = config(tmp_path, publisher="none")
    other = {**cfg, "events": None}
    with (
        KVTier.open(cfg, model="m", layout=LAYOUT) as kv,
        KVTier.open(other, model="other", layout=LAYOUT) as kv2,
    ):
        tokens = prompts()[0]
        kv2.store(tokens, kv_of(len(tokens), 0))
        kv2.flush()
        assert kv.events is not None
        assert kv.events.drain() == []


def test_replay_sends_buffered_batches_from_a_sequence(tmp_path: Path, fleets: list[Fleet]) -> None:
    import zmq

    fleet = Fleet(config(tmp_path))
    fleets.append(fleet)
    # Each sync publishes at least one batch; how the publisher groups a store's
    # events into batches is up to its thread, so only the lower bound is known.
    for i, tokens in enumerate(prompts()[:3]):
        fleet.kv.store(tokens, kv_of(len(tokens), i))
        fleet.sync()
    last = fleet.publisher.last_seq
    assert last >= 2
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    try:
        assert fleet.publisher.replay_endpoint is not None
        dealer.connect(fleet.publisher.replay_endpoint)
        dealer.send_multipart([b"", b"short"])  # malformed: ignored
        dealer.send_multipart([b"", (1).to_bytes(8, "big")])
        seqs, topics = [], set()
        while dealer.poll(5000):
            _, topic, seq, payload = dealer.recv_multipart()
            number = int.from_bytes(seq, "big", signed=True)
            if number == -1:
                assert (topic, payload) == (b"", b"")
                break
            topics.add(topic)
            assert vllm_decoder()(payload).events
            seqs.append(number)
        assert seqs == list(range(1, last + 1))
        assert topics == {fleet.sub_topic.encode()}
    finally:
        dealer.close(linger=0)
        ctx.term()
