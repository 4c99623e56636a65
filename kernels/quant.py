"""Reference quantisation kernels in pure torch: LMDeploy's int8/int4 scheme and fp8.

All kernels quantise per *row* of the last axis: for a KV tensor ``[..., head_dim]``
that is one scale (and zero) per token per head. Rows are processed in cache-sized
blocks of vectorised torch ops (no Python loop runs per token) with per-thread
scratch reused across calls, so a call allocates nothing proportional to the tensor.

Exact arithmetic of :func:`quantize_into` (``qmax = 2**bits - 1``), which an
accelerated kernel must reproduce byte for byte. Every operation is IEEE-754 fp32
with round-to-nearest-even; there is no reciprocal, no FMA contraction and no
fast-math (in CUDA: ``__fsub_rn``, ``__fdiv_rn``, ``rintf``, ``__float2half_rn``)::

    lo, hi = min(row), max(row)                 # exact, as fp32
    scale  = to_dtype((hi - lo) / qmax)         # stored; round to nearest even
    zero   = to_dtype(lo)                       # stored; exact (lo is an element)
    s      = float32(scale), or 1.0 where it is 0 (a constant row: q = 0)
    q      = min(rint((float32(x) - lo) / s), qmax)   # rint: round half to even

``q >= 0`` always holds because ``x >= lo``. int4 packs two values per byte along
the row: byte ``i`` is ``q[2i] | q[2i + 1] << 4`` (low nibble = even index).
Dequantisation is ``to_dtype(float32(q) * float32(scale) + float32(zero))`` with
the product and the sum rounded separately (no FMA).

Inputs must be finite with each row's ``max - min`` finite in fp32; anything else
raises :class:`~kvtier.core.errors.ConfigError` (after the outputs were written).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Iterator

import torch

from kvtier.core.errors import ConfigError

FP8_MAX = 448.0
"""Largest finite ``float8_e4m3fn`` value."""

_BLOCK_ELEMS = 3 << 19
"""Elements per block: large enough that per-op dispatch costs little (a 256-token
chunk of a small model, such as all-MiniLM-L6-v2's 1.2 M values, is a single block),
small enough that the fp32 scratch (6 MiB) stays in the last-level cache."""

_ROUND_MAGIC = float(1 << 23)
"""``v + 2**23`` rounds ``0 <= v < 2**22`` half to even and leaves ``rint(v)`` in the
low mantissa bits, so the low byte of an int32 view of the sum is the quantised
value: cheaper than ``round_()`` followed by a float-to-uint8 conversion."""

_local = threading.local()


def _scratch(name: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A per-thread reusable 1-D tensor of ``numel`` elements (contents undefined)."""
    cache: dict[tuple[str, torch.dtype, torch.device], torch.Tensor]
    cache = _local.__dict__.setdefault("tensors", {})
    key = (name, dtype, device)
    tensor = cache.get(key)
    if tensor is None or tensor.numel() < numel:
        # Never an inference tensor: one made under inference_mode() could not be
        # written outside it later.
        with torch.inference_mode(False):
            tensor = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return tensor[:numel]


def _row_blocks(x: torch.Tensor, max_rows: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Split ``x`` (any strides) into views of consecutive rows, without copying.

    Yields ``(first_row, view)``: ``view`` covers rows ``first_row ..`` in the
    row-major order of ``x.shape[:-1]`` and has at most ``max_rows`` rows when the
    shape allows it (a single leading axis longer than ``max_rows`` is split).
    """
    lead = x.shape[:-1]
    inner, axis = 1, len(lead)
    while axis > 0 and inner * lead[axis - 1] <= max_rows:
        axis -= 1
        inner *= lead[axis]
    if axis == 0:
        yield 0, x
        return
    step = max(1, max_rows // inner)
    row = 0
    for prefix in itertools.product(*(range(n) for n in lead[: axis - 1])):
        outer = x[prefix]
        for start in range(0, lead[axis - 1], step):
            block = outer[start : start + step]
            yield row, block
            row += block.shape[0] * inner


def _head(tensors: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """The first ``n`` rows of each of ``tensors`` (which all have the same number)."""
    return tensors if tensors[0].shape[0] == n else tuple(t[:n] for t in tensors)


def _check_bits(bits: int) -> int:
    if bits not in (4, 8):
        raise ConfigError(f"quantisation supports 4 or 8 bits, got {bits}")
    return (1 << bits) - 1


def packed_head_dim(head_dim: int, bits: int) -> int:
    """Bytes one quantised row takes; int4 needs an even ``head_dim``."""
    _check_bits(bits)
    if bits == 4 and head_dim % 2:
        raise ConfigError(
            f"int4 packs two values per byte along head_dim, which must be even; got {head_dim}"
        )
    return head_dim * bits // 8


def _rows(x: torch.Tensor) -> int:
    return math.prod(x.shape[:-1])


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise ValueError(what)


def _non_finite(what: str) -> ConfigError:
    """The error for a chunk with inf/NaN values or an overflowing row range."""
    return ConfigError(
        f"{what} needs finite values with a finite per-row range; the chunk holds "
        "inf/NaN or overflows, use a lossless codec for it"
    )


def _check_finite(scale: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(scale).all()):
        raise _non_finite(what)


def quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise ``x`` (``[..., head_dim]``, float) per row; see the module docstring.

    Returns ``(q, scale, zero)``: ``q`` is uint8 ``[..., head_dim * bits // 8]``,
    ``scale`` and ``zero`` are ``[...]`` in ``x.dtype``. Allocates its outputs; use
    :func:`quantize_into` to write into existing memory.
    """
    lead = x.shape[:-1]
    q = torch.empty(*lead, packed_head_dim(x.shape[-1], bits), dtype=torch.uint8, device=x.device)
    scale = torch.empty(lead, dtype=x.dtype, device=x.device)
    zero = torch.empty(lead, dtype=x.dtype, device=x.device)
    quantize_into(x, bits, q, scale, zero)
    return q, scale, zero


def quantize_into(
    x: torch.Tensor, bits: int, q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor
) -> None:
    """:func:`quantize` into contiguous ``q`` (uint8), ``scale`` and ``zero`` (``x.dtype``).

    ``x`` may have any strides and is not modified.
    """
    qmax = _check_bits(bits)
    head_dim = x.shape[-1]
    packed = packed_head_dim(head_dim, bits)
    rows = _rows(x)
    _require(q.is_contiguous() and q.numel() == rows * packed, "q has the wrong size")
    _require(scale.is_contiguous() and scale.numel() == rows, "scale has the wrong size")
    _require(zero.is_contiguous() and zero.numel() == rows, "zero has the wrong size")
    if x.numel() == 0:
        scale.zero_()
        zero.zero_()
        return
    q2, scale2, zero2 = q.view(rows, packed), scale.view(rows, 1), zero.view(rows, 1)
    max_rows = max(1, _BLOCK_ELEMS // head_dim)
    cap, dev = min(rows, max_rows), x.device
    full = (
        _scratch("x", cap * head_dim, torch.float32, dev).view(cap, head_dim),
        _scratch("pairs", cap * packed, torch.float32, dev).view(cap, packed),
        _scratch("lo", cap, torch.float32, dev).view(cap, 1),
        _scratch("s", cap, torch.float32, dev).view(cap, 1),
        _scratch("sign", cap, torch.float32, dev).view(cap, 1),
    )
    bounds = _scratch("bounds", 2, torch.float32, dev)
    # The clamp matters only where s rounded so far below (hi - lo) / qmax that
    # (hi - lo) / s reaches qmax + 0.5: possible for int8 with a bfloat16 scale (8-bit
    # significand) or a subnormal scale, never otherwise (nor for inf/NaN): skip it there.
    always_clamp = bits == 8 and x.dtype == torch.bfloat16
    tiny = torch.finfo(x.dtype).tiny
    finite = True
    for r0, block in _row_blocks(x, max_rows):
        t, pairs, lo, s, sign = _head(full, block.numel() // head_dim)
        n = t.shape[0]
        t.view(block.shape).copy_(block)
        torch.amin(t, dim=1, keepdim=True, out=lo)
        torch.amax(t, dim=1, keepdim=True, out=s)
        s.sub_(lo).div_(qmax)
        scale_b = scale2[r0 : r0 + n]
        scale_b.copy_(s)
        zero2[r0 : r0 + n].copy_(lo)
        s.copy_(scale_b)
        # s - (sign(s) - 1) turns 0 into 1 and keeps every other s (inf and NaN too).
        s.sub_(torch.sign(s, out=sign).sub_(1))
        torch.aminmax(s, out=(bounds[0], bounds[1]))
        s_min, s_max = bounds.tolist()
        finite &= s_max < math.inf
        t.sub_(lo).div_(s)
        if always_clamp or not s_min >= tiny:
            t.clamp_max_(qmax)
        if bits == 4:
            t = torch.add(t.round_()[:, 0::2], t[:, 1::2], alpha=16, out=pairs)
        t.add_(_ROUND_MAGIC)
        q2[r0 : r0 + n].copy_(t.view(torch.int32))
    if not finite:
        raise _non_finite(f"int{bits} quantisation")


def dequantize_into(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, out: torch.Tensor
) -> None:
    """Inverse of :func:`quantize_into`: write the reconstruction into ``out``.

    ``out`` (``[..., head_dim]``, float, any strides) gives the target shape and
    dtype; ``q``, ``scale`` and ``zero`` must be contiguous with the sizes
    :func:`quantize` produces for it.
    """
    _check_bits(bits)
    head_dim = out.shape[-1]
    packed = packed_head_dim(head_dim, bits)
    rows = _rows(out)
    _require(q.numel() == rows * packed, "q has the wrong size")
    _require(scale.numel() == rows and zero.numel() == rows, "scale/zero have the wrong size")
    if out.numel() == 0:
        return
    q2, scale2, zero2 = q.view(rows, packed), scale.view(rows, 1), zero.view(rows, 1)
    max_rows = max(1, _BLOCK_ELEMS // head_dim)
    cap, dev = min(rows, max_rows), out.device
    full = (
        _scratch("x", cap * head_dim, torch.float32, dev).view(cap, head_dim),
        _scratch("nibble", cap * packed, torch.uint8, dev).view(cap, packed),
        _scratch("s", cap, torch.float32, dev).view(cap, 1),
        _scratch("lo", cap, torch.float32, dev).view(cap, 1),
    )
    for r0, block in _row_blocks(out, max_rows):
        t, nibble, s, z = _head(full, block.numel() // head_dim)
        n = t.shape[0]
        qb = q2[r0 : r0 + n]
        if bits == 8:
            t.copy_(qb)
        else:
            t[:, 0::2].copy_(torch.bitwise_and(qb, 15, out=nibble))
            t[:, 1::2].copy_(torch.bitwise_right_shift(qb, 4, out=nibble))
        s.copy_(scale2[r0 : r0 + n])
        z.copy_(zero2[r0 : r0 + n])
        t.mul_(s).add_(z)
        block.copy_(t.view(block.shape))


def quantize_fp8_into(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    """Quantise ``x`` to ``float8_e4m3fn`` with one fp32 scale per row.

    ``scale = max(|row|) / 448`` (fp32, stored as is; 1.0 is used where it is 0),
    ``q = to_e4m3fn(clamp(float32(x) / scale, -448, 448))`` with IEEE division and a
    round-to-nearest-even conversion. ``q`` (uint8 or float8, ``[..., head_dim]``)
    and ``scale`` (float32, ``[...]``) must be contiguous.
    """
    head_dim = x.shape[-1]
    rows = _rows(x)
    _require(q.is_contiguous() and q.numel() == rows * head_dim, "q has the wrong size")
    _require(scale.is_contiguous() and scale.numel() == rows, "scale has the wrong size")
    _require(scale.dtype == torch.float32, "scale must be float32")
    if x.numel() == 0:
        scale.zero_()
        return
    q2, scale1 = q.view(torch.float8_e4m3fn).view(rows, head_dim), scale.view(rows)
    max_rows = max(1, _BLOCK_ELEMS // head_dim)
    cap, dev = min(rows, max_rows), x.device
    xs = _scratch("x", cap * head_dim, torch.float32, dev)
    los, ss = _scratch("lo", cap, torch.float32, dev), _scratch("s", cap, torch.float32, dev)
    for r0, block in _row_blocks(x, max_rows):
        n = block.numel() // head_dim
        t, lo, s, amax = xs[: n * head_dim].view(n, head_dim), los[:n], ss[:n], scale1[r0 : r0 + n]
        t.view(block.shape).copy_(block)
        torch.amax(t, dim=1, out=amax)
        torch.amin(t, dim=1, out=lo)
        torch.maximum(amax, lo.neg_(), out=amax).div_(FP8_MAX)
        s.copy_(amax).masked_fill_(s == 0, 1.0)
        t.div_(s[:, None]).clamp_(-FP8_MAX, FP8_MAX)
        q2[r0 : r0 + n].copy_(t)
    _check_finite(scale, "fp8 quantisation")


def _fp8_table(device: torch.device) -> torch.Tensor:
    """fp32 value of every e4m3fn byte: a gather beats torch's fp8 -> fp32 cast 5x."""
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    return codes.view(torch.float8_e4m3fn).to(torch.float32).to(device)


_FP8_TABLES: dict[torch.device, torch.Tensor] = {}


def dequantize_fp8_into(q: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """Inverse of :func:`quantize_fp8_into`: ``out = to_dtype(float32(q) * scale)``."""
    head_dim = out.shape[-1]
    rows = _rows(out)
    _require(q.numel() == rows * head_dim, "q has the wrong size")
    _require(scale.numel() == rows and scale.dtype == torch.float32, "scale has the wrong size")
    if out.numel() == 0:
        return
    dev = out.device
    table = _FP8_TABLES.get(dev)
    if table is None:
        table = _FP8_TABLES[dev] = _fp8_table(dev)
    codes, scale1 = q.view(torch.uint8).view(rows * head_dim), scale.view(rows)
    max_rows = max(1, _BLOCK_ELEMS // head_dim)
    cap = min(rows, max_rows)
    xs = _scratch("x", cap * head_dim, torch.float32, dev)
    idxs = _scratch("idx", cap * head_dim, torch.int32, dev)
    for r0, block in _row_blocks(out, max_rows):
        n = block.numel() // head_dim
        t, idx = xs[: n * head_dim], idxs[: n * head_dim]
        idx.copy_(codes[r0 * head_dim : (r0 + n) * head_dim])
        torch.index_select(table, 0, idx, out=t)
        t.view(n, head_dim).mul_(scale1[r0 : r0 + n, None])
        block.copy_(t.view(block.shape))
