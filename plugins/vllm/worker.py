"""The worker side: copies KV between vLLM's paged cache and kvtier, once each way.

Free of vLLM imports. Each step, for the plan the scheduler side built:

* loads: :meth:`WorkerSide.start_load` fetches the chunks from kvtier on a
  background thread. Layer-wise (the default), :meth:`KVTier.retrieve_held` keeps
  every verified chunk in its blob (for the raw codec, the blob's own bytes) and the
  thread copies them into the paged cache layer by layer; :meth:`WorkerSide.wait_layer`,
  called before each attention layer runs, returns as soon as its layer is in place.
  With ``blob_layout: layers``, :meth:`KVTier.retrieve_layers` streams layered blobs
  from tiers that read byte ranges, so layer ``i`` is copied into the cache (and its
  wait returns) while later layers are still being read.
  Whole (``layerwise=False``), :meth:`KVTier.retrieve_to` hands each chunk to a sink
  that scatters it into every layer as it arrives, and :meth:`WorkerSide.wait_layer`
  waits for the whole fetch. Either way one copy, no staging tensor. Tokens kvtier
  could not deliver (evicted, corrupt, a tier down) are reported by
  :meth:`WorkerSide.take_load_errors` as block ids, which vLLM recomputes.
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
all copies) into the cache are done. Copies into a cache on another device are
synchronized before a layer is reported in place. All copies go through
:mod:`kvtier.kernels`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvtier.core.engine import HeldChunks, KVTier, PendingStore
from kvtier.core.errors import ConfigError
from kvtier.core.retrieval import Wanted
from kvtier.kernels import PagedLayout, PagedSlots, paged_view, scatter_paged
from kvtier.plugins.vllm.metadata import StepPlan, Transfer

log = logging.getLogger(__name__)

COUNTERS = ("loads", "load_tokens", "load_bytes", "load_error_blocks", "saves", "save_tokens")
"""The worker's counters (:meth:`WorkerSide.take_stats`, :attr:`WorkerSide.totals`)."""

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
class _Load:
    transfer: Transfer
    fetch_start: int  # ``transfer.start`` rounded down to a chunk
    slots: torch.Tensor  # slot of each token in [transfer.start, transfer.end)
    block_size: int
    loaded: int = 0  # end of the tokens kvtier delivered
    layers_done: set[int] = field(default_factory=set)


@dataclass
class _Save:
    transfer: Transfer
    pending: PendingStore  # the pooled blobs the layers are gathered into
    parts: list[tuple[PagedSlots, torch.Tensor]]  # (slots, [L, 2, T, H, D] blob view)


def _overlap(
    t: Transfer, slots: torch.Tensor, first: int, chunk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The part of ``chunk`` (the KV of tokens from ``first`` on) inside ``[t.start,
    t.end)`` and those tokens' ``slots`` (``slots`` holds tokens ``[t.start, t.end)``);
    ``None`` when they do not overlap."""
    lo, hi = max(first, t.start), min(first + chunk.shape[2], t.end)
    if hi <= lo:
        return None
    return chunk[:, :, lo - first : hi - first], slots[lo - t.start : hi - t.start]


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
        self._loads: list[_Load] = []
        self._fetching: Future[None] | None = None
        self._ready: list[threading.Event] = []  # per layer: every load's layer is in place
        self._saves: list[_Save] = []
        self._saved_layers: set[int] = set()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="kvtier-vllm-load")
        self._async_pool = ThreadPoolExecutor(2, thread_name_prefix="kvtier-vllm-async-load")
        self._received: set[str] = set()
        self._received_lock = threading.RLock()  # counters, errors, received

    def register(self, kv_caches: Mapping[str, torch.Tensor], backend: str) -> None:
        """Record the paged cache of every layer, laid out as attention backend
        ``backend`` (vLLM's ``get_name()``) lays it out; it must match kvtier's layout."""
        missing = [name for name in self.layer_index if name not in kv_caches]
        if missing:
            raise ConfigError(f"vLLM registered no KV cache for layers {missing}")
        self.caches = [kv_caches[name] for name in self.layer_index]
        layout = self.layout = layout_for_backend(backend, self.caches[0].dim())
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
            self._loads.append(_Load(t, fetch_start, slots, plan.block_size))
        self._ready = [threading.Event() for _ in self.caches]
        self._fetching = self._pool.submit(self._fetch, list(self._loads), self._ready)

    def _fetch(self, loads: list[_Load], ready: list[threading.Event]) -> None:
        if not self.layerwise:
            for load in loads:
                load.loaded = self._retrieve(load.transfer, load.fetch_start, load.slots)
            return
        if self.kv.config.blob_layout == "layers":
            self._stream_layers(loads, ready)
            return
        held: list[HeldChunks | None] = []
        try:
            for load in loads:
                held.append(self._hold(load))
            self._scatter_layers(loads, held, ready)
        except Exception:
            log.exception("kvtier: copying %d loads into the paged cache failed", len(loads))
            for load in loads:
                load.loaded = load.fetch_start
        finally:
            for chunks in held:
                if chunks is not None:
                    chunks.release()
            for event in ready:  # also after a failure: its tokens are load errors
                event.set()

    def _stream_layers(self, loads: list[_Load], ready: list[threading.Event]) -> None:
        """Fetch the loads layer by layer (:meth:`KVTier.retrieve_layers`), copying each
        chunk's layer into the paged cache as it arrives and setting each layer's event
        once every load's part of it is in place."""
        wanted = [Wanted(x.transfer.token_ids, x.transfer.extra_keys, x.fetch_start) for x in loads]

        def deliver(request: int, first: int, layer: int, kv: torch.Tensor) -> None:
            load = loads[request]
            part = _overlap(load.transfer, load.slots, first, kv.unsqueeze(0))
            if part is None:
                return
            source = self._on_cache_device(part[0][0])
            slots = PagedSlots(self.caches, part[1].to(source.device), self.layout)
            with torch.inference_mode(self.caches[0].is_inference()):  # a codec thread
                slots.scatter_layer(layer, source)
            self._synchronize()

        def layer_done(layer: int) -> None:
            ready[layer].set()

        try:
            ends = self.kv.retrieve_layers(wanted, deliver, layer_done)
        except Exception:
            log.exception("kvtier: loading %d requests layer by layer failed", len(loads))
            ends = [load.fetch_start for load in loads]
        finally:
            for event in ready:  # also after a failure: its tokens are load errors
                event.set()
        for load, end in zip(loads, ends, strict=True):
            load.loaded = end

    def _hold(self, load: _Load) -> HeldChunks | None:
        """Fetch ``load``'s chunks and keep them (``None``, logged, if that fails)."""
        t = load.transfer
        load.loaded = load.fetch_start
        try:
            chunks = self.kv.retrieve_held(
                t.token_ids, extra_keys=t.extra_keys, start=load.fetch_start
            )
        except Exception:
            log.exception("kvtier: loading %d tokens of request %s failed", t.end, t.req_id)
            return None
        load.loaded = chunks.end
        return chunks

    def _scatter_layers(
        self, loads: list[_Load], held: list[HeldChunks | None], ready: list[threading.Event]
    ) -> None:
        """Copy the held chunks into the paged cache layer by layer, setting each
        layer's event once every load's part of it is in place."""
        parts = []  # (slots, [L, 2, T, H, D] source) of every chunk part to copy
        for load, chunks in zip(loads, held, strict=True):
            for first, chunk in chunks.chunks if chunks is not None else ():
                if (overlap := _overlap(load.transfer, load.slots, first, chunk)) is not None:
                    source = self._on_cache_device(overlap[0])
                    where = overlap[1].to(source.device)
                    parts.append((PagedSlots(self.caches, where, self.layout), source))
        with torch.inference_mode(self.caches[0].is_inference()):
            for layer, event in enumerate(ready):
                for slots, source in parts:
                    slots.scatter_layer(layer, source[layer])
                self._synchronize()
                event.set()

    def _on_cache_device(self, chunk: torch.Tensor) -> torch.Tensor:
        device = self.caches[0].device
        return chunk if device.type == "cpu" else chunk.to(device)

    def _synchronize(self) -> None:
        """Wait for this thread's copies into a cache on an accelerator."""
        device = self.caches[0].device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

    def _retrieve(self, t: Transfer, fetch_start: int, slots: torch.Tensor) -> int:
        """Fetch ``t`` from ``fetch_start`` and scatter each chunk that arrives into
        every layer's cache at ``slots`` (those of tokens ``[t.start, t.end)``);
        returns the end of the tokens kvtier delivered (``fetch_start`` on failure).
        Chunks past that end may have been scattered: their blocks are load errors,
        which vLLM recomputes, overwriting them."""

        def scatter(first: int, chunk: torch.Tensor) -> None:
            if (overlap := _overlap(t, slots, first, chunk)) is not None:
                self._scatter(*overlap)

        try:
            return self.kv.retrieve_to(
                t.token_ids, scatter, extra_keys=t.extra_keys, start=fetch_start
            )
        except Exception:
            log.exception("kvtier: loading %d tokens of request %s failed", t.end, t.req_id)
            return fetch_start

    def _scatter(self, part: torch.Tensor, slots: torch.Tensor) -> None:
        """Copy ``part`` (``[L, 2, T, H, D]``, host memory valid during the call) into
        every layer's cache at ``slots``; done when this returns."""
        # On an accelerator: one host-to-device copy per chunk, then copies between
        # the device's blocks, synchronized (the chunk's memory goes after the call).
        source = self._on_cache_device(part)
        with torch.inference_mode(self.caches[0].is_inference()):
            scatter_paged(source, self.caches, slots.to(source.device), self.layout)
        self._synchronize()

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
        loaded = self._retrieve(t, fetch_start, t.slot_mapping(block_size))
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
