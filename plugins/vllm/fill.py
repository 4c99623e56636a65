"""Filling vLLM's paged cache from kvtier: the copies of the worker's loads
(:class:`CacheFiller`), one copy from the tier's bytes into the cache.

Layer-wise (the default), :meth:`KVTier.retrieve_held` keeps every verified chunk in its
blob (for the raw codec, the blob's own bytes) and the chunks are copied into the paged
cache layer by layer, each layer's event set once it is in place. With ``blob_layout:
layers``, :meth:`KVTier.retrieve_layers` streams layered blobs from tiers that read byte
ranges, so layer ``i`` is copied (and its event set) while later layers are still being
read. Whole (``layerwise=False``), :meth:`KVTier.retrieve_to` hands each chunk to a sink
that scatters it into every layer as it arrives. All copies go through
:mod:`kvtier.kernels`; copies into a cache on another device are synchronized before a
layer is reported in place.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kvtier.core.engine import HeldChunks, KVTier
from kvtier.core.retrieval import Wanted
from kvtier.kernels import PagedLayout, PagedSlots, scatter_paged
from kvtier.plugins.vllm.metadata import Transfer

log = logging.getLogger(__name__)


@dataclass
class Load:
    """One load of a step: ``transfer``'s tokens into their ``slots``."""

    transfer: Transfer
    fetch_start: int  # ``transfer.start`` rounded down to a chunk
    slots: torch.Tensor  # slot of each token in [transfer.start, transfer.end)
    block_size: int
    loaded: int = 0  # end of the tokens kvtier delivered
    layers_done: set[int] = field(default_factory=set)


def overlap(
    t: Transfer, slots: torch.Tensor, first: int, chunk: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The part of ``chunk`` (the KV of tokens from ``first`` on) inside ``[t.start,
    t.end)`` and those tokens' ``slots`` (``slots`` holds tokens ``[t.start, t.end)``);
    ``None`` when they do not overlap."""
    lo, hi = max(first, t.start), min(first + chunk.shape[2], t.end)
    if hi <= lo:
        return None
    return chunk[:, :, lo - first : hi - first], slots[lo - t.start : hi - t.start]


class CacheFiller:
    """Copies the chunks kvtier delivers into the paged caches ``caches`` (one per
    layer, laid out as ``layout``), layer by layer when ``layerwise``."""

    def __init__(
        self, kv: KVTier, caches: Sequence[torch.Tensor], layout: PagedLayout, layerwise: bool
    ) -> None:
        self.kv = kv
        self.caches = list(caches)
        self.layout = layout
        self.layerwise = layerwise

    def fill(self, loads: list[Load], ready: list[threading.Event]) -> None:
        """Fetch ``loads`` into the paged cache; each load's ``loaded`` ends up at the
        end of the tokens kvtier delivered. Layer-wise, ``ready[i]`` is set once layer
        ``i`` of every load is in place (every event by the end, also after a failure);
        whole, the caller waits for this call."""
        if not self.layerwise:
            for load in loads:
                load.loaded = self.fill_whole(load.transfer, load.fetch_start, load.slots)
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

    def _stream_layers(self, loads: list[Load], ready: list[threading.Event]) -> None:
        """Fetch the loads layer by layer (:meth:`KVTier.retrieve_layers`), copying each
        chunk's layer into the paged cache as it arrives and setting each layer's event
        once every load's part of it is in place."""
        wanted = [Wanted(x.transfer.token_ids, x.transfer.extra_keys, x.fetch_start) for x in loads]
        chunk = self.kv.config.chunk_tokens
        targets: dict[tuple[int, int], tuple[PagedSlots, int, int]] = {}
        for request, load in enumerate(loads):  # each chunk part's slots, for every layer
            t = load.transfer
            for first in range(load.fetch_start, t.end, chunk):
                lo, hi = max(first, t.start), min(first + chunk, t.end)
                where = load.slots[lo - t.start : hi - t.start].to(self.caches[0].device)
                targets[request, first] = (PagedSlots(self.caches, where, self.layout), lo, hi)

        def deliver(request: int, first: int, layer: int, kv: torch.Tensor) -> None:
            slots, lo, hi = targets[request, first]
            source = self._on_cache_device(kv[:, lo - first : hi - first])
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

    def _hold(self, load: Load) -> HeldChunks | None:
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
        self, loads: list[Load], held: list[HeldChunks | None], ready: list[threading.Event]
    ) -> None:
        """Copy the held chunks into the paged cache layer by layer, setting each
        layer's event once every load's part of it is in place."""
        parts = []  # (slots, [L, 2, T, H, D] source) of every chunk part to copy
        for load, chunks in zip(loads, held, strict=True):
            for first, chunk in chunks.chunks if chunks is not None else ():
                if (part := overlap(load.transfer, load.slots, first, chunk)) is not None:
                    source = self._on_cache_device(part[0])
                    where = part[1].to(source.device)
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

    def fill_whole(self, t: Transfer, fetch_start: int, slots: torch.Tensor) -> int:
        """Fetch ``t`` from ``fetch_start`` and scatter each chunk that arrives into
        every layer's cache at ``slots`` (those of tokens ``[t.start, t.end)``);
        returns the end of the tokens kvtier delivered (``fetch_start`` on failure).
        Chunks past that end may have been scattered: their blocks are load errors,
        which vLLM recomputes, overwriting them."""

        def scatter(first: int, chunk: torch.Tensor) -> None:
            if (part := overlap(t, slots, first, chunk)) is not None:
                self._scatter(*part)

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
