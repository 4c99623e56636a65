"""The vLLM worker copies KV once each way with the raw codec: loads scatter the
blobs kvtier hands over straight into the paged cache, saves gather straight into
the pooled blobs kvtier queues. Counted on real tensors, without vLLM: every byte
``Tensor.copy_`` writes (the kernels' only way to move KV) while a worker step runs."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_vllm_connector import (
    BS,
    CHUNK,
    LAYOUT,
    NAMES,
    config,
    cpu_caches,
    prompt,
    run_step,
)

from kvtier.core import KVTier
from kvtier.core.codecs.raw import RawCodec
from kvtier.kernels import gather_paged
from kvtier.kernels.paged import PagedSlots
from kvtier.plugins.vllm.metadata import StepPlan, Transfer
from kvtier.plugins.vllm.worker import WorkerSide


class Copies:
    """Bytes written by ``Tensor.copy_`` in any thread, and calls of the raw codec."""

    def __init__(self) -> None:
        self.bytes = 0
        self.codec_calls = 0
        self.lock = threading.Lock()

    def reset(self) -> None:
        self.bytes = self.codec_calls = 0


@pytest.fixture
def copies(monkeypatch) -> Iterator[Copies]:
    seen = Copies()
    copy = torch.Tensor.copy_

    def counted_copy(self, src, non_blocking=False):
        with seen.lock:
            seen.bytes += self.numel() * self.element_size()
        return copy(self, src, non_blocking)

    def counted(method):
        def call(*args, **kwargs):
            with seen.lock:
                seen.codec_calls += 1
            return method(*args, **kwargs)

        return call

    monkeypatch.setattr(torch.Tensor, "copy_", counted_copy)
    monkeypatch.setattr(RawCodec, "encode_into", counted(RawCodec.encode_into))
    monkeypatch.setattr(RawCodec, "decode_into", counted(RawCodec.decode_into))
    yield seen


@pytest.mark.parametrize(
    ("layerwise", "blob_layout"),
    [(True, "chunk"), (False, "chunk"), (True, "layers")],
    ids=["layerwise", "whole", "streamed"],
)
@pytest.mark.parametrize("tier", ["cpu", "file"])
def test_raw_loads_and_saves_copy_once(
    tmp_path: Path, copies: Copies, tier: str, layerwise: bool, blob_layout: str
) -> None:
    cfg = {**config(tmp_path), "blob_layout": blob_layout}
    if tier == "file":
        del cfg["tiers"][0]
    tokens = prompt(3 * CHUNK + 5)
    nbytes = LAYOUT.bytes_per_token()
    with KVTier.open(cfg, model="tiny", layout=LAYOUT) as kv:
        src = cpu_caches(seed=7)
        saver = WorkerSide(kv, NAMES)
        saver.register(src, "CPU_ATTN")
        save = Transfer("w", tokens[: 3 * CHUNK], (), 0, 3 * CHUNK, [9, 2, 5, 0, 7, 1])
        copies.reset()
        run_step(saver, StepPlan(BS, saves=[save]))
        assert copies.bytes == 3 * CHUNK * nbytes, "saves: one gather into the blobs"
        assert copies.codec_calls == 0, "no copy through the raw codec"
        kv.flush()
        saver.close()

        dst = cpu_caches()
        loader = WorkerSide(kv, NAMES, layerwise=layerwise)
        loader.register(dst, "CPU_ATTN")
        load = Transfer("r", tokens[: 3 * CHUNK], (), BS, 3 * CHUNK, [0, 3, 4, 6, 8, 9])
        copies.reset()
        with torch.inference_mode():
            run_step(loader, StepPlan(BS, loads=[load]))
        assert loader.take_load_errors() == set()
        assert copies.bytes == (3 * CHUNK - BS) * nbytes, "loads: one scatter from the blobs"
        assert copies.codec_calls == 0, "no decode into a staging tensor"
        got = gather_paged([dst[n] for n in NAMES], load.slot_mapping(BS), "cpu")
        want = gather_paged([src[n] for n in NAMES], save.slot_mapping(BS)[BS:], "cpu")
        assert torch.equal(got, want)
        assert not dst[NAMES[0]][0].any(), "block 0 (vLLM's own) was not written"
        loader.close()


def test_a_step_that_fails_gives_back_the_store_queue(tmp_path: Path) -> None:
    with KVTier.open(config(tmp_path), model="tiny", layout=LAYOUT) as kv:
        worker = WorkerSide(kv, NAMES)
        worker.register(cpu_caches(seed=1), "CPU_ATTN")
        tokens = prompt(2 * CHUNK)
        plan = StepPlan(BS, saves=[Transfer("w", tokens, (), 0, 2 * CHUNK, [1, 2, 3, 4])])
        worker.save_layer(NAMES[0], plan)
        assert kv.stats().queue_bytes == 2 * CHUNK * LAYOUT.bytes_per_token()
        worker.close()  # vLLM shut down mid-step
        assert kv.stats().queue_bytes == 0
        kv.flush()
        assert kv.lookup(tokens) == 0, "half-gathered chunks are never written"


def two_chunk_load(
    kv: KVTier, tokens: list[int]
) -> tuple[dict[str, torch.Tensor], WorkerSide, Transfer, StepPlan]:
    """Empty caches, a worker on them, and a plan loading two chunks into blocks 5-8."""
    dst = cpu_caches()
    loader = WorkerSide(kv, NAMES)
    loader.register(dst, "CPU_ATTN")
    load = Transfer("r", tokens, (), 0, 2 * CHUNK, [5, 6, 7, 8])
    return dst, loader, load, StepPlan(BS, loads=[load])


def test_wait_layer_returns_once_its_layer_is_in_place(tmp_path: Path, monkeypatch) -> None:
    """Layer-wise: the forward may run layer 0 while layer 1 is still being copied."""
    with KVTier.open(config(tmp_path), model="tiny", layout=LAYOUT) as kv:
        tokens = prompt(2 * CHUNK)
        saver = WorkerSide(kv, NAMES)
        src = cpu_caches(seed=2)
        saver.register(src, "CPU_ATTN")
        run_step(saver, StepPlan(BS, saves=[Transfer("w", tokens, (), 0, 2 * CHUNK, [1, 2, 3, 4])]))
        kv.flush()
        gate = threading.Event()
        scatter = PagedSlots.scatter_layer

        def held_back(self, layer, src):
            if layer == 1:
                assert gate.wait(10), "the test never opened the gate"
            scatter(self, layer, src)

        monkeypatch.setattr(PagedSlots, "scatter_layer", held_back)
        dst, loader, load, plan = two_chunk_load(kv, tokens)
        with torch.inference_mode():
            loader.start_load(plan)
            loader.wait_layer(NAMES[0])  # returns although layer 1 is held back
            layer0 = gather_paged([dst[NAMES[0]]], load.slot_mapping(BS), "cpu")
            assert not dst[NAMES[1]].any(), "layer 1 is not copied yet"
            gate.set()
            for name in NAMES[1:]:
                loader.wait_layer(name)
            loader.finish_step(plan)
        assert loader.take_load_errors() == set()
        want = gather_paged(
            [src[n] for n in NAMES],
            Transfer("w", tokens, (), 0, 2 * CHUNK, [1, 2, 3, 4]).slot_mapping(BS),
            "cpu",
        )
        assert torch.equal(layer0, want[:1])
        assert torch.equal(
            gather_paged([dst[n] for n in NAMES], load.slot_mapping(BS), "cpu"), want
        )
        loader.close()
        saver.close()


def test_streamed_loads_hand_over_layer_0_before_layer_1_is_read(
    tmp_path: Path, monkeypatch
) -> None:
    """blob_layout: layers, from a file tier: the forward may run layer 0 while layer
    1's bytes are still on disk (their reads are held back until the test has seen
    layer 0 in place)."""
    cfg = {**config(tmp_path), "blob_layout": "layers"}
    del cfg["tiers"][0]
    with KVTier.open(cfg, model="tiny", layout=LAYOUT) as kv:
        tokens = prompt(2 * CHUNK)
        saver = WorkerSide(kv, NAMES)
        src = cpu_caches(seed=4)
        saver.register(src, "CPU_ATTN")
        save = Transfer("w", tokens, (), 0, 2 * CHUNK, [1, 2, 3, 4])
        run_step(saver, StepPlan(BS, saves=[save]))
        kv.flush()
        backend = kv.chain.tiers[0].backend
        read = backend.read_into_many
        gate, reached, offsets = threading.Event(), threading.Event(), []

        async def held_back(reads):
            offsets.append(sorted({offset for _, offset, _ in reads}))
            if len(offsets) == 4:  # head, tail, layer 0, then layer 1's sections
                reached.set()
                await asyncio.to_thread(gate.wait, 10)
            return await read(reads)

        monkeypatch.setattr(backend, "read_into_many", held_back)
        dst, loader, load, plan = two_chunk_load(kv, tokens)
        with torch.inference_mode():
            loader.start_load(plan)
            loader.wait_layer(NAMES[0])
            assert reached.wait(10), "layer 1's read never started"
            assert not dst[NAMES[1]].any(), "layer 1 is not in place yet"
            gate.set()
            for name in NAMES[1:]:
                loader.wait_layer(name)
            loader.finish_step(plan)
        assert offsets[2] < offsets[3], "layer 1's sections come after layer 0's"
        assert loader.take_load_errors() == set()
        want = gather_paged([src[n] for n in NAMES], save.slot_mapping(BS), "cpu")
        assert torch.equal(
            gather_paged([dst[n] for n in NAMES], load.slot_mapping(BS), "cpu"), want
        )
        loader.close()
        saver.close()
