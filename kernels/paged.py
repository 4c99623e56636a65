"""Reference gather and scatter of paged KV caches by slot mapping, in pure torch.

An inference engine keeps each layer's KV in blocks of ``block_size`` token slots;
token ``i`` of a copy lives in slot ``slot_mapping[i] = block_id * block_size + offset``.
These functions move the KV of such slots between the per-layer caches and kvtier's
chunk tensor ``[num_layers, 2, tokens, kv_heads, head_dim]`` (index 0 of axis 1 holds
keys, 1 holds values).

Attention backends lay the blocks out differently; :class:`PagedLayout` names each
layout explicitly and :func:`paged_view` maps it onto the canonical view
``(2, num_blocks, block_size, kv_heads, head_dim)`` without copying. Runs of
consecutive slots inside one block are copied with one strided copy each, so a
block-aligned transfer costs one copy per block and layer, and nothing is allocated
in proportion to the data.

Every function checks its arguments (shapes, dtypes, devices and that every slot is
in range) before it reads or writes any KV. An accelerated kernel (CUDA) takes the
same arguments and must produce the same bytes; :mod:`kvtier.kernels` exports the
implementation the connector uses.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import torch

from kvtier.core.errors import ConfigError

Run = tuple[int, int, int, int]
"""``(token, block, offset, length)``: ``length`` consecutive slots of one block."""


class PagedLayout(str, enum.Enum):
    """How one layer's paged KV cache is laid out in memory (see :data:`SHAPES`)."""

    FLASH_ATTN = "flash_attn"
    """vLLM's FlashAttention layout before 0.32."""
    FLASHINFER = "flashinfer"
    """vLLM's FlashInfer and Triton layout before 0.32."""
    CPU = "cpu"
    """vLLM's ``CPU_ATTN`` backend: each block and head holds ``block_size`` key rows
    followed by ``block_size`` value rows."""
    KV_CONCAT = "kv_concat"
    """vLLM 0.32's FlashAttention, FlashInfer and Triton backends: each token's key
    then value along the last axis, blocks in any stride order."""


SHAPES: dict[PagedLayout, str] = {
    PagedLayout.FLASH_ATTN: "(2, num_blocks, block_size, kv_heads, head_dim)",
    PagedLayout.FLASHINFER: "(num_blocks, 2, block_size, kv_heads, head_dim)",
    PagedLayout.CPU: "(num_blocks, kv_heads, block_size, 2 * head_dim), contiguous per block",
    PagedLayout.KV_CONCAT: "(num_blocks, kv_heads, block_size, 2 * head_dim), last axis dense",
}
"""The shape of one layer's cache in each layout."""


def paged_view(kv_cache: torch.Tensor, layout: PagedLayout | str) -> torch.Tensor:
    """The view ``(2, num_blocks, block_size, kv_heads, head_dim)`` of one layer's
    cache, sharing its memory; :class:`ConfigError` if ``kv_cache`` does not have the
    shape and strides ``layout`` needs (:data:`SHAPES`)."""
    layout = as_layout(layout)
    shape = tuple(kv_cache.shape)
    if layout is PagedLayout.FLASH_ATTN:
        _need(kv_cache.dim() == 5 and shape[0] == 2, kv_cache, layout)
        return kv_cache
    if layout is PagedLayout.FLASHINFER:
        _need(kv_cache.dim() == 5 and shape[1] == 2, kv_cache, layout)
        return kv_cache.transpose(0, 1)
    _need(kv_cache.dim() == 4 and shape[3] % 2 == 0, kv_cache, layout)
    num_blocks, heads, block_size, width = shape
    head_dim = width // 2
    if layout is PagedLayout.KV_CONCAT:
        _need(kv_cache.stride(3) == 1, kv_cache, layout)
        return kv_cache.view(num_blocks, heads, block_size, 2, head_dim).permute(3, 0, 2, 1, 4)
    # PagedLayout.CPU
    _need(kv_cache.stride()[2:] == (width, 1), kv_cache, layout)
    rows = kv_cache.as_strided(
        (num_blocks, heads, 2, block_size, head_dim),
        (kv_cache.stride(0), kv_cache.stride(1), block_size * head_dim, head_dim, 1),
    )
    return rows.permute(2, 0, 3, 1, 4)


def as_layout(layout: PagedLayout | str) -> PagedLayout:
    """``layout`` as a :class:`PagedLayout`; :class:`ConfigError` for an unknown name."""
    try:
        return PagedLayout(layout)
    except ValueError:
        raise ConfigError(f"unknown paged KV layout {layout!r}; use one of {_names()}") from None


def gather_paged(
    kv_caches: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    layout: PagedLayout | str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Copy the KV of ``slot_mapping``'s slots out of every layer's cache.

    Returns ``out`` (allocated if ``None``): ``[num_layers, 2, len(slot_mapping),
    kv_heads, head_dim]`` with ``out[l, :, i]`` the KV of slot ``slot_mapping[i]`` of
    ``kv_caches[l]``.
    """
    views = _views(kv_caches, layout)
    runs = _runs(slot_mapping, views[0])
    out = _chunk(out, views, len(slot_mapping), "out")
    for layer, view in enumerate(views):
        _gather_runs(view, runs, out[layer])
    return out


def scatter_paged(
    chunk: torch.Tensor,
    kv_caches: Sequence[torch.Tensor],
    slot_mapping: torch.Tensor,
    layout: PagedLayout | str,
) -> None:
    """Copy ``chunk`` (``[num_layers, 2, len(slot_mapping), kv_heads, head_dim]``)
    into every layer's cache at ``slot_mapping``'s slots; the reverse of
    :func:`gather_paged`."""
    views = _views(kv_caches, layout)
    runs = _runs(slot_mapping, views[0])
    _chunk(chunk, views, len(slot_mapping), "chunk")
    for layer, view in enumerate(views):
        _scatter_runs(chunk[layer], runs, view)


def gather_paged_layer(
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: PagedLayout | str,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """One layer of :func:`gather_paged`: returns ``out``, ``[2, len(slot_mapping),
    kv_heads, head_dim]``."""
    views = _views([kv_cache], layout)
    runs = _runs(slot_mapping, views[0])
    target = _chunk(None if out is None else out[None], views, len(slot_mapping), "out")
    _gather_runs(views[0], runs, target[0])
    return target[0] if out is None else out


def scatter_paged_layer(
    src: torch.Tensor,
    kv_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    layout: PagedLayout | str,
) -> None:
    """One layer of :func:`scatter_paged`: ``src`` is ``[2, len(slot_mapping),
    kv_heads, head_dim]``."""
    views = _views([kv_cache], layout)
    runs = _runs(slot_mapping, views[0])
    _chunk(src[None], views, len(slot_mapping), "src")
    _scatter_runs(src, runs, views[0])


class PagedSlots:
    """``slot_mapping``'s slots in every layer's cache, checked and split into runs
    once, for copying the same slots layer by layer (a layer-wise load or save)
    without redoing that work per layer: :meth:`scatter_layer` and
    :meth:`gather_layer` are :func:`scatter_paged_layer` and
    :func:`gather_paged_layer` for one layer of ``kv_caches``."""

    def __init__(
        self,
        kv_caches: Sequence[torch.Tensor],
        slot_mapping: torch.Tensor,
        layout: PagedLayout | str,
    ) -> None:
        self._views = _views(kv_caches, layout)
        self._runs = _runs(slot_mapping, self._views[0])
        self.tokens = len(slot_mapping)

    def scatter_layer(self, layer: int, src: torch.Tensor) -> None:
        """Copy ``src`` (``[2, tokens, kv_heads, head_dim]``) into layer ``layer``."""
        _chunk(src[None], self._views[:1], self.tokens, "src")
        _scatter_runs(src, self._runs, self._views[layer])

    def gather_layer(self, layer: int, out: torch.Tensor) -> None:
        """Copy layer ``layer``'s KV of the slots into ``out`` (``[2, tokens, kv_heads,
        head_dim]``)."""
        _chunk(out[None], self._views[:1], self.tokens, "out")
        _gather_runs(self._views[layer], self._runs, out)


def _names() -> str:
    return ", ".join(repr(m.value) for m in PagedLayout)


def _need(cond: bool, kv_cache: torch.Tensor, layout: PagedLayout) -> None:
    if not cond:
        raise ConfigError(
            f"a KV cache of shape {tuple(kv_cache.shape)} and strides {kv_cache.stride()} "
            f"is not in the {layout.value!r} layout {SHAPES[layout]}; pick the layout of "
            f"the attention backend ({_names()})"
        )


def _views(kv_caches: Sequence[torch.Tensor], layout: PagedLayout | str) -> list[torch.Tensor]:
    """Canonical views of every layer; all layers must agree in shape, dtype and device."""
    if not kv_caches:
        raise ConfigError("no KV caches given; pass one tensor per layer")
    views = [paged_view(t, layout) for t in kv_caches]
    first = views[0]
    for i, view in enumerate(views):
        if view.shape != first.shape or view.dtype != first.dtype or view.device != first.device:
            raise ConfigError(
                f"KV cache of layer {i} has shape {tuple(kv_caches[i].shape)}, "
                f"{view.dtype} on {view.device}; layer 0 has "
                f"{tuple(kv_caches[0].shape)}, {first.dtype} on {first.device}"
            )
    return views


def _chunk(
    chunk: torch.Tensor | None, views: list[torch.Tensor], tokens: int, name: str
) -> torch.Tensor:
    """Check (or allocate, on the caches' device) the chunk tensor matching ``views``
    and ``tokens`` slots; a given one may live on another device (host staging)."""
    _, _, _, heads, head_dim = views[0].shape
    shape = (len(views), 2, tokens, heads, head_dim)
    if chunk is None:
        return torch.empty(shape, dtype=views[0].dtype, device=views[0].device)
    if tuple(chunk.shape) != shape or chunk.dtype != views[0].dtype:
        raise ConfigError(
            f"{name} has shape {tuple(chunk.shape)} and dtype {chunk.dtype}; the KV caches "
            f"need {shape} ([num_layers, 2, tokens, kv_heads, head_dim]) and {views[0].dtype}"
        )
    return chunk


def _runs(slot_mapping: torch.Tensor, view: torch.Tensor) -> list[Run]:
    """Validate ``slot_mapping`` against ``view`` and split it into runs of
    consecutive slots within one block."""
    if slot_mapping.dim() != 1 or slot_mapping.dtype not in (torch.int32, torch.int64):
        raise ConfigError(
            f"slot_mapping must be a 1-D int32 or int64 tensor, got shape "
            f"{tuple(slot_mapping.shape)} and {slot_mapping.dtype}"
        )
    _, num_blocks, block_size, _, _ = view.shape
    slots = slot_mapping.tolist()
    if not slots:
        return []
    low, high = min(slots), max(slots)
    if low < 0 or high >= num_blocks * block_size:
        raise ConfigError(
            f"slot_mapping holds slots {low}..{high}, outside the cache's "
            f"{num_blocks} blocks x {block_size} slots (0..{num_blocks * block_size - 1})"
        )
    runs: list[Run] = []
    start = 0
    for i in range(1, len(slots) + 1):
        if i < len(slots) and slots[i] == slots[i - 1] + 1 and slots[i] % block_size:
            continue
        block, offset = divmod(slots[start], block_size)
        runs.append((start, block, offset, i - start))
        start = i
    return runs


def _gather_runs(view: torch.Tensor, runs: list[Run], out: torch.Tensor) -> None:
    for token, block, offset, length in runs:
        out[:, token : token + length].copy_(view[:, block, offset : offset + length])


def _scatter_runs(src: torch.Tensor, runs: list[Run], view: torch.Tensor) -> None:
    for token, block, offset, length in runs:
        view[:, block, offset : offset + length].copy_(src[:, token : token + length])
