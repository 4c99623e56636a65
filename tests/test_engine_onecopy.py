"""One copy each way: ``KVTier.retrieve_to`` hands each chunk to a sink (a zero-copy
view of the blob for the raw codec) and ``KVTier.begin_store`` lets the caller write
straight into the pooled blobs that are queued; over real cpu and file tiers, with a
corrupt blob, other codecs, the store queue's budget and the argument checks."""

from __future__ import annotations

import secrets
import threading
from pathlib import Path

import pytest
import torch
from test_engine import CHUNK, LAYOUT, config, open_kv, prompt

from kvtier.core.errors import ConfigError


def file_only(tmp_path: Path, **tier) -> dict:
    return {"chunk_tokens": CHUNK, "tiers": [{"url": f"file://{tmp_path}/kv", **tier}]}


class Collect:
    """A sink keeping a copy of each chunk it is handed, and the chunks' addresses."""

    def __init__(self) -> None:
        self.chunks: dict[int, torch.Tensor] = {}
        self.addresses: dict[int, int] = {}
        self.lock = threading.Lock()

    def __call__(self, first: int, chunk: torch.Tensor) -> None:
        with self.lock:
            assert first not in self.chunks, "a chunk is delivered once"
            self.chunks[first] = chunk.clone()
            self.addresses[first] = chunk.data_ptr()

    def assemble(self, start: int, end: int) -> torch.Tensor:
        return torch.cat([self.chunks[i] for i in range(start, end, CHUNK)], dim=2)


def test_retrieve_to_hands_over_the_blob_bytes_without_a_copy(tmp_path):
    tokens, kv = prompt(4 * CHUNK + 5)
    with open_kv(config(tmp_path)) as cache:
        cache.store(tokens, kv)
        cache.flush()
        first, second = Collect(), Collect()
        assert cache.retrieve_to(tokens, first) == 4 * CHUNK
        assert cache.retrieve_to(tokens, second, start=2 * CHUNK) == 4 * CHUNK
        assert torch.equal(first.assemble(0, 4 * CHUNK), kv[:, :, : 4 * CHUNK])
        assert sorted(second.chunks) == [2 * CHUNK, 3 * CHUNK]
        # The cpu tier's blobs themselves, not copies: the same memory each time.
        assert all(second.addresses[i] == first.addresses[i] for i in second.addresses)
        stats = cache.stats()
        assert stats.retrieves == 2 and stats.retrieve_hit_tokens == 4 * CHUNK + 2 * CHUNK
        # retrieve(out=...) still decodes into the caller's tensor
        out = torch.zeros(LAYOUT.chunk_shape(len(tokens)), dtype=LAYOUT.dtype)
        n, got = cache.retrieve(tokens, out=out)
        assert n == 4 * CHUNK and torch.equal(got, kv[:, :, :n])
        assert got.data_ptr() == out.data_ptr()


def test_retrieve_to_from_the_file_tier_promotes(tmp_path):
    tokens, kv = prompt(3 * CHUNK)
    with open_kv(config(tmp_path)) as cache:
        cache.store(tokens, kv)
    with open_kv(config(tmp_path)) as cache:  # a new process: the cpu tier is empty
        sink = Collect()
        assert cache.retrieve_to(tokens, sink, start=CHUNK) == 3 * CHUNK
        assert torch.equal(sink.assemble(CHUNK, 3 * CHUNK), kv[:, :, CHUNK:])
        cache.flush()
        assert cache.stats().tier("file").hits == 2
        again = Collect()
        assert cache.retrieve_to(tokens, again) == 3 * CHUNK
        assert cache.stats().tier("cpu").hits == 2, "promoted into the cpu tier"
        assert torch.equal(again.assemble(0, 3 * CHUNK), kv)


def test_other_codecs_deliver_decoded_chunks(tmp_path):
    tokens, kv = prompt(2 * CHUNK)
    cfg = file_only(tmp_path, capacity="64MiB", codec="int8+zstd")
    with open_kv(cfg) as cache:
        cache.store(tokens, kv)
    with open_kv(cfg) as cache:
        sink = Collect()
        assert cache.retrieve_to(tokens, sink) == 2 * CHUNK
        n, want = cache.retrieve(tokens)
        assert n == 2 * CHUNK and torch.equal(sink.assemble(0, n), want), "same as retrieve"


def test_a_corrupt_blob_never_reaches_the_sink(tmp_path):
    tokens, kv = prompt(3 * CHUNK)
    with open_kv(file_only(tmp_path, capacity="64MiB")) as cache:
        cache.store(tokens, kv)
        cache.flush()
        key1 = str(cache.hasher.keys(tokens)[1])
    (victim,) = (p for p in (tmp_path / "kv").rglob(key1) if p.is_file())
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x40  # in the payload
    victim.write_bytes(bytes(data))
    with open_kv(file_only(tmp_path, capacity="64MiB")) as cache:
        sink = Collect()
        assert cache.retrieve_to(tokens, sink) == CHUNK
        assert CHUNK not in sink.chunks, "the corrupt chunk was delivered"
        for first, chunk in sink.chunks.items():  # chunk 2 may come, past the run
            assert torch.equal(chunk, kv[:, :, first : first + CHUNK])
        assert cache.stats().tier("file").corrupt == 1
    assert not victim.exists(), "the corrupt blob was deleted"


def test_a_failing_sink_raises_and_bad_arguments_read_nothing(tmp_path):
    tokens, kv = prompt(2 * CHUNK)
    with open_kv(config(tmp_path)) as cache:
        cache.store(tokens, kv)
        cache.flush()

        def broken(first: int, chunk: torch.Tensor) -> None:
            raise RuntimeError(f"sink failed at {first}")

        with pytest.raises(RuntimeError, match="sink failed"):
            cache.retrieve_to(tokens, broken)
        with pytest.raises(ConfigError, match="sink must be callable"):
            cache.retrieve_to(tokens, None)  # type: ignore[arg-type]
        with pytest.raises(ConfigError, match="start must be a multiple"):
            cache.retrieve_to(tokens, Collect(), start=3)
        assert cache.retrieve_to(tokens, Collect()) == 2 * CHUNK, "nothing was deleted"


def test_begin_store_writes_in_place_and_commits(tmp_path):
    tokens, kv = prompt(3 * CHUNK + 4)
    cfg = config(tmp_path, store_partial_chunks=True)
    with open_kv(cfg) as cache:
        pending = cache.begin_store(tokens, start=CHUNK)
        bounds = [(a, b) for a, b, _ in pending.chunks]
        assert bounds == [(CHUNK, 2 * CHUNK), (2 * CHUNK, 3 * CHUNK), (3 * CHUNK, 3 * CHUNK + 4)]
        assert cache.stats().queue_bytes == (2 * CHUNK + 4) * LAYOUT.bytes_per_token()
        for first, end, chunk in pending.chunks:
            chunk.copy_(kv[:, :, first:end])
        assert pending.commit() == len(tokens) == pending.end
        with pytest.raises(ConfigError, match="already committed"):
            pending.commit()
        cache.flush()
        assert cache.stats().queue_bytes == 0
        assert cache.stats().tokens_stored == 2 * CHUNK + 4
        assert cache.lookup(tokens) == 0, "chunk 0 was never stored"
        cache.store(tokens[:CHUNK], kv[:, :, :CHUNK])
        cache.flush()
    with open_kv(cfg) as cache:  # read back from the file tier: sealed after the writes
        n, got = cache.retrieve(tokens)
        assert n == len(tokens) and torch.equal(got, kv)
        assert cache.stats().tier("file").corrupt == 0


def test_begin_store_budget_abort_and_queued_chunks(tmp_path):
    tokens, kv = prompt(4 * CHUNK)
    chunk_bytes = CHUNK * LAYOUT.bytes_per_token()
    with open_kv(config(tmp_path, store_queue_bytes=3 * chunk_bytes)) as cache:
        pending = cache.begin_store(tokens)
        assert pending.end == 3 * CHUNK and len(pending.chunks) == 3
        stats = cache.stats()
        assert stats.stores_dropped == 1 and stats.queue_bytes == 3 * chunk_bytes
        again = cache.begin_store(tokens[: 2 * CHUNK])
        assert again.end == 2 * CHUNK and again.chunks == [], "reserved: nothing to write"
        again.commit()
        pending.abort()
        pending.abort()  # once is enough
        stats = cache.stats()
        assert stats.queue_bytes == 0 and stats.stores_dropped == 1 and stats.stores_queued == 0
        cache.flush()
        assert cache.lookup(tokens) == 0, "aborted chunks are not written"

        with pytest.raises(RuntimeError, match="gather failed"), cache.begin_store(tokens) as p:
            p.chunks[0][2].copy_(kv[:, :, :CHUNK])
            raise RuntimeError("gather failed")
        assert cache.stats().queue_bytes == 0, "an exception aborts"
        with cache.begin_store(tokens[: 2 * CHUNK]) as p:
            for first, end, chunk in p.chunks:
                chunk.copy_(kv[:, :, first:end])
        cache.flush()
        n, got = cache.retrieve(tokens)
        assert n == 2 * CHUNK and torch.equal(got, kv[:, :, :n])
        with pytest.raises(ConfigError, match="start must be a multiple"):
            cache.begin_store(tokens, start=5)
        assert cache.stats().queue_bytes == 0


def test_retrieve_held_keeps_the_blobs_until_released(tmp_path):
    tokens, kv = prompt(3 * CHUNK)
    with open_kv(
        {"chunk_tokens": CHUNK, "tiers": [{"url": "cpu://", "capacity": "8MiB"}]}
    ) as cache:
        cache.store(tokens, kv)
        cache.flush()
        blobs = cache.chain.tiers[0].backend.store.blobs
        keys = [str(k) for k in cache.hasher.keys(tokens)]
        with cache.retrieve_held(tokens, start=CHUNK) as held:
            assert held.end == 3 * CHUNK and [f for f, _ in held.chunks] == [CHUNK, 2 * CHUNK]
            assert [blobs[k].refcount for k in keys] == [1, 2, 2], "the tier's own buffers"
            for first, chunk in held.chunks:
                assert torch.equal(chunk, kv[:, :, first : first + CHUNK])
        assert [blobs[k].refcount for k in keys] == [1, 1, 1]
        assert held.chunks == []
        del blobs[keys[1]]  # a gap: only the leading run is held, the rest let go
        with cache.retrieve_held(tokens) as held:
            assert held.end == CHUNK and [f for f, _ in held.chunks] == [0]
            assert blobs[keys[2]].refcount == 1 and blobs[keys[0]].refcount == 2


def test_retrieve_held_decodes_other_codecs_into_new_tensors(tmp_path):
    tokens, kv = prompt(2 * CHUNK)
    cfg = file_only(tmp_path, capacity="64MiB", codec="int8")
    with open_kv(cfg) as cache:
        cache.store(tokens, kv)
    with open_kv(cfg) as cache:
        n, want = cache.retrieve(tokens)
        with cache.retrieve_held(tokens) as held:
            assert held.end == n == 2 * CHUNK
            got = torch.cat([chunk for _, chunk in held.chunks], dim=2)
            assert torch.equal(got, want)
            assert held.chunks[0][1].data_ptr() != held.chunks[1][1].data_ptr()


def test_signed_blobs_written_in_place_verify_and_forged_ones_never_reach_a_sink(
    tmp_path, monkeypatch
):
    """With ``integrity:`` the blobs ``begin_store`` hands out are signed when written
    (after the caller filled them) and a blob forged on disk is never delivered."""
    monkeypatch.setenv("KVTEST_KEYS", secrets.token_hex(16))
    cfg = {**file_only(tmp_path, capacity="64MiB"), "integrity": {"keys_env": "KVTEST_KEYS"}}
    tokens, kv = prompt(2 * CHUNK)
    with open_kv(cfg) as cache, cache.begin_store(tokens) as pending:
        for first, end, chunk in pending.chunks:
            chunk.copy_(kv[:, :, first:end])
    with open_kv(cfg) as cache:
        sink = Collect()
        assert cache.retrieve_to(tokens, sink) == 2 * CHUNK
        assert torch.equal(sink.assemble(0, 2 * CHUNK), kv)
        key0 = str(cache.hasher.keys(tokens)[0])
    (victim,) = (p for p in (tmp_path / "kv").rglob(key0) if p.is_file())
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    with open_kv(cfg) as cache:
        sink = Collect()
        assert cache.retrieve_to(tokens, sink) == 0 and 0 not in sink.chunks
        assert cache.stats().tier("file").corrupt == 1
