"""The vLLM worker's load and save path: one copy each way against the two copies it made before.

    python -P bench/vllm_copies.py [--json out.json] [--dir /var/tmp] [--reps 9] [--tokens 2048]

A Qwen2-7B-shaped KV cache (28 layers, 8 KV heads of 128, bf16; 112 KiB per token)
in vLLM's ``CPU_ATTN`` paged layout (blocks of 16 tokens, the blocks of a request
shuffled as a busy cache hands them out), kvtier chunks of 256 tokens, with
``torch.set_num_threads(1)``. Each case runs the worker side
(:class:`kvtier.plugins.vllm.worker.WorkerSide`) as vLLM drives it, without vLLM:

* save: ``save_layer`` for every layer then ``finish_step`` (gathered straight into
  the pooled blobs kvtier queues) against the old path, done explicitly here: each
  layer gathered into a staging tensor, then ``KVTier.store`` copying the staging
  into pooled blobs. The flush to the tier runs untimed after each round.
* load from ``cpu`` (and from ``file``, page cache warm): ``start_load``,
  ``wait_layer`` for every layer, ``finish_step`` (each blob scattered straight into
  the paged cache by the fetch thread) against the old path: ``KVTier.retrieve`` into
  a staging tensor on a fetch thread, then each layer scattered from it.
* a step loading from ``file`` with a simulated forward, layered blobs
  (``blob_layout: layers``: each layer streamed, checked and scattered as it is
  read) against whole-chunk blobs (every blob read before layer 0 is scattered),
  both layer-wise, each from its own file tier, with the page cache warm, then
  dropped before every step (as root; else the case says so).

Contenders run in turns (one warm-up round, then ``--reps`` rounds, the order
rotating); medians and min-max ranges in GB/s of KV moved, and new / old per round.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvtier.core import KVLayout, KVTier
from kvtier.kernels import PagedLayout, gather_paged, gather_paged_layer, scatter_paged_layer
from kvtier.plugins.vllm.metadata import StepPlan, Transfer
from kvtier.plugins.vllm.worker import WorkerSide

sys.path.insert(0, str(Path(__file__).parent))
from engine import Case, Contender, Timed, kvtier_revision, spread, table
from tiers import drop_page_cache, write_json

LAYOUT = KVLayout(num_layers=28, num_kv_heads=8, head_dim=128, dtype=torch.bfloat16)
CHUNK = 256
BLOCK = 16
NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYOUT.num_layers)]


class Setup:
    """Paged caches holding a saved request's blocks and room for a loaded one's."""

    def __init__(self, tokens: int) -> None:
        blocks = tokens // BLOCK
        order = torch.randperm(2 * blocks + 8, generator=torch.Generator().manual_seed(0))
        self.src_blocks = order[:blocks].tolist()
        self.dst_blocks = order[blocks : 2 * blocks].tolist()
        shape = (2 * blocks + 8, LAYOUT.num_kv_heads, BLOCK, 2 * LAYOUT.head_dim)
        gen = torch.Generator().manual_seed(1)
        self.caches = {name: torch.randn(shape, generator=gen).to(LAYOUT.dtype) for name in NAMES}
        self.tokens = torch.randint(0, 100_000, (tokens,), generator=gen).tolist()
        self.save = Transfer("w", self.tokens, (), 0, tokens, self.src_blocks)
        self.load = Transfer("r", self.tokens, (), 0, tokens, self.dst_blocks)
        self.staging = torch.zeros(LAYOUT.chunk_shape(tokens), dtype=LAYOUT.dtype)
        self.layers = [self.caches[n] for n in NAMES]
        self.fetcher = ThreadPoolExecutor(1)

    # -- the worker as vLLM drives it (one copy each way) --------------------------------

    def save_new(self, worker: WorkerSide) -> None:
        plan = StepPlan(BLOCK, saves=[self.save])
        with torch.inference_mode():
            for name in NAMES:
                worker.save_layer(name, plan)
            worker.finish_step(plan)

    def load_new(self, worker: WorkerSide, layer: Callable[[], object] = lambda: None) -> float:
        """One step that loads the request, running ``layer()`` (the layer's compute)
        after each ``wait_layer``; returns the seconds until layer 0 could run."""
        plan = StepPlan(BLOCK, loads=[self.load])
        began = time.perf_counter()
        first = 0.0
        with torch.inference_mode():
            worker.start_load(plan)
            for i, name in enumerate(NAMES):
                worker.wait_layer(name)
                if i == 0:
                    first = time.perf_counter() - began
                layer()
            worker.finish_step(plan)
        assert worker.take_load_errors() == set()
        return first

    # -- the old path, done explicitly (two copies each way) ---------------------------

    def save_old(self, kv: KVTier) -> None:
        slots = self.save.slot_mapping(BLOCK)
        with torch.inference_mode():
            for layer, cache in enumerate(self.layers):
                gather_paged_layer(cache, slots, PagedLayout.CPU, out=self.staging[layer])
            kv.store(self.tokens, self.staging)

    def load_old(self, kv: KVTier) -> None:
        slots = self.load.slot_mapping(BLOCK)
        with torch.inference_mode():
            fetch = self.fetcher.submit(kv.retrieve, self.tokens, out=self.staging)
            n, _ = fetch.result()
            assert n == len(self.tokens)
            for layer, cache in enumerate(self.layers):
                scatter_paged_layer(self.staging[layer], cache, slots, PagedLayout.CPU)

    def check_load(self) -> None:
        got = gather_paged(self.layers, self.load.slot_mapping(BLOCK), PagedLayout.CPU)
        want = gather_paged(self.layers, self.save.slot_mapping(BLOCK), PagedLayout.CPU)
        assert torch.equal(got, want), "the loaded blocks differ from the saved ones"


def layer_compute(ms: float) -> Callable[[], object]:
    """A stand-in for one layer's forward: matrix products for about ``ms``."""
    a = torch.randn(256, 256)
    start = time.perf_counter()
    for _ in range(20):
        a @ a
    each = (time.perf_counter() - start) / 20
    count = max(1, round(ms / 1e3 / each))
    return lambda: [a @ a for _ in range(count)]


def run(folder: str, tokens: int, reps: int, layer_ms: float) -> tuple[list[Case], dict]:
    setup = Setup(tokens)
    cpu = {"url": "cpu://", "capacity": "2GiB"}
    file = {"url": f"file://{folder}/kv", "capacity": "4GiB"}
    firsts: dict[str, dict] = {}
    try:
        cases = measure(setup, "cpu", cpu, reps, layer_ms, firsts)
        cases += measure(setup, "file", file, reps, layer_ms, firsts)
        return cases + measure_streamed(setup, folder, reps, layer_ms, firsts), firsts
    finally:
        setup.fetcher.shutdown()


def measure_streamed(
    setup: Setup, folder: str, reps: int, layer_ms: float, firsts: dict
) -> list[Case]:
    """A step loading from a file tier with a simulated forward: layered blobs,
    streamed layer by layer, against whole-chunk blobs; ``firsts`` gets the seconds
    until layer 0 could run."""
    caches, workers = [], {}
    for blob_layout in ("layers", "chunk"):
        tier = {"url": f"file://{folder}/kv-{blob_layout}", "capacity": "4GiB"}
        config = {"chunk_tokens": CHUNK, "blob_layout": blob_layout, "tiers": [tier]}
        kv = KVTier.open(config, model="bench", layout=LAYOUT)
        caches.append(kv)
        worker = workers[blob_layout] = WorkerSide(kv, NAMES)
        worker.register(setup.caches, "CPU_ATTN")
        setup.save_new(worker)
        kv.flush()
    try:
        compute = layer_compute(layer_ms)
        args = (setup, workers, compute, reps, firsts, layer_ms)
        return [layered_step(*args, cold=False), layered_step(*args, cold=True)]
    finally:
        for worker in workers.values():
            worker.close()
        for kv in caches:
            kv.close()


def measure(
    setup: Setup, tier_name: str, tier: dict[str, str], reps: int, layer_ms: float, firsts: dict
) -> list[Case]:
    """The save case (into the cpu tier only: saves never wait for a tier), the load
    case from ``tier``, and a step loading from it with a simulated forward of
    ``layer_ms`` per layer, layer-wise against whole; ``firsts`` gets the seconds
    until layer 0 could run."""
    nbytes = len(setup.tokens) * LAYOUT.bytes_per_token()
    cases = []
    config = {"chunk_tokens": CHUNK, "tiers": [tier]}
    with KVTier.open(config, model="bench", layout=LAYOUT) as kv:
        worker = WorkerSide(kv, NAMES, layerwise=False)
        worker.register(setup.caches, "CPU_ATTN")
        if tier_name == "cpu":
            save = {
                "one copy": Contender(
                    "kvtier",
                    "save_layer x28 + finish_step, into the queued blobs",
                    Timed(lambda rep: setup.save_new(worker), after=lambda rep: kv.flush()),
                ),
                "two copies": Contender(
                    "plain",
                    "gather into staging x28 + KVTier.store (copy to blobs)",
                    Timed(lambda rep: setup.save_old(kv), after=lambda rep: kv.flush()),
                ),
            }
            cases.append(Case.measure("save (worker)", reps, save, nbytes=nbytes))
        else:
            setup.save_new(worker)
            kv.flush()
        load = {
            "one copy": Contender(
                "kvtier",
                "start_load + wait_layer x28, chunks scattered from the blobs",
                Timed(lambda rep: setup.load_new(worker)),
            ),
            "two copies": Contender(
                "plain",
                "retrieve(out=staging) + scatter x28 from staging",
                Timed(lambda rep: setup.load_old(kv)),
            ),
        }
        note = "page cache warm" if tier_name == "file" else ""
        cases.append(Case.measure(f"load from {tier_name}", reps, load, nbytes=nbytes, note=note))
        setup.check_load()
        layerwise = WorkerSide(kv, NAMES)
        layerwise.register(setup.caches, "CPU_ATTN")
        compute = layer_compute(layer_ms)
        seen: dict[str, list[float]] = {"layer-wise": [], "whole": []}
        step = {
            "layer-wise": Contender(
                "kvtier",
                "wait_layer(i) returns once layer i is in place",
                Timed(lambda rep: seen["layer-wise"].append(setup.load_new(layerwise, compute))),
            ),
            "whole": Contender(
                "plain",
                "wait_layer waits for every chunk, scattered whole",
                Timed(lambda rep: seen["whole"].append(setup.load_new(worker, compute))),
            ),
        }
        note = f"forward simulated: {layer_ms:g} ms per layer"
        name = f"step loading from {tier_name}"
        cases.append(Case.measure(name, reps, step, nbytes=nbytes, note=note))
        setup.check_load()
        firsts[name] = {k: spread([x * 1e3 for x in v[1:]], 1) for k, v in seen.items()}
        layerwise.close()
        worker.close()
    return cases


def layered_step(
    setup: Setup,
    workers: dict[str, WorkerSide],
    compute: Callable[[], object],
    reps: int,
    firsts: dict,
    layer_ms: float,
    *,
    cold: bool,
) -> Case:
    """One step case of :func:`measure_streamed`, the page cache dropped before every
    step when ``cold`` (as root)."""
    nbytes = len(setup.tokens) * LAYOUT.bytes_per_token()
    dropped = [cold]
    seen: dict[str, list[float]] = {"layered blobs": [], "whole-chunk blobs": []}

    def before(rep: int) -> None:
        if cold:
            dropped[0] = drop_page_cache() and dropped[0]

    def contender(name: str, blob_layout: str, what: str) -> Contender:
        def run(rep: int) -> None:
            seen[name].append(setup.load_new(workers[blob_layout], compute))

        kind = "kvtier" if blob_layout == "layers" else "plain"  # the default: the baseline
        return Contender(kind, what, Timed(run, before=before))

    step = {
        "layered blobs": contender(
            "layered blobs", "layers", "each layer read, checked, scattered as it arrives"
        ),
        "whole-chunk blobs": contender(
            "whole-chunk blobs", "chunk", "every blob read, then scattered layer by layer"
        ),
    }
    cache = "page cache dropped" if cold else "page cache warm"
    name = f"step loading from file, layered, {cache}"
    note = f"forward simulated: {layer_ms:g} ms per layer"
    case = Case.measure(name, reps, step, nbytes=nbytes, note=note)
    if cold and not dropped[0]:
        case.note += "; NOT DROPPED: needs root"
    setup.check_load()
    firsts[name] = {k: spread([x * 1e3 for x in v[1:]], 1) for k, v in seen.items()}
    return case


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--dir", default="/var/tmp", help="a folder for the file tier")
    parser.add_argument("--reps", type=int, default=9, help="timed rounds per case (>= 7)")
    parser.add_argument("--tokens", type=int, default=2048, help="tokens (x 256)")
    parser.add_argument(
        "--layer-ms", type=float, default=2.0, help="simulated forward time per layer"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    revision = kvtier_revision()
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-", dir=args.dir) as folder:
        cases, firsts = run(folder, args.tokens, args.reps, args.layer_ms)
    mib = args.tokens * LAYOUT.bytes_per_token() / 2**20
    print(f"vLLM worker copies; {args.tokens} tokens of Qwen2-7B-shaped KV ({mib:.0f} MiB), "
          f"CPU_ATTN blocks of {BLOCK}; medians [min-max] of {args.reps} rounds; "
          "torch threads 1; ratio: first contender / second (higher is better)")  # fmt: skip
    print(table(cases))
    print("ms until layer 0 may run, median [min-max]:")
    for name, by in firsts.items():
        print(
            f"  {name}: "
            + ", ".join(f"{k} {v['median']} [{v['min']}-{v['max']}]" for k, v in by.items())
        )
    if args.json:
        write_json(
            args.json,
            [case.as_dict() for case in cases],
            kvtier=revision,
            shape={"layers": LAYOUT.num_layers, "kv_heads": LAYOUT.num_kv_heads,
                   "head_dim": LAYOUT.head_dim, "dtype": "bfloat16", "block_size": BLOCK,
                   "chunk_tokens": CHUNK, "tokens": args.tokens},
            reps=args.reps, torch_threads=torch.get_num_threads(), layer_ms=args.layer_ms,
            ms_until_layer_0=firsts,
        )  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
