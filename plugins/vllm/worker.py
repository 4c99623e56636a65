"""The worker side: copies KV between vLLM's paged cache and kvtier, once each way.

Free of vLLM imports. Each step, for the plan the scheduler side built:

* loads: :meth:`WorkerSide.start_load` fetches the chunks from kvtier on a
  background thread, which copies them into the paged cache
  (:class:`~kvtier.plugins.vllm.fill.CacheFiller`: layer by layer by default, streamed
  layer by layer with ``blob_layout: layers``, else whole chunks);
  :meth:`WorkerSide.wait_layer`, called before each attention layer runs, returns as
  soon as its layer is in place (whole chunks: once the fetch is done). One copy, no
  staging tensor. Tokens kvtier could not deliver (evicted, corrupt, a tier down) are
  reported by :meth:`WorkerSide.take_load_errors` as block ids, which vLLM recomputes.
* saves: :meth:`WorkerSide.save_layer`, called after each attention layer, gathers
  the layer's new KV out of the paged cache straight into the pooled blobs kvtier
  will queue (:meth:`KVTier.begin_store`); :meth:`WorkerSide.finish_step` commits
  them, and kvtier writes them in the background, so no block is read after the
  step ends.

Why the load thread may write the paged cache while vLLM's forward runs: the
blocks a load fills were allocated to that load's request alone (vLLM never shares
a block it has not computed), the forward writes only the slots of the tokens it
computes, and it reads the loaded blocks only in attention, after
``wait_for_layer_load`` of that layer, which returns once that layer's copies (or
all copies) into the cache are done.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from kvtier.core.engine import KVTier, PendingStore
from kvtier.core.errors import ConfigError
from kvtier.core.threads import bound_executor
from kvtier.kernels import PagedLayout, PagedSlots, paged_view
from kvtier.plugins.vllm.fill import CacheFiller, Load
from kvtier.plugins.vllm.metadata import StepPlan, Transfer

log = logging.getLogger(__name__)

COUNTERS = {
    "loads": "Requests whose KV kvtier loaded (or began to load) into vLLM's cache.",
    "load_tokens": "Prompt tokens whose KV kvtier loaded into vLLM's cache.",
    "load_bytes": "Bytes of KV kvtier copied into vLLM's cache.",
    "load_error_blocks": "vLLM blocks a load failed to fill (vLLM recomputes them).",
    "saves": "Requests whose KV kvtier saved from vLLM's cache.",
    "save_tokens": "Tokens whose KV kvtier saved from vLLM's cache.",
}
"""The worker's counters (:meth:`WorkerSide.take_stats`, :attr:`WorkerSide.totals`) and
what each counts."""

_CONCAT_BACKENDS = ("FLASH_ATTN", "FLASHINFER", "TRITON_ATTN")


def layout_for_backend(backend: str, ndim: int) -> PagedLayout:
    """The paged layout of a vLLM attention backend (``get_name()``) whose per-layer
    cache has ``ndim`` dimensions; :class:`ConfigError` for backends kvtier does not
    know (MLA, Mamba, ...)."""
    if backend == "CPU_ATTN" and ndim == 4:
        return PagedLayout.CPU
    if backend in _CONCAT_BACKENDS and ndim == 4:
        return PagedLayout.KV_CONCAT
    if backend == "FLASH_ATTN" and ndim == 5:
        return PagedLayout.FLASH_ATTN
    if backend in ("FLASHINFER", "TRITON_ATTN") and ndim == 5:
        return PagedLayout.FLASHINFER
    raise ConfigError(
        f"kvtier's vLLM connector does not know the KV cache layout of attention backend "
        f"{backend!r} with {ndim}-D caches; supported: CPU_ATTN, "
        f"{', '.join(_CONCAT_BACKENDS)}"
    )


@dataclass
class _Save:
    transfer: Transfer
    pending: PendingStore  # the pooled blobs the layers are gathered into
    parts: list[tuple[PagedSlots, torch.Tensor]]  # (slots, [L, 2, T, H, D] blob view)


class WorkerSide:
    """Loads and saves of one worker (one tensor-parallel rank)."""

    def __init__(self, kv: KVTier, layer_names: Sequence[str], *, layerwise: bool = True) -> None:
        self.kv = kv
        self.layerwise = layerwise
        """Loads inside a step are copied into the paged cache layer by layer once their
        blobs have arrived, and :meth:`wait_layer` returns as soon as its layer is in
        place (else each chunk is copied whole as it arrives, and :meth:`wait_layer`
        waits for the whole fetch)."""
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        self.caches: list[torch.Tensor] = []
        self.layout = PagedLayout.CPU  # the real one is set by register()
        self.totals = dict.fromkeys(COUNTERS, 0)
        self._stats = dict.fromkeys(COUNTERS, 0)
        self._errors: set[int] = set()
        self._loads: list[Load] = []
        self._fetching: Future[None] | None = None
        self._ready: list[threading.Event] = []  # per layer: every load's layer is in place
        self._saves: list[_Save] = []
        self._saved_layers: set[int] = set()
        self._pool = bound_executor(1, "kvtier-vllm-load", kv.thread_cpus)
        self._async_pool = bound_executor(2, "kvtier-vllm-async-load", kv.thread_cpus)
        self._received: set[str] = set()
        self._received_lock = threading.RLock()  # counters, errors, received
        self._filler: CacheFiller | None = None  # set by register()

    def register(self, kv_caches: Mapping[str, torch.Tensor], backend: str) -> None:
        """Record the paged cache of every layer, laid out as attention backend
        ``backend`` (vLLM's ``get_name()``) lays it out; it must match kvtier's layout."""
        missing = [name for name in self.layer_index if name not in kv_caches]
        if missing:
            raise ConfigError(f"vLLM registered no KV cache for layers {missing}")
        self.caches = [kv_caches[name] for name in self.layer_index]
        layout = self.layout = layout_for_backend(backend, self.caches[0].dim())
        self._filler = CacheFiller(self.kv, self.caches, layout, self.layerwise)
        lay = self.kv.layout
        view = paged_view(self.caches[0], layout)
        if view.dtype != lay.dtype or tuple(view.shape[3:]) != (lay.num_kv_heads, lay.head_dim):
            raise ConfigError(
                f"vLLM's KV caches hold {view.dtype} with (kv_heads, head_dim) = "
                f"{tuple(view.shape[3:])}; kvtier was opened for {lay.dtype} and "
                f"{(lay.num_kv_heads, lay.head_dim)}"
            )

    # -- loads ------------------------------------------------------------------------

    def start_load(self, plan: StepPlan) -> None:
        """Start fetching the plan's loads into the paged cache (:meth:`wait_layer`
        waits for them). The plan's async loads run in the background;
        :meth:`take_received` reports them when done."""
        for transfer in plan.async_loads:
            self._async_pool.submit(self._load_async, transfer, plan.block_size)
        if not plan.loads:
            return
        chunk = self.kv.config.chunk_tokens
        for t in plan.loads:
            fetch_start = t.start - t.start % chunk
            slots = t.slot_mapping(plan.block_size)
            self._loads.append(Load(t, fetch_start, slots, plan.block_size))
        self._ready = [threading.Event() for _ in self.caches]
        self._fetching = self._pool.submit(self._fill().fill, list(self._loads), self._ready)

    def _fill(self) -> CacheFiller:
        if self._filler is None:
            raise RuntimeError("register() the paged caches before loading into them")
        return self._filler

    def wait_layer(self, layer_name: str) -> None:
        """Block until layer ``layer_name`` of the plan's loads is in the paged cache
        (layer-wise), or until the whole fetch is."""
        layer = self.layer_index.get(layer_name)
        if self._fetching is None or layer is None:
            return
        if self.layerwise:
            self._ready[layer].wait()
        else:
            self._fetching.result()
        for load in self._loads:
            load.layers_done.add(layer)

    def _finish_loads(self) -> None:
        """Account for the step's loads: tokens not waited for by every layer before
        the forward used them are reported as load errors."""
        if self._fetching is None:
            return
        self._fetching.result()
        for load in self._loads:
            t = load.transfer
            good = max(min(load.loaded, t.end), t.start)
            if len(load.layers_done) < len(self.caches):
                good = t.start
            self._settle(t, good, load.block_size)
        self._loads = []
        self._fetching = None

    def _load_async(self, t: Transfer, block_size: int) -> None:
        """Fetch ``t`` straight into the paged cache (its blocks belong to a request
        vLLM does not run until :meth:`take_received` names it), then report it."""
        chunk = self.kv.config.chunk_tokens
        fetch_start = t.start - t.start % chunk
        loaded = self._fill().fill_whole(t, fetch_start, t.slot_mapping(block_size))
        good = max(min(loaded, t.end), t.start)
        with self._received_lock:  # the errors are reported no later than the request
            self._settle(t, good, block_size)
            self._received.add(t.req_id)

    def _settle(self, t: Transfer, good: int, block_size: int) -> None:
        """Count a load that delivered tokens ``[t.start, good)``; the blocks of the
        rest are load errors."""
        with self._received_lock:
            if good < t.end:
                failed = t.blocks_from(good, block_size)
                self._errors |= failed
                self._count(load_error_blocks=len(failed))
            if good > t.start:
                tokens = good - t.start
                nbytes = tokens * self.kv.layout.bytes_per_token()
                self._count(loads=1, load_tokens=tokens, load_bytes=nbytes)

    def take_received(self) -> set[str]:
        """Requests whose async load finished (loaded, or failed and reported by
        :meth:`take_load_errors` no later than in the same step) since the last call."""
        with self._received_lock:
            done, self._received = self._received, set()
        return done

    def take_load_errors(self) -> set[int]:
        """Block ids whose KV could not be loaded since the last call."""
        with self._received_lock:
            errors, self._errors = self._errors, set()
        return errors

    # -- saves ------------------------------------------------------------------------

    def save_layer(self, layer_name: str, plan: StepPlan) -> None:
        """Gather layer ``layer_name``'s KV of the plan's saves out of the paged cache,
        straight into the blobs kvtier will queue."""
        layer = self.layer_index.get(layer_name)
        if layer is None or not plan.saves or layer in self._saved_layers:
            return
        if not self._saved_layers:
            self._prepare_saves(plan)
        for save in self._saves:
            for slots, view in save.parts:
                if self.caches[0].device.type == "cpu":
                    slots.gather_layer(layer, view[layer])
                else:  # gathered on the device, then one copy to the host blob
                    gathered = torch.empty_like(view[layer], device=self.caches[0].device)
                    slots.gather_layer(layer, gathered)
                    view[layer].copy_(gathered)
        self._saved_layers.add(layer)

    def _prepare_saves(self, plan: StepPlan) -> None:
        """Reserve kvtier's store queue for the plan's saves (chunks that do not fit
        are dropped and counted by kvtier, chunks already queued skipped)."""
        for t in plan.saves:
            pending = self.kv.begin_store(t.token_ids, extra_keys=t.extra_keys, start=t.start)
            slots = t.slot_mapping(plan.block_size).to(self.caches[0].device)
            parts = [
                (PagedSlots(self.caches, slots[first - t.start : end - t.start], self.layout), view)
                for first, end, view in pending.chunks
            ]
            self._saves.append(_Save(t, pending, parts))

    def finish_step(self, plan: StepPlan) -> None:
        """End of the step: settle the loads and hand the saves to kvtier."""
        self._finish_loads()
        if plan.saves:
            try:
                for name in self.layer_index:
                    self.save_layer(name, plan)
            except BaseException:
                self._abort_saves()
                raise
            for save in self._saves:
                save.pending.commit()
                self._count(saves=1, save_tokens=save.transfer.end - save.transfer.start)
        self._saves = []
        self._saved_layers = set()

    def _abort_saves(self) -> None:
        for save in self._saves:
            save.pending.abort()
        self._saves = []
        self._saved_layers = set()

    # -- stats and lifetime -----------------------------------------------------------

    def take_stats(self) -> dict[str, int] | None:
        """Counters since the last call, or ``None`` if all are zero."""
        with self._received_lock:
            stats, self._stats = self._stats, dict.fromkeys(COUNTERS, 0)
        return stats if any(stats.values()) else None

    def _count(self, **deltas: int) -> None:
        with self._received_lock:
            for name, delta in deltas.items():
                self._stats[name] += delta
                self.totals[name] += delta

    def close(self) -> None:
        """Stop the load threads; give back the queue space of saves never committed."""
        self._pool.shutdown(wait=True)
        self._async_pool.shutdown(wait=True)
        self._abort_saves()
