"""The reference quantisation kernels: exact arithmetic, blocking, error bounds."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.core.errors import ConfigError
from kvtier.kernels import quant
from kvtier.kernels.quant import (
    dequantize_fp8_into,
    dequantize_into,
    quantize,
    quantize_fp8_into,
    quantize_into,
)

FLOATS = [torch.float32, torch.float16, torch.bfloat16]


def kv_like(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """``[..., heads, head_dim]`` normal data, per-head channel scales, two 3x outliers.

    Harsher than keys captured from all-MiniLM-L6-v2 (bench/codecs.py), whose
    largest channel std is ~3.7x the median channel's, as here.
    """
    gen = torch.Generator().manual_seed(seed)
    heads, head_dim = shape[-2:]
    channels = torch.exp(0.3 * torch.randn(heads, head_dim, generator=gen))
    outliers = torch.rand(heads, head_dim, generator=gen).argsort(dim=-1)[:, :2]
    channels.scatter_(1, outliers, channels.gather(1, outliers) * 3)
    return (torch.randn(shape, generator=gen) * channels).to(dtype)


def rel_rmse(approx: torch.Tensor, exact: torch.Tensor) -> float:
    err = (approx.double() - exact.double()).pow(2).mean().sqrt()
    return float(err / exact.double().pow(2).mean().sqrt())


def naive_quantize(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The module docstring's arithmetic, written out without blocks or tricks."""
    qmax = 2**bits - 1
    xf = x.float()
    lo, hi = xf.amin(-1), xf.amax(-1)
    scale = ((hi - lo) / qmax).to(x.dtype)
    zero = lo.to(x.dtype)
    s = scale.float()
    s = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.clamp(torch.round((xf - lo[..., None]) / s[..., None]), 0, qmax).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale, zero


def naive_dequantize(
    q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    if bits == 4:
        q = torch.stack([q & 15, q >> 4], dim=-1).flatten(-2)
    return (q.float() * scale.float()[..., None] + zero.float()[..., None]).to(scale.dtype)


@pytest.fixture
def small_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Force many small blocks so block boundaries are exercised."""
    monkeypatch.setattr(quant, "_BLOCK_ELEMS", 24)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_matches_documented_arithmetic_bit_for_bit(
    small_blocks: None, dtype: torch.dtype, bits: int
) -> None:
    full = kv_like((3, 2, 9, 2, 8), dtype, seed=bits)
    x = full[:, :, 2:7]  # non-contiguous, like a chunk sliced out of a KV cache
    q, scale, zero = quantize(x, bits)
    ref_q, ref_scale, ref_zero = naive_quantize(x, bits)
    assert torch.equal(q, ref_q)
    assert torch.equal(scale.view(torch.uint8), ref_scale.view(torch.uint8))
    assert torch.equal(zero.view(torch.uint8), ref_zero.view(torch.uint8))
    out = torch.empty_like(x)
    dequantize_into(q, scale, zero, bits, out)
    assert torch.equal(
        out.view(torch.uint8), naive_dequantize(q, scale, zero, bits).view(torch.uint8)
    )


def test_rounding_is_half_to_even() -> None:
    x = torch.tensor([[0.0, 0.5, 1.5, 2.5, 3.5, 254.5, 255.0]])
    q, scale, zero = quantize(x, 8)
    assert scale.item() == 1.0 and zero.item() == 0.0
    assert q.tolist() == [[0, 0, 2, 2, 4, 254, 255]]


def test_int4_packs_even_index_in_low_nibble() -> None:
    x = torch.tensor([[0.0, 15.0, 3.0, 7.0]])
    q, scale, _ = quantize(x, 4)
    assert scale.item() == 1.0
    assert q.tolist() == [[0xF0, 0x73]]


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_rows_give_zero_scale_and_exact_values(bits: int) -> None:
    x = torch.full((2, 3, 4), 1.25, dtype=torch.float16)
    q, scale, zero = quantize(x, bits)
    assert torch.all(q == 0) and torch.all(scale == 0)
    out = torch.empty_like(x)
    dequantize_into(q, scale, zero, bits, out)
    assert torch.equal(out, x)


def test_rounded_scale_never_overflows_qmax() -> None:
    # (hi - lo) / 255 rounds down in fp16 here, so (hi - lo) / scale exceeds 255.
    x = torch.tensor([[0.0, 1.0009765625]], dtype=torch.float16)
    q, scale, _ = quantize(x, 8)
    assert float(x[0, 1]) / scale.float().item() > 255
    assert q.tolist() == [[0, 255]]


def test_int4_rejects_odd_head_dim() -> None:
    with pytest.raises(ConfigError, match="even"):
        quantize(torch.zeros(2, 5), 4)


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_input_is_rejected(bad: float) -> None:
    x = torch.zeros(2, 8)
    x[1, 3] = bad
    with pytest.raises(ConfigError, match="finite"):
        quantize(x, 8)
    with pytest.raises(ConfigError, match="finite"):
        quantize_fp8_into(x, torch.empty(2, 8, dtype=torch.uint8), torch.empty(2))


def test_overflowing_row_range_is_rejected() -> None:
    x = torch.tensor([[-3e38, 3e38]])
    with pytest.raises(ConfigError, match="finite"):
        quantize(x, 8)


def test_input_is_not_modified() -> None:
    x = kv_like((4, 2, 16), torch.float32)
    before = x.clone()
    quantize(x, 8)
    quantize_fp8_into(x, torch.empty(4, 2, 16, dtype=torch.uint8), torch.empty(4, 2))
    assert torch.equal(x, before)


def test_empty_tensors() -> None:
    q, scale, zero = quantize(torch.zeros(2, 0, 3, 8), 8)
    assert q.shape == (2, 0, 3, 8) and scale.shape == (2, 0, 3)
    out = torch.zeros(2, 0, 3, 8)
    dequantize_into(q, scale, zero, 8, out)
    assert out.numel() == 0


@pytest.mark.parametrize(
    ("bits", "head_dim", "bound"),
    # Per-token int4 error grows with head_dim: ~13% on this data at head_dim 128.
    [(8, 32, 0.01), (8, 128, 0.01), (4, 32, 0.10)],
)
@pytest.mark.parametrize("dtype", FLOATS)
def test_error_bound_on_kv_like_data(
    bits: int, head_dim: int, bound: float, dtype: torch.dtype
) -> None:
    x = kv_like((4, 2, 64, 8, head_dim), dtype)
    q, scale, zero = quantize(x, bits)
    out = torch.empty_like(x)
    dequantize_into(q, scale, zero, bits, out)
    err = rel_rmse(out, x)
    assert err <= bound, f"int{bits} {dtype} head_dim {head_dim}: relative RMSE {err:.3%}"


@pytest.mark.parametrize("dtype", FLOATS)
def test_fp8_error_bound_and_range_beyond_448(dtype: torch.dtype) -> None:
    x = kv_like((2, 2, 32, 4, 64), dtype, seed=2)
    x = (x.float() * (1e4 if dtype != torch.float16 else 1e3)).to(dtype)
    assert x.abs().max() > 448
    q = torch.empty(x.shape, dtype=torch.uint8)
    scale = torch.empty(x.shape[:-1])
    quantize_fp8_into(x, q, scale)
    out = torch.empty_like(x)
    dequantize_fp8_into(q, scale, out)
    err = rel_rmse(out, x)
    assert err <= 0.04, f"fp8 {dtype}: relative RMSE {err:.3%}"


def test_fp8_matches_documented_arithmetic(small_blocks: None) -> None:
    x = kv_like((3, 5, 8), torch.bfloat16)[:, 1:4]
    q = torch.empty(x.shape, dtype=torch.uint8)
    scale = torch.empty(x.shape[:-1])
    quantize_fp8_into(x, q, scale)
    ref_scale = x.float().abs().amax(-1) / 448
    ref_q = (x.float() / ref_scale[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(scale, ref_scale)
    assert torch.equal(q, ref_q.view(torch.uint8))
    out = torch.empty_like(x)
    dequantize_fp8_into(q, scale, out)
    assert torch.equal(out, (ref_q.float() * ref_scale[..., None]).to(x.dtype))


@settings(max_examples=60, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), min_size=1, max_size=4),
    max_rows=st.integers(1, 40),
)
def test_row_blocks_cover_every_row_once_in_order(shape: list[int], max_rows: int) -> None:
    x = torch.arange(math.prod(shape) * 2).view(*shape, 2)
    rows = []
    for first, block in quant._row_blocks(x, max_rows):
        block_rows = block.reshape(-1, 2)[:, 0] // 2
        assert block_rows.numel() <= max(max_rows, shape[-1] if shape else 1)
        assert block_rows.tolist() == list(range(first, first + block_rows.numel()))
        rows.extend(block_rows.tolist())
    assert rows == list(range(math.prod(shape)))


def test_quantize_into_rejects_wrong_output_sizes() -> None:
    x = torch.zeros(2, 8)
    with pytest.raises(ValueError, match="q has the wrong size"):
        quantize_into(x, 8, torch.empty(2, 7, dtype=torch.uint8), torch.empty(2), torch.empty(2))
    with pytest.raises(ConfigError, match="4 or 8"):
        quantize(x, 3)


def test_scratch_made_under_inference_mode_works_outside_it() -> None:
    x = torch.randn(3, 5, 64)
    results: list[tuple[torch.Tensor, ...]] = []

    def fresh_thread() -> None:  # scratch tensors are per thread: these are its first
        with torch.inference_mode():
            results.append(quant.quantize(x, bits=8))
        results.append(quant.quantize(x, bits=8))

    thread = threading.Thread(target=fresh_thread)
    thread.start()
    thread.join()
    assert len(results) == 2, "quantize failed outside inference mode"
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
