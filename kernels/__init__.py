"""Compute kernels behind kvtier's codecs and engine integrations.

:mod:`kvtier.kernels.quant` holds the pure-torch reference quantisation kernels,
:mod:`kvtier.kernels.paged` the reference gather and scatter of paged KV caches and
:mod:`kvtier.kernels.rope` the re-rotation of RoPE keys to new positions; an
accelerated kernel must reproduce their output byte for byte. Integrations call the
paged-KV functions through this package, so an accelerated implementation replaces
the reference here without touching them.
"""

from kvtier.kernels.paged import (
    PagedLayout,
    PagedSlots,
    gather_paged,
    gather_paged_layer,
    paged_view,
    scatter_paged,
    scatter_paged_layer,
)

__all__ = [
    "PagedLayout",
    "PagedSlots",
    "gather_paged",
    "gather_paged_layer",
    "paged_view",
    "scatter_paged",
    "scatter_paged_layer",
]
