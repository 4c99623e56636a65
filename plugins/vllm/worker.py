"""The worker side: copies KV between vLLM's paged cache and kvtier.

Free of vLLM imports. Each step, for the plan the scheduler side built:

* loads: :meth:`WorkerSide.start_load` fetches the chunks from kvtier on a
  background thread; :meth:`WorkerSide.wait_layer`, called before each attention
  layer runs, waits for them and scatters that layer into the paged cache. Tokens
  kvtier could not deliver (evicted, corrupt, a tier down) are reported by
  :meth:`WorkerSide.take_load_errors` as block ids, which vLLM recomputes.
* saves: :meth:`WorkerSide.save_layer`, called after each attention layer, gathers
  the layer's new KV out of the paged cache; :meth:`WorkerSide.finish_step` hands the
  chunks to kvtier, which copies them and writes them in the background, so no
  block is read after the step ends.

All copies go through :mod:`kvtier.kernels`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from kvtier.core.engine import KVTier
from kvtier.core.errors import ConfigError
from kvtier.kernels import PagedLayout, gather_paged_layer, paged_view, scatter_paged_layer
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
    staging: torch.Tensor  # KV of tokens [fetch_start, transfer.end)
    slots: torch.Tensor  # slot of each token in [transfer.start, transfer.end)
    block_size: int
    loaded: int = 0  # end of the tokens kvtier delivered
    layers_done: set[int] = field(default_factory=set)


class WorkerSide:
    """Loads and saves of one worker (one tensor-parallel rank)."""

    def __init__(self, kv: KVTier, layer_names: Sequence[str]) -> None:
        self.kv = kv
        self.layer_index = {name: i for i, name in enumerate(layer_names)}
        self.caches: list[torch.Tensor] = []
        self.layout = PagedLayout.CPU  # the real one is set by register()
        self.totals = dict.fromkeys(COUNTERS, 0)
        self._stats = dict.fromkeys(COUNTERS, 0)
        self._errors: set[int] = set()
        self._loads: list[_Load] = []
        self._fetching: Future[None] | None = None
        self._saves: list[tuple[Transfer, torch.Tensor, torch.Tensor]] = []
        self._saved_layers: set[int] = set()
        self._buffers: dict[str, torch.Tensor] = {}
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
        """Start fetching the plan's loads; layers are scattered by :meth:`wait_layer`.
        The plan's async loads run in the background, fetched and scattered whole;
        :meth:`take_received` reports them when done."""
        for transfer in plan.async_loads:
            self._async_pool.submit(self._load_async, transfer, plan.block_size)
        if not plan.loads:
            return
        chunk = self.kv.config.chunk_tokens
        starts = [t.start - t.start % chunk for t in plan.loads]
        total = sum(t.end - s for t, s in zip(plan.loads, starts, strict=True))
        staging = self._buffer("load", total)
        offset = 0
        for transfer, fetch_start in zip(plan.loads, starts, strict=True):
            n = transfer.end - fetch_start
            part = staging[:, :, offset : offset + n]
            slots = transfer.slot_mapping(plan.block_size)
            self._loads.append(_Load(transfer, fetch_start, part, slots, plan.block_size))
            offset += n
        self._fetching = self._pool.submit(self._fetch, list(self._loads))

    def _fetch(self, loads: list[_Load]) -> None:
        for load in loads:
            t = load.transfer
            try:
                load.loaded, _ = self.kv.retrieve(
                    t.token_ids, extra_keys=t.extra_keys, out=load.staging, start=load.fetch_start
                )
            except Exception:
                log.exception("kvtier: loading %d tokens of request %s failed", t.end, t.req_id)
                load.loaded = load.fetch_start

    def wait_layer(self, layer_name: str) -> None:
        """Block until the plan's loads have arrived, then scatter layer ``layer_name``."""
        layer = self.layer_index.get(layer_name)
        if self._fetching is None or layer is None:
            return
        self._fetching.result()
        for load in self._loads:
            t = load.transfer
            n = min(load.loaded, t.end) - t.start
            if n > 0 and layer not in load.layers_done:
                skip = t.start - load.fetch_start
                part = load.staging[layer, :, skip : skip + n]
                scatter_paged_layer(part, self.caches[layer], load.slots[:n], self.layout)
            load.layers_done.add(layer)

    def _finish_loads(self) -> None:
        """Account for the step's loads: tokens not delivered to every layer before
        the forward used them are reported as load errors."""
        if self._fetching is None:
            return
        self._fetching.result()
        for load in self._loads:
            t = load.transfer
            good = min(load.loaded, t.end)
            if len(load.layers_done) < len(self.caches):
                good = t.start
            self._settle(t, good, load.block_size)
        self._loads = []
        self._fetching = None

    def _load_async(self, t: Transfer, block_size: int) -> None:
        """Fetch ``t`` and scatter every layer (its blocks belong to a request vLLM
        does not run until :meth:`take_received` names it), then report it."""
        chunk = self.kv.config.chunk_tokens
        fetch_start = t.start - t.start % chunk
        good = t.start
        try:
            with torch.inference_mode(False):
                staging = torch.empty(
                    self.kv.layout.chunk_shape(t.end - fetch_start), dtype=self.kv.layout.dtype
                )
            loaded, _ = self.kv.retrieve(
                t.token_ids, extra_keys=t.extra_keys, out=staging, start=fetch_start
            )
            n = min(loaded, t.end) - t.start
            if n > 0:
                slots = t.slot_mapping(block_size)[:n]
                skip = t.start - fetch_start
                for layer, cache in enumerate(self.caches):
                    part = staging[layer, :, skip : skip + n]
                    scatter_paged_layer(part, cache, slots, self.layout)
                good = t.start + n
        except Exception:
            log.exception("kvtier: loading %d tokens of request %s failed", t.end, t.req_id)
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
        """Gather layer ``layer_name``'s KV of the plan's saves out of the paged cache."""
        layer = self.layer_index.get(layer_name)
        if layer is None or not plan.saves or layer in self._saved_layers:
            return
        if not self._saves:
            self._prepare_saves(plan)
        for _, slots, staging in self._saves:
            gather_paged_layer(self.caches[layer], slots, self.layout, out=staging[layer])
        self._saved_layers.add(layer)

    def _prepare_saves(self, plan: StepPlan) -> None:
        total = sum(t.end - t.start for t in plan.saves)
        staging = self._buffer("save", total)
        offset = 0
        for t in plan.saves:
            n = t.end - t.start
            slots = t.slot_mapping(plan.block_size)
            self._saves.append((t, slots, staging[:, :, offset : offset + n]))
            offset += n

    def finish_step(self, plan: StepPlan) -> None:
        """End of the step: settle the loads and hand the saves to kvtier."""
        self._finish_loads()
        if plan.saves:
            for name in self.layer_index:
                self.save_layer(name, plan)
            for transfer, _, staging in self._saves:
                self.kv.store(
                    transfer.token_ids,
                    staging,
                    extra_keys=transfer.extra_keys,
                    start=transfer.start,
                )
                self._count(saves=1, save_tokens=transfer.end - transfer.start)
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

    def _buffer(self, name: str, tokens: int) -> torch.Tensor:
        """A reusable host staging tensor with room for ``tokens`` tokens (grown as
        needed; pinned when the caches live on a GPU). It is a normal tensor even when
        vLLM calls in inference mode, so that the load thread may write it."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape[2] < tokens:
            shape = self.kv.layout.chunk_shape(tokens)
            pin = bool(self.caches) and self.caches[0].is_cuda
            with torch.inference_mode(False):
                buf = torch.empty(shape, dtype=self.kv.layout.dtype, pin_memory=pin)
            self._buffers[name] = buf
        return buf[:, :, :tokens]

    def close(self) -> None:
        """Stop the load thread and drop the staging buffers."""
        self._pool.shutdown(wait=True)
        self._async_pool.shutdown(wait=True)
        self._buffers.clear()
