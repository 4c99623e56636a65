"""kvtier's vLLM connector without vLLM: the paged gather/scatter kernels on real
tensors of every backend layout, the scheduler-side plan and the worker-side copies
over a real KVTier (cpu and file tiers), the connector's settings, and the engine's
``start`` offset the connector relies on. ``test_vllm_e2e.py`` runs it in vLLM."""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvtier.core import KVLayout, KVTier
from kvtier.core.errors import ConfigError, MissingExtraError
from kvtier.kernels import (
    PagedLayout,
    gather_paged,
    gather_paged_layer,
    paged_view,
    scatter_paged,
    scatter_paged_layer,
)
from kvtier.plugins.vllm import shared
from kvtier.plugins.vllm.lookup import LocalLookups, tier_limits
from kvtier.plugins.vllm.metadata import StepPlan, Transfer
from kvtier.plugins.vllm.scheduler import Scheduled, SchedulerSide
from kvtier.plugins.vllm.settings import load_settings
from kvtier.plugins.vllm.worker import WorkerSide, layout_for_backend

NB, BS, H, D, L = 10, 16, 2, 8, 3  # blocks, block size, kv heads, head dim, layers

# -- paged gather / scatter -----------------------------------------------------------


def make_cache(layout: PagedLayout, gen: torch.Generator) -> torch.Tensor:
    """A random cache of ``layout``; KV_CONCAT gets vLLM 0.32's NHD stride order."""
    if layout is PagedLayout.FLASH_ATTN:
        return torch.randn(2, NB, BS, H, D, generator=gen)
    if layout is PagedLayout.FLASHINFER:
        return torch.randn(NB, 2, BS, H, D, generator=gen)
    if layout is PagedLayout.CPU:
        return torch.randn(NB, H, BS, 2 * D, generator=gen)
    return torch.randn(NB, BS, H, 2 * D, generator=gen).transpose(1, 2)  # logical (B, H, N, C)


def reference_kv(cache: torch.Tensor, layout: PagedLayout, slot: int) -> torch.Tensor:
    """``[2, H, D]`` of one slot, indexed the way each vLLM backend reads it."""
    b, o = divmod(slot, BS)
    if layout is PagedLayout.FLASH_ATTN:
        return torch.stack([cache[0, b, o], cache[1, b, o]])
    if layout is PagedLayout.FLASHINFER:
        return torch.stack([cache[b, 0, o], cache[b, 1, o]])
    if layout is PagedLayout.CPU:  # CPU_ATTN: view (B, H, 2 * N, D), chunk(2, dim=2)
        rows = cache.reshape(NB, H, 2 * BS, D)
        return torch.stack([rows[b, :, o], rows[b, :, BS + o]])
    return torch.stack([cache[b, :, o, :D], cache[b, :, o, D:]])


def reference_gather(caches, layout, slots) -> torch.Tensor:
    return torch.stack(
        [torch.stack([reference_kv(c, layout, s) for s in slots], dim=1) for c in caches]
    )


SLOTS = [
    *range(3 * BS, 5 * BS),  # two whole blocks
    *range(7 * BS + 5, 7 * BS + 11),  # part of a block
    *range(BS - 3, BS + 2),  # across a block boundary
    9 * BS + 15,  # the last slot
    0,  # the first slot
]


@pytest.mark.parametrize("layout", list(PagedLayout))
def test_gather_matches_the_backends_indexing(layout):
    gen = torch.Generator().manual_seed(1)
    caches = [make_cache(layout, gen) for _ in range(L)]
    slots = torch.tensor(SLOTS)
    chunk = gather_paged(caches, slots, layout)
    assert chunk.shape == (L, 2, len(SLOTS), H, D)
    assert torch.equal(chunk, reference_gather(caches, layout, SLOTS))
    for layer in range(L):
        out = torch.full((2, len(SLOTS), H, D), float("nan"))
        assert gather_paged_layer(caches[layer], slots, layout, out=out) is out
        assert torch.equal(out, chunk[layer])


@pytest.mark.parametrize("layout", list(PagedLayout))
def test_scatter_writes_exactly_the_slots(layout):
    gen = torch.Generator().manual_seed(2)
    caches = [make_cache(layout, gen) for _ in range(L)]
    before = [c.clone() for c in caches]
    chunk = torch.randn(L, 2, len(SLOTS), H, D, generator=gen)
    scatter_paged(chunk, caches, torch.tensor(SLOTS), layout)
    assert torch.equal(reference_gather(caches, layout, SLOTS), chunk)
    others = [s for s in range(NB * BS) if s not in SLOTS]
    assert torch.equal(
        reference_gather(caches, layout, others), reference_gather(before, layout, others)
    )
    fresh = [c.clone() for c in before]
    for layer in range(L):
        scatter_paged_layer(chunk[layer], fresh[layer], torch.tensor(SLOTS), layout)
    assert all(torch.equal(a, b) for a, b in zip(fresh, caches, strict=True))


def test_cpu_view_shares_memory_with_the_cache():
    cache = torch.zeros(NB, H, BS, 2 * D)
    view = paged_view(cache, "cpu")
    assert view.shape == (2, NB, BS, H, D)
    view[1, 4, 3, 1] = 7.0  # value of slot 4 * BS + 3, head 1
    assert torch.equal(cache.reshape(NB, H, 2 * BS, D)[4, 1, BS + 3], torch.full((D,), 7.0))


@pytest.mark.parametrize(
    ("slots", "message"),
    [
        ([0, NB * BS], "outside the cache"),
        ([-1, 3], "outside the cache"),
        ([[1, 2]], "1-D"),
    ],
)
def test_bad_slots_are_rejected_before_any_write(slots, message):
    caches = [torch.zeros(NB, H, BS, 2 * D) for _ in range(L)]
    chunk = torch.ones(L, 2, 2, H, D)
    with pytest.raises(ConfigError, match=message):
        scatter_paged(chunk, caches, torch.tensor(slots), PagedLayout.CPU)
    assert all(not c.any() for c in caches)


def test_bad_shapes_and_layouts_are_clear_errors():
    caches = [torch.zeros(NB, H, BS, 2 * D) for _ in range(L)]
    slots = torch.tensor([1, 2])
    with pytest.raises(ConfigError, match="slot_mapping must be a 1-D int32 or int64"):
        gather_paged(caches, slots.float(), "cpu")
    with pytest.raises(ConfigError, match=r"\[num_layers, 2, tokens, kv_heads, head_dim\]"):
        scatter_paged(torch.zeros(L, 2, 3, H, D), caches, slots, "cpu")
    with pytest.raises(ConfigError, match="layer 1"):
        gather_paged([caches[0], torch.zeros(NB, H, BS, 4 * D)], slots, "cpu")
    with pytest.raises(ConfigError, match="not in the 'flash_attn' layout"):
        gather_paged(caches, slots, "flash_attn")
    with pytest.raises(ConfigError, match="not in the 'cpu' layout"):
        gather_paged([c.transpose(1, 2) for c in caches], slots, "cpu")
    with pytest.raises(ConfigError, match="unknown paged KV layout 'nhd'"):
        gather_paged(caches, slots, "nhd")


def test_layout_follows_the_attention_backend():
    assert layout_for_backend("CPU_ATTN", 4) is PagedLayout.CPU
    assert layout_for_backend("FLASH_ATTN", 4) is PagedLayout.KV_CONCAT
    assert layout_for_backend("FLASH_ATTN", 5) is PagedLayout.FLASH_ATTN
    assert layout_for_backend("FLASHINFER", 5) is PagedLayout.FLASHINFER
    with pytest.raises(ConfigError, match="FLASHMLA"):
        layout_for_backend("FLASHMLA", 3)


# -- the engine's start offset --------------------------------------------------------

LAYOUT = KVLayout(num_layers=L, num_kv_heads=H, head_dim=D, dtype=torch.float32)
CHUNK = 2 * BS


def config(tmp_path: Path) -> dict:
    return {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": "cpu://", "capacity": "16MiB"},
            {"url": f"file://{tmp_path}/kv", "capacity": "64MiB"},
        ],
    }


@pytest.fixture
def kv(tmp_path):
    with KVTier.open(config(tmp_path), model="tiny", layout=LAYOUT) as cache:
        yield cache


def test_store_and_retrieve_from_a_chunk_offset(kv):
    tokens = list(range(4 * CHUNK + 5))
    data = torch.randn(LAYOUT.chunk_shape(4 * CHUNK))
    assert kv.store(tokens[: 4 * CHUNK], data[:, :, CHUNK:], start=CHUNK) == 4 * CHUNK
    kv.flush()
    assert kv.lookup(tokens) == 0, "chunk 0 was never stored"
    n, got = kv.retrieve(tokens, start=CHUNK)
    assert n == 4 * CHUNK and torch.equal(got, data[:, :, CHUNK:])
    out = torch.zeros(LAYOUT.chunk_shape(5 * CHUNK))
    n, got = kv.retrieve(tokens, start=2 * CHUNK, out=out[:, :, 7:])
    assert n == 4 * CHUNK and torch.equal(got, data[:, :, 2 * CHUNK :])
    assert kv.retrieve(tokens, start=0)[0] == 0
    with pytest.raises(ConfigError, match="multiple of chunk_tokens"):
        kv.retrieve(tokens, start=CHUNK + 1)
    with pytest.raises(ConfigError, match="multiple of chunk_tokens"):
        kv.store(tokens[:CHUNK], data[:, :, :0], start=2 * CHUNK)


# -- scheduler side -------------------------------------------------------------------


def prompt(n: int, seed: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 30_000, (n,), generator=gen).tolist()


def put(kv: KVTier, tokens: list[int], extra=()) -> None:
    end = len(tokens) - len(tokens) % CHUNK
    kv.store(tokens[:end], torch.randn(LAYOUT.chunk_shape(end)), extra_keys=extra)
    kv.flush()


def scheduler(kv: KVTier, wait: float = 10.0) -> SchedulerSide:
    """A scheduler side looking up in ``kv``, waiting long enough to always answer."""
    return SchedulerSide(LocalLookups(kv), chunk_tokens=CHUNK, block_size=BS, wait=wait)


def test_match_claims_whole_chunks_but_never_the_last_token(kv):
    sched = scheduler(kv)
    tokens = prompt(3 * CHUNK)
    put(kv, tokens)
    hits = kv.stats().tier("cpu").hits
    assert sched.match("a", tokens, (), 0) == 3 * CHUNK - 1, "the last token is computed"
    assert not sched.is_async("a"), "a load inside the step"
    assert sched.match("b", [*tokens, 1], (), 0) == 3 * CHUNK
    assert sched.match("c", tokens[: CHUNK + 7], (), 0) == CHUNK
    assert sched.match("d", [*tokens, 1], (), 2 * BS) == 3 * CHUNK - 2 * BS, "beyond local hit"
    assert sched.match("e", [*tokens, 1], (), 3 * CHUNK) == 0
    assert sched.match("f", [*tokens, 1], (("cache_salt", "x"),), 0) == 0, "salted"
    stats = kv.stats().tier("cpu")
    assert (stats.hits, stats.misses) == (hits, 0), "lookups moved counters"


def test_hit_sources_split_a_hit_into_the_cpu_tier_and_the_rest(kv):
    sched = scheduler(kv)
    tokens = [*prompt(3 * CHUNK), 1]
    put(kv, tokens)
    assert sched.match("all-cpu", tokens, (), BS) == 3 * CHUNK - BS
    assert sched.hit_sources("all-cpu", 3 * CHUNK - BS) == (3 * CHUNK - BS, 0)
    assert sched.match("beyond-local", tokens, (), 2 * CHUNK) == CHUNK
    assert sched.hit_sources("beyond-local", CHUNK) == (CHUNK, 0)
    later = kv.hasher.key_strings(tokens, partial=False)[1:]
    kv._io.run(kv.chain.tiers[0].backend.delete_many(later))  # chunks 1-2: file only
    # (the answer is the tiers' state before the prefetch this lookup starts)
    assert sched.match("mixed", tokens, (), BS) == 3 * CHUNK - BS
    assert sched.hit_sources("mixed", 3 * CHUNK - BS) == (CHUNK - BS, 2 * CHUNK)
    assert sched.hit_sources("unknown", 5) == (0, 5), "a request never matched: not cpu"


def test_the_lookup_does_not_prefetch_what_vllm_holds(kv):
    sched = scheduler(kv)
    tokens = [*prompt(3 * CHUNK), 1]
    put(kv, tokens)
    keys = kv.hasher.key_strings(tokens, partial=False)
    kv._io.run(kv.chain.tiers[0].backend.delete_many(keys))  # only in the file tier
    assert sched.match("r", tokens, (), 2 * CHUNK) == CHUNK  # vLLM holds chunks 0-1
    kv.flush()
    assert kv.stats().prefetched == 1, "chunk 2 only"


def test_chunk_size_must_be_whole_blocks(kv):
    with pytest.raises(ConfigError, match=r"multiple of vLLM's block size \(48\)"):
        SchedulerSide(LocalLookups(kv), chunk_tokens=CHUNK, block_size=48)


def step(req, blocks, computed, scheduled, replace=False):
    return Scheduled(req, blocks, replace, computed, scheduled)


def test_plan_loads_the_hit_and_saves_each_chunk_once(kv):
    sched = scheduler(kv)
    tokens = prompt(3 * CHUNK + 10)
    put(kv, tokens[:CHUNK])
    blocks = list(range(1, 8))  # 3 * CHUNK + 10 tokens need 7 blocks of 16
    assert sched.match("r", tokens, (), BS) == CHUNK - BS  # vLLM holds block 0
    sched.allocated("r", tokens, (), blocks, CHUNK - BS)
    # chunked prefill: 20 tokens past the hit this step, the rest in the next
    plan = sched.build([step("r", blocks, CHUNK, 20, replace=True)])
    (load,) = plan.loads
    assert (load.start, load.end, load.block_ids) == (BS, CHUNK, blocks[:2])
    assert load.token_ids == tokens[:CHUNK]
    assert plan.saves == [], "chunk 1 is not complete yet"
    plan = sched.build([step("r", [], CHUNK + 20, 2 * CHUNK - 10)])
    (save,) = plan.saves
    assert (save.start, save.end, save.block_ids) == (CHUNK, 3 * CHUNK, blocks[:6])
    assert save.token_ids == tokens[: 3 * CHUNK] and plan.loads == []
    assert sched.build([step("r", [8], 3 * CHUNK + 10, 1)]).saves == []
    sched.finished("r")
    assert sched.num_requests == 0
    assert sched.build([step("r", [], 3 * CHUNK + 11, 1)]) == StepPlan(BS)


def test_a_whole_prompt_hit_loads_its_last_chunk_but_for_the_last_token(kv):
    sched = scheduler(kv)
    tokens = prompt(2 * CHUNK)
    put(kv, tokens)
    blocks = [1, 2, 3, 4]
    assert sched.match("r", tokens, (), BS) == 2 * CHUNK - 1 - BS
    sched.allocated("r", tokens, (), blocks, 2 * CHUNK - 1 - BS)
    plan = sched.build([step("r", blocks, 2 * CHUNK - 1, 1, replace=True)])
    (load,) = plan.loads
    assert (load.start, load.end, load.block_ids) == (BS, 2 * CHUNK - 1, blocks)
    assert load.token_ids == tokens, "keyed by the whole last chunk"
    assert plan.saves == [], "kvtier holds the last chunk already"
    tokens.append(7)
    assert sched.build([step("r", [], 2 * CHUNK, 1)]).saves == []


def test_decoded_tokens_are_saved_when_they_complete_a_chunk(kv):
    sched = scheduler(kv)
    tokens = prompt(CHUNK - 1)
    sched.match("r", tokens, (), 0)
    sched.allocated("r", tokens, (), [1, 2], 0)
    assert sched.build([step("r", [1, 2], 0, CHUNK - 1, replace=True)]).saves == []
    tokens.append(5)  # vLLM appends the sampled token to the live list
    (save,) = sched.build([step("r", [], CHUNK - 1, 1)]).saves
    assert (save.start, save.end) == (0, CHUNK)


def test_a_resumed_request_replaces_its_blocks(kv):
    sched = scheduler(kv)
    tokens = prompt(CHUNK + 3)
    sched.match("r", tokens, (), 0)
    sched.allocated("r", tokens, (), [1], 0)
    sched.build([step("r", [1], 0, BS, replace=True)])
    (save,) = sched.build([step("r", [5, 6, 7], 0, CHUNK + 3, replace=True)]).saves
    assert save.block_ids == [5, 6]


def test_failed_loads_are_saved_again_once_recomputed(kv):
    sched = scheduler(kv)
    tokens = prompt(3 * CHUNK + 1)
    put(kv, tokens)
    blocks = list(range(20, 27))
    assert sched.match("r", tokens, (), 0) == 3 * CHUNK
    sched.allocated("r", tokens, (), blocks, 3 * CHUNK)
    sched.build([step("r", blocks, 3 * CHUNK, 1, replace=True)])
    sched.load_failed({blocks[3]})  # block 3 lies in chunk 1
    sched.step_done()
    # vLLM truncates to block 3 and recomputes from there
    (save,) = sched.build([step("r", [], 3 * BS, 3 * CHUNK - 3 * BS + 1)]).saves
    assert (save.start, save.end) == (CHUNK, 3 * CHUNK)


def test_state_of_unscheduled_and_finished_requests_is_dropped(kv):
    sched = scheduler(kv)
    for i in range(5):
        sched.match(f"r{i}", prompt(CHUNK + 1, i), (), 0)
    for i in range(5):
        sched.finished(f"r{i}")
    sched.finished("never-seen")
    assert sched.num_requests == 0


def test_transfer_slots_and_blocks():
    t = Transfer("r", [], (), start=BS + 2, end=3 * BS + 1, block_ids=[9, 4, 7, 2])
    slots = t.slot_mapping(BS).tolist()
    assert slots[0] == 4 * BS + 2 and slots[BS - 3] == 4 * BS + BS - 1
    assert slots[BS - 2] == 7 * BS and slots[-1] == 2 * BS
    assert t.blocks_from(2 * BS, BS) == {7, 2}
    assert t.blocks_from(0, BS) == {4, 7, 2}


# -- worker side ----------------------------------------------------------------------


NAMES = [f"layers.{i}.attn" for i in range(L)]


def cpu_caches(seed: int | None = None) -> dict[str, torch.Tensor]:
    """One CPU_ATTN cache per layer: random for a seed, else zeros."""
    gen = torch.Generator().manual_seed(seed or 0)
    shape = (NB, H, BS, 2 * D)
    return {
        name: torch.randn(shape, generator=gen) if seed is not None else torch.zeros(shape)
        for name in NAMES
    }


def run_step(worker: WorkerSide, plan: StepPlan, wait: bool = True) -> None:
    """What vLLM does in one forward: load, then per layer wait, attention, save."""
    worker.start_load(plan)
    for name in NAMES:
        if wait:
            worker.wait_layer(name)
        worker.save_layer(name, plan)
    worker.finish_step(plan)


def test_saved_kv_loads_into_another_cache_bit_exact(kv):
    tokens = prompt(2 * CHUNK + 3)
    src = cpu_caches(seed=3)
    saver = WorkerSide(kv, NAMES)
    saver.register(src, "CPU_ATTN")
    save = Transfer("r", tokens[: 2 * CHUNK], (), 0, 2 * CHUNK, [2, 9, 4, 1])
    run_step(saver, StepPlan(BS, saves=[save]))
    kv.flush()
    assert saver.totals["save_tokens"] == 2 * CHUNK and kv.lookup(tokens) == 2 * CHUNK

    dst = cpu_caches()
    loader = WorkerSide(kv, NAMES)
    loader.register(dst, "CPU_ATTN")
    # vLLM holds block 0 locally: the load starts mid-chunk, at token BS
    load = Transfer("s", tokens[: 2 * CHUNK], (), BS, 2 * CHUNK, [0, 5, 6, 8])
    with torch.inference_mode():  # vLLM runs the forward in inference mode
        run_step(loader, StepPlan(BS, loads=[load]))
    assert loader.take_load_errors() == set()
    src_slots = save.slot_mapping(BS)[BS:]
    got = gather_paged([dst[n] for n in NAMES], load.slot_mapping(BS), "cpu")
    want = gather_paged([src[n] for n in NAMES], src_slots, "cpu")
    assert torch.equal(got, want)
    assert not dst[NAMES[0]][0].any(), "block 0 (vLLM's own) was overwritten"
    stats = loader.take_stats()
    assert stats is not None and stats["load_tokens"] == 2 * CHUNK - BS
    assert stats["load_bytes"] == (2 * CHUNK - BS) * LAYOUT.bytes_per_token()
    assert loader.take_stats() is None


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs Linux thread affinity and two CPUs",
)
def test_a_worker_bound_to_one_core_loads_in_threads_on_the_kvtiers_cpus(kv):
    """vLLM's CPU backend binds the worker's main thread to one core; the connector's
    load threads, started by its calls, run where the KVTier's threads run."""
    tokens = prompt(2 * CHUNK)
    done: dict[str, object] = {}

    def vllm_main_thread() -> None:
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        worker = WorkerSide(kv, NAMES)
        worker.register(cpu_caches(seed=1), "CPU_ATTN")
        run_step(
            worker, StepPlan(BS, saves=[Transfer("r", tokens, (), 0, 2 * CHUNK, [2, 9, 4, 1])])
        )
        kv.flush()
        worker.register(cpu_caches(), "CPU_ATTN")
        with torch.inference_mode():
            run_step(
                worker, StepPlan(BS, loads=[Transfer("s", tokens, (), 0, 2 * CHUNK, [0, 5, 6, 8])])
            )
        done["loaded"] = worker.take_stats()
        done["cpus"] = {
            t.name: os.sched_getaffinity(t.native_id)
            for t in threading.enumerate()
            if t.name.startswith("kvtier-vllm-load")
        }

    thread = threading.Thread(target=vllm_main_thread)
    thread.start()
    thread.join()
    assert done["loaded"] and done["loaded"]["load_tokens"] == 2 * CHUNK
    assert done["cpus"] and set(map(frozenset, done["cpus"].values())) == {kv.thread_cpus}


def test_a_load_ending_inside_a_chunk_writes_only_its_tokens(kv):
    tokens = prompt(2 * CHUNK)
    src = cpu_caches(seed=5)
    saver = WorkerSide(kv, NAMES)
    saver.register(src, "CPU_ATTN")
    blocks = [2, 9, 4, 1]
    run_step(saver, StepPlan(BS, saves=[Transfer("r", tokens, (), 0, 2 * CHUNK, blocks)]))
    kv.flush()

    dst = cpu_caches()
    loader = WorkerSide(kv, NAMES)
    loader.register(dst, "CPU_ATTN")
    load = Transfer("s", tokens, (), 0, 2 * CHUNK - 1, [0, 5, 6, 8])
    run_step(loader, StepPlan(BS, loads=[load]))
    assert loader.take_load_errors() == set()
    got = gather_paged([dst[n] for n in NAMES], load.slot_mapping(BS), "cpu")
    src_slots = Transfer("r", [], (), 0, 2 * CHUNK - 1, blocks).slot_mapping(BS)
    assert torch.equal(got, gather_paged([src[n] for n in NAMES], src_slots, "cpu"))
    last = torch.tensor([8 * BS + BS - 1])  # the last token's slot: vLLM computes it
    assert not gather_paged([dst[n] for n in NAMES], last, "cpu").any()
    stats = loader.take_stats()
    assert stats is not None and stats["load_tokens"] == 2 * CHUNK - 1


def test_loads_from_slow_tiers_run_between_steps(tmp_path):
    """``auto``: a hit partly outside the worker's cpu tier is loaded asynchronously
    (vLLM's ``load_kv_async``): planned at allocation, fetched and scattered in the
    background, reported by ``take_received`` with its errors in the same step."""
    cpu = {"url": "cpu://", "capacity": "16MiB"}
    file = {"url": f"file://{tmp_path}/kv", "capacity": "64MiB"}
    with KVTier.open({"chunk_tokens": CHUNK, "tiers": [cpu, file]}, model="t", layout=LAYOUT) as kv:
        sched = scheduler(kv)
        tokens = prompt(3 * CHUNK + 1)
        src = cpu_caches(seed=5)
        saver = WorkerSide(kv, NAMES)
        saver.register(src, "CPU_ATTN")
        blocks = list(range(1, 7))
        run_step(
            saver,
            StepPlan(BS, saves=[Transfer("w", tokens[: 3 * CHUNK], (), 0, 3 * CHUNK, blocks)]),
        )
        kv.flush()
        assert sched.match("fast", tokens, (), 0) == 3 * CHUNK
        assert not sched.is_async("fast"), "all in the cpu tier: loaded inside the step"
        kv.chain.tiers[0].backend.store.blobs.clear()
        assert sched.match("slow", tokens, (), 0) == 3 * CHUNK and sched.is_async("slow")
        dst_blocks = [7, 8, 9, 0, 2, 3]
        sched.allocated("slow", tokens, (), dst_blocks, 3 * CHUNK)
        plan = sched.build([])  # the request is not scheduled while it loads
        (load,) = plan.async_loads
        assert plan.loads == [] and (load.start, load.end) == (0, 3 * CHUNK)

        dst = cpu_caches()
        loader = WorkerSide(kv, NAMES)
        loader.register(dst, "CPU_ATTN")
        with torch.inference_mode():
            run_step(loader, plan)
        deadline = time.monotonic() + 10
        received: set[str] = set()
        while not received and time.monotonic() < deadline:
            received = loader.take_received()
            time.sleep(0.01)
        assert received == {"slow"} and loader.take_load_errors() == set()
        got = gather_paged([dst[n] for n in NAMES], load.slot_mapping(BS), "cpu")
        want = gather_paged(
            [src[n] for n in NAMES],
            Transfer("w", [], (), 0, 3 * CHUNK, blocks).slot_mapping(BS),
            "cpu",
        )
        assert torch.equal(got, want)
        assert loader.totals["load_tokens"] == 3 * CHUNK
        sched.load_failed(set())
        sched.step_done({"slow"})
        plan = sched.build([step("slow", dst_blocks, 3 * CHUNK, 1, replace=True)])
        assert plan.saves == [] and plan.loads == [], "loaded chunks are not saved again"

        missing = Transfer("m", prompt(CHUNK, seed=9), (), 0, CHUNK, [4, 5])
        loader.start_load(StepPlan(BS, async_loads=[missing]))
        deadline = time.monotonic() + 10
        while not (received := loader.take_received()) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert received == {"m"} and loader.take_load_errors() == {4, 5}
        loader.close()
        saver.close()


def test_missing_and_corrupt_chunks_become_load_errors(tmp_path):
    cfg = {"chunk_tokens": CHUNK, "tiers": [{"url": f"file://{tmp_path}", "capacity": "64MiB"}]}
    with KVTier.open(cfg, model="tiny", layout=LAYOUT) as kv:
        tokens = prompt(3 * CHUNK)
        put(kv, tokens)
        (path,) = tmp_path.rglob(str(kv.hasher.keys(tokens)[1]))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
        worker = WorkerSide(kv, NAMES)
        worker.register(cpu_caches(), "CPU_ATTN")
        blocks = list(range(1, 7))
        run_step(worker, StepPlan(BS, loads=[Transfer("r", tokens, (), 0, 3 * CHUNK, blocks)]))
        assert worker.take_load_errors() == set(blocks[2:]), "chunk 1 and after"
        assert worker.take_load_errors() == set()
        assert kv.stats().tier("file").corrupt == 1
        assert worker.totals["load_tokens"] == CHUNK
        missing = Transfer("s", prompt(CHUNK, seed=9), (), 0, CHUNK, [8, 9])
        run_step(worker, StepPlan(BS, loads=[missing]))
        assert worker.take_load_errors() == {8, 9}


def test_a_layer_the_forward_did_not_wait_for_is_a_load_error(kv):
    tokens = prompt(CHUNK + 1)
    put(kv, tokens)
    worker = WorkerSide(kv, NAMES)
    worker.register(cpu_caches(), "CPU_ATTN")
    run_step(
        worker,
        StepPlan(BS, loads=[Transfer("r", tokens[:CHUNK], (), 0, CHUNK, [3, 4])]),
        wait=False,
    )
    assert worker.take_load_errors() == {3, 4}


def test_register_checks_the_caches_against_kvtier(kv):
    worker = WorkerSide(kv, NAMES)
    with pytest.raises(ConfigError, match="no KV cache for layers"):
        worker.register({NAMES[0]: torch.zeros(NB, H, BS, 2 * D)}, "CPU_ATTN")
    with pytest.raises(ConfigError, match="kvtier was opened for"):
        worker.register({n: torch.zeros(NB, H + 1, BS, 2 * D) for n in NAMES}, "CPU_ATTN")
    with pytest.raises(ConfigError, match="does not know"):
        worker.register({n: torch.zeros(NB, H, BS, 2 * D) for n in NAMES}, "PALLAS")


# -- settings and sharing -------------------------------------------------------------


def test_extra_config_overrides_the_yaml_file(tmp_path):
    path = tmp_path / "kvtier.yaml"
    path.write_text(
        f"chunk_tokens: 256\ntiers: [{{url: 'file://{tmp_path}/kv', capacity: 1GiB}}]\n"
    )
    settings = load_settings({"config": str(path), "chunk_tokens": 512, "model": "org/m@v1"})
    assert settings.config.chunk_tokens == 512 and settings.model == "org/m@v1"
    assert settings.config.tiers[0].url == f"file://{tmp_path}/kv"
    with pytest.raises(
        ConfigError, match=r"unknown key 'chunk_token' \(did you mean 'chunk_tokens'"
    ):
        load_settings({"config": str(path), "chunk_token": 512})
    with pytest.raises(ConfigError, match="chunk_tokens"):
        load_settings({"config": str(path), "chunk_tokens": -1})
    assert load_settings(
        {"config": str(path), "store_partial_chunks": True}
    ).config.store_partial_chunks
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings({"config": str(tmp_path / "missing.yaml")})
    with pytest.raises(ConfigError, match="'model' must be"):
        load_settings({"config": str(path), "model": ""})


def test_connector_settings_load_async_and_layerwise(tmp_path):
    tiers = [{"url": "cpu://", "capacity": "1MiB"}]
    settings = load_settings({"tiers": tiers})
    assert settings.load_async == "auto" and settings.layerwise_loads is True
    settings = load_settings({"tiers": tiers, "load_async": "never", "layerwise_loads": False})
    assert settings.load_async == "never" and settings.layerwise_loads is False
    with pytest.raises(ConfigError, match="'load_async' must be one of auto, always, never"):
        load_settings({"tiers": tiers, "load_async": "sometimes"})
    with pytest.raises(ConfigError, match="'layerwise_loads' must be true or false, got 'no'"):
        load_settings({"tiers": tiers, "layerwise_loads": "no"})


def test_environment_overrides_win_over_the_extra_config(tmp_path, monkeypatch):
    monkeypatch.setenv("KVTIER_CHUNK_TOKENS", "128")
    extra = {"tiers": [{"url": "cpu://", "capacity": "1MiB"}], "chunk_tokens": 512}
    assert load_settings(extra).config.chunk_tokens == 128
    monkeypatch.setenv("KVTIER_CHUNK_TOKENS", "-5")
    with pytest.raises(ConfigError, match="chunk_tokens"):
        load_settings(extra)


def test_one_kvtier_per_config_and_shard_per_process(tmp_path):
    cfg = load_settings({"tiers": [{"url": "cpu://", "capacity": "1MiB"}]}).config
    a = shared.acquire(cfg, model="m", layout=LAYOUT, tp_rank=0, tp_size=2)
    b = shared.acquire(cfg, model="m", layout=LAYOUT, tp_rank=0, tp_size=2)
    c = shared.acquire(cfg, model="m", layout=LAYOUT, tp_rank=1, tp_size=2)
    assert a is b and a is not c and a.hasher.namespace != c.hasher.namespace
    shared.release(a)
    assert a.lookup([1, 2, 3]) == 0, "still open for its second user"
    shared.release(b)
    shared.release(c)
    with pytest.raises(ConfigError, match="closed"):
        a.lookup([1, 2, 3])


def test_the_package_imports_without_vllm_and_names_the_extra():
    import kvtier.plugins.vllm as plugin

    if importlib.util.find_spec("vllm") is None:
        with pytest.raises(MissingExtraError, match=r"kvtier\[vllm\]"):
            plugin.KVTierConnector  # noqa: B018
    else:
        assert plugin.KVTierConnector.__name__ == "KVTierConnector"
    with pytest.raises(AttributeError):
        plugin.Nothing  # noqa: B018


def test_worker_counters_cover_every_step(kv):
    worker = WorkerSide(kv, NAMES)
    worker.register(cpu_caches(seed=1), "CPU_ATTN")
    tokens = prompt(2 * CHUNK)
    for start, end in itertools.pairwise([0, CHUNK, 2 * CHUNK]):
        save = Transfer("r", tokens[:end], (), start, end, list(range(1, 5)))
        run_step(worker, StepPlan(BS, saves=[save]))
    kv.flush()
    assert worker.totals["saves"] == 2 and kv.lookup([*tokens, 0]) == 2 * CHUNK


# -- lookups across processes, and a hung tier (the scheduler never waits on storage) --
#
# Answers over the workers' lookup servers (ZMQ over IPC, as in vLLM's default
# multi-process engine) match lookups in the process, and a hung tier (a real Valkey
# server stopped with SIGSTOP) never makes the scheduler wait: it gets ``None`` (ask
# again later) or a smaller hit within its budget, and the tier is skipped at once
# once its breaker opens.

SALT = ((("cache_salt", "alice"),),)


def rpc():
    from kvtier.plugins.vllm import rpc

    return rpc


@pytest.fixture
def engine() -> str:
    """An engine id for lookup servers (pyzmq and msgspec come with vLLM)."""
    pytest.importorskip("zmq")
    pytest.importorskip("msgspec")
    return f"test-{uuid.uuid4()}"


def open_kv(tiers: list[dict], rank: int = 0) -> KVTier:
    config = {"chunk_tokens": CHUNK, "tiers": tiers}
    return KVTier.open(config, model="tiny", layout=LAYOUT, tp_rank=rank, tp_size=2)


def serve(kv: KVTier, engine: str, rank: int, local: float = 0.005, remote: float = 0.05):
    return rpc().LookupServer(
        kv, rpc().lookup_address(engine, rank), tier_limits(kv, local, remote)
    )


def test_remote_lookups_answer_as_the_workers_chain_does(tmp_path: Path, engine: str) -> None:
    cpu = {"url": "cpu://", "capacity": "16MiB"}
    file = {"url": f"file://{tmp_path}/kv", "capacity": "64MiB"}
    rank0, rank1 = open_kv([cpu, file], 0), open_kv([cpu], 1)
    servers = [serve(rank0, engine, 0), serve(rank1, engine, 1)]
    client = rpc().RemoteLookups([rpc().lookup_address(engine, r) for r in (0, 1)])
    try:
        tokens = prompt(4 * CHUNK + 3)
        put(rank0, tokens, SALT)
        put(rank1, tokens[: 2 * CHUNK], SALT)
        assert rank0.lookup(tokens, extra_keys=SALT) == 4 * CHUNK
        both = client.submit(tokens, SALT).result(10.0)
        assert both == (2 * CHUNK, 2 * CHUNK), "the smallest rank's answer"
        assert client.submit(tokens, ()).result(10.0) == (0, 0), "salted chunks"
        put(rank1, tokens, SALT)
        rank0.chain.tiers[0].backend.store.blobs.clear()  # rank 0: only in the file tier
        assert client.submit(tokens, SALT, 2 * CHUNK).result(10.0) == (4 * CHUNK, 0)
        rank0.flush()
        assert rank0.stats().prefetched == 2, "not the chunks vLLM holds itself"
        assert client.submit(tokens[: CHUNK - 1], ()).result(10.0) == (0, 0)
        assert client.answers == {}, "answered lookups are forgotten"
    finally:
        client.close()
        for server in servers:
            server.close()
        rank0.close()
        rank1.close()
    assert not Path(rpc().lookup_address(engine, 0).removeprefix("ipc://")).exists()


def test_the_scheduler_asks_again_later_instead_of_waiting(engine: str) -> None:
    kv = open_kv([{"url": "cpu://", "capacity": "16MiB"}])
    server = serve(kv, engine, 0)
    client = rpc().RemoteLookups([rpc().lookup_address(engine, 0)])
    sched = SchedulerSide(client, chunk_tokens=CHUNK, block_size=BS, wait=0.0)
    try:
        tokens = prompt(3 * CHUNK + 1)
        put(kv, tokens)
        answers = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            answers.append(sched.match("r", tokens, (), 0))
            if answers[-1] is not None:
                break
            time.sleep(0.001)
        assert set(answers[:-1]) <= {None} and answers[-1] == 3 * CHUNK
        # Asked again (a later step), it answers at once while a fresh lookup runs.
        assert sched.match("r", tokens, (), 16) == 3 * CHUNK - 16
        sched.finished("r")
        assert client.answers == {}, "a finished request's lookup is dropped"
    finally:
        client.close()
        server.close()
        kv.close()


@pytest.fixture
def hung_valkey(valkey_factory) -> Iterator:
    server = valkey_factory()
    yield server
    if server.running:
        os.kill(server.proc.pid, signal.SIGCONT)


def test_a_hung_tier_never_stalls_a_lookup(hung_valkey, engine: str) -> None:
    """SIGSTOP: the server accepts connections but never answers (a hung, not dead,
    tier). Lookups give the smaller hit of the tiers that answered within their
    limit; once the tier's own timeout opens its breaker it is not asked at all."""
    cpu = {"url": "cpu://", "capacity": "16MiB"}
    redis = {"url": hung_valkey.url, "capacity": "64MiB", "timeout": 2.0}
    kv = open_kv([cpu, redis])
    server = serve(kv, engine, 0)
    client = rpc().RemoteLookups([rpc().lookup_address(engine, 0)])
    sched = SchedulerSide(client, chunk_tokens=CHUNK, block_size=BS, wait=0.002, give_up=5.0)
    local = SchedulerSide(
        LocalLookups(kv, tier_limits(kv, 0.005, 0.05)), chunk_tokens=CHUNK, block_size=BS
    )
    try:
        tokens = prompt(4 * CHUNK + 1)
        put(kv, tokens)  # both tiers
        kv.chain.tiers[0].backend.store.blobs.clear()  # chunks 2 and 3 only in redis now
        put(kv, tokens[: 2 * CHUNK])
        assert kv.lookup(tokens) == 4 * CHUNK
        os.kill(hung_valkey.proc.pid, signal.SIGSTOP)
        worst = 0.0
        answer = None
        local_answer = None
        for _ in range(200):  # vLLM asks again at each step until there is an answer
            start = time.perf_counter()
            answer = sched.match("r", tokens, (), 0)
            local_answer = local.match("r", tokens, (), 0)
            worst = max(worst, time.perf_counter() - start)
            if answer is not None and local_answer is not None:
                break
            time.sleep(0.005)
        # Waiting on the tier would take its 2 s timeout; 0.5 s leaves room for a
        # busy machine descheduling this process.
        assert worst < 0.5, f"a lookup call blocked the scheduler for {worst:.3f}s"
        assert answer == local_answer == 2 * CHUNK, "the smaller hit of the cpu tier"
        redis_tier = kv.chain.tiers[1]
        deadline = time.monotonic() + 5
        while redis_tier.breaker.closed and time.monotonic() < deadline:
            time.sleep(0.05)  # the tier's own 2 s timeout opens its breaker
        assert not redis_tier.breaker.closed
        skipped = redis_tier.stats.skipped
        start = time.perf_counter()
        assert kv.lookup(tokens, limits=[None, None]) == 2 * CHUNK
        assert time.perf_counter() - start < 0.5
        assert redis_tier.stats.skipped == skipped + 1, "an open breaker is skipped at once"
    finally:
        os.kill(hung_valkey.proc.pid, signal.SIGCONT)
        client.close()
        server.close()
        kv.close()


def test_kvtier_logs_through_vllms_handlers(monkeypatch):
    """The tier chain's lines (a tier available again is INFO) appear in vLLM's log."""
    from kvtier.plugins.vllm.logs import route_to_vllm

    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    vllm_logger, kvtier_logger = logging.getLogger("vllm"), logging.getLogger("kvtier")
    monkeypatch.setattr(vllm_logger, "handlers", [handler])
    monkeypatch.setattr(vllm_logger, "level", logging.INFO)
    monkeypatch.setattr(kvtier_logger, "handlers", [])
    monkeypatch.setattr(kvtier_logger, "level", logging.NOTSET)
    monkeypatch.setattr(kvtier_logger, "propagate", True)
    route_to_vllm()
    route_to_vllm()
    logging.getLogger("kvtier.core.tier").info("tier %s is available again", "redis")
    logging.getLogger("kvtier.core.tier").debug("not at vLLM's level")
    assert [r.getMessage() for r in records] == ["tier redis is available again"]
