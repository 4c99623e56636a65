"""Re-rotating rotary (RoPE) keys from the positions they were computed at to new ones.

A key computed at position ``p`` is ``R(θ(p)) k``, where ``R`` rotates each pair of
dimensions ``(i, i + rotary_dim / 2)`` (the "rotate half" layout of Llama, Qwen2 and
Mistral) by the angle ``p * inv_freq[i]``. Moving it to position ``q`` applies
``R(θ(q) - θ(p))``; values carry no position and are never touched.

Exactness: the angles are formed exactly as transformers forms them (fp32 products of
the position and the fp32 inverse frequencies), and the rotation by their difference
is built in float64 from those fp32 angles, so a re-rotated fp32 key matches the key
the model computes at the new position to float rounding. Half-precision keys are
rotated in fp32 and rounded once.

::

    rope = RotaryConfig.from_config(model.config)
    rerotate_(keys, old_positions, new_positions, rope)   # keys [..., tokens, heads, dim]
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.core.errors import ConfigError

SCALING_TYPES = ("default", "linear", "llama3")
"""The ``rope_type`` values this module re-rotates exactly."""

_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class RotaryConfig:
    """A model's rotary position encoding: what must match for keys to be re-rotated.

    ``rotary_dim`` leading dimensions of each head rotate (all of ``head_dim`` unless the
    model has a ``partial_rotary_factor``); the rest pass through unchanged.
    """

    head_dim: int
    rotary_dim: int
    theta: float
    scaling: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    max_positions: int | None = None
    """The model's context length (``max_position_embeddings``), if known."""

    def __post_init__(self) -> None:
        if self.scaling not in SCALING_TYPES:
            raise ConfigError(
                f"rope scaling {self.scaling!r} cannot be re-rotated exactly; kvtier supports "
                f"{', '.join(SCALING_TYPES)}"
            )
        if not (0 < self.rotary_dim <= self.head_dim) or self.rotary_dim % 2:
            raise ConfigError(
                f"rotary_dim must be even and in (0, head_dim={self.head_dim}], "
                f"got {self.rotary_dim}"
            )
        if not (self.theta > 0 and math.isfinite(self.theta)):
            raise ConfigError(f"rope theta must be a positive number, got {self.theta}")
        if not self.factor > 0:
            raise ConfigError(f"rope scaling factor must be positive, got {self.factor}")
        if self.scaling == "llama3" and not self.high_freq_factor > self.low_freq_factor > 0:
            raise ConfigError(
                "llama3 rope scaling needs high_freq_factor > low_freq_factor > 0, got "
                f"{self.high_freq_factor} and {self.low_freq_factor}"
            )

    @classmethod
    def from_config(cls, config: Any) -> RotaryConfig:
        """The rotary encoding of a transformers model config (``model.config``): reads
        ``rope_parameters`` (transformers 5) or ``rope_theta`` / ``rope_scaling`` (4.x),
        ``head_dim`` and ``partial_rotary_factor``. Anything it cannot re-rotate
        exactly (another scaling type, a model without RoPE) is a :class:`ConfigError`
        naming it."""
        if hasattr(config, "get_text_config"):
            config = config.get_text_config(decoder=True)
        params = _rope_parameters(config)
        kind = str(params.get("rope_type", params.get("type", "default")))
        if kind not in SCALING_TYPES:
            model = getattr(config, "model_type", type(config).__name__)
            raise ConfigError(
                f"{model}: rope_type {kind!r} is not supported for segment reuse (keys "
                f"cannot be re-rotated exactly); supported: {', '.join(SCALING_TYPES)}"
            )
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
        partial = float(params.get("partial_rotary_factor", 1.0) or 1.0)
        if "rope_theta" not in params:
            raise ConfigError(f"{type(config).__name__} has no rope_theta: is it a RoPE model?")
        extra: dict[str, Any] = {}
        if kind in ("linear", "llama3"):
            extra["factor"] = float(params["factor"])
        if kind == "llama3":
            extra.update(
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(
                    params.get("original_max_position_embeddings") or config.max_position_embeddings
                ),
            )
        max_positions = getattr(config, "max_position_embeddings", None)
        return cls(
            head_dim=head_dim,
            rotary_dim=int(head_dim * partial),
            theta=float(params["rope_theta"]),
            scaling=kind,
            max_positions=int(max_positions) if max_positions else None,
            **extra,
        )

    def canonical(self) -> str:
        """A stable text form of everything that decides the rotation (the context length
        does not): it joins the namespace of position-independent KV."""
        text = f"rope={self.scaling};theta={self.theta!r};dim={self.rotary_dim}/{self.head_dim}"
        if self.scaling != "default":
            text += f";factor={self.factor!r}"
        if self.scaling == "llama3":
            text += (
                f";low={self.low_freq_factor!r};high={self.high_freq_factor!r};"
                f"original={self.original_max_position_embeddings}"
            )
        return text

    def inv_freq(self) -> torch.Tensor:
        """The fp32 inverse frequencies, computed as transformers computes them."""
        dim = self.rotary_dim
        exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
        inv = 1.0 / (self.theta**exponents)
        if self.scaling == "linear":
            inv = inv / self.factor
        elif self.scaling == "llama3":
            inv = _llama3(inv, self)
        return inv


def _rope_parameters(config: Any) -> Mapping[str, Any]:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, Mapping) and params:
        if "rope_theta" not in params and all(isinstance(v, Mapping) for v in params.values()):
            raise ConfigError(
                f"{type(config).__name__} has per-layer-type rope parameters "
                f"({', '.join(params)}); segment reuse supports one rotary encoding"
            )
        return params
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    if getattr(config, "rope_theta", None) is not None:
        scaling.setdefault("rope_theta", config.rope_theta)
    partial = getattr(config, "partial_rotary_factor", None)
    if partial is not None:
        scaling.setdefault("partial_rotary_factor", partial)
    return scaling


def _llama3(inv_freq: torch.Tensor, rope: RotaryConfig) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling (transformers' formula, in fp32)."""
    old = rope.original_max_position_embeddings
    low_wavelen = old / rope.low_freq_factor
    high_wavelen = old / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old / wavelen - rope.low_freq_factor) / (rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _positions(name: str, positions: Any, tokens: int) -> torch.Tensor:
    pos = torch.as_tensor(positions)
    if pos.dim() == 0:
        pos = pos + torch.arange(tokens)
    if pos.dtype.is_floating_point or pos.dtype == torch.bool or pos.shape != (tokens,):
        raise ConfigError(
            f"{name} must be {tokens} integer positions (or one start position), got "
            f"{pos.dtype} of shape {tuple(pos.shape)}"
        )
    if tokens and int(pos.min()) < 0:
        raise ConfigError(f"{name} must be non-negative, got {int(pos.min())}")
    return pos.to(torch.int64)


def rotation(
    old: torch.Tensor, new: torch.Tensor, rope: RotaryConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the rotation from ``old`` to ``new`` positions, shaped
    ``(tokens, rotary_dim / 2)``, in fp32."""
    inv = rope.inv_freq()
    start = (old.to(torch.float)[:, None] * inv).to(torch.float64)
    end = (new.to(torch.float)[:, None] * inv).to(torch.float64)
    delta = end - start
    return delta.cos().to(torch.float32), delta.sin().to(torch.float32)


def rerotate_(
    keys: torch.Tensor, old_positions: Any, new_positions: Any, rope: RotaryConfig
) -> torch.Tensor:
    """Rotate ``keys`` (``[..., tokens, heads, head_dim]``, any float dtype, strided
    views included) in place from ``old_positions`` to ``new_positions`` (one int per
    token, or a start position for a contiguous run); return ``keys``.

    fp16/bf16 keys are rotated in fp32 and rounded once. Dimensions past
    ``rotary_dim`` are left alone.
    """
    if keys.dim() < 3 or keys.shape[-1] != rope.head_dim:
        raise ConfigError(
            f"keys must be [..., tokens, heads, head_dim={rope.head_dim}], got {tuple(keys.shape)}"
        )
    if not keys.dtype.is_floating_point:
        raise ConfigError(f"keys must be floating point, got {keys.dtype}")
    tokens = keys.shape[-3]
    old = _positions("old_positions", old_positions, tokens)
    new = _positions("new_positions", new_positions, tokens)
    if tokens == 0 or bool((old == new).all()):
        return keys
    cos, sin = rotation(old, new, rope)
    cos = cos.to(keys.device)[:, None, :]  # (tokens, 1, half): broadcast over heads
    sin = sin.to(keys.device)[:, None, :]
    half = rope.rotary_dim // 2
    first = keys[..., :half]
    second = keys[..., half : rope.rotary_dim]
    x1 = first.to(torch.float32, copy=True)  # first is overwritten before x1's last use
    x2 = second.to(torch.float32)
    first.copy_(x1 * cos - x2 * sin)
    second.copy_(x2 * cos + x1 * sin)
    return keys
