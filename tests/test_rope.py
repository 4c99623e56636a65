"""kvtier.kernels.rope: re-rotated keys equal the keys a model computes at the new positions."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from transformers import (
    GPT2Config,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    StableLmConfig,
)
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.stablelm.modeling_stablelm import StableLmRotaryEmbedding

from kvtier.core import ConfigError
from kvtier.kernels.rope import RotaryConfig, rerotate_

SHAPE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=16384)  # fmt: skip
"""Heads of 32 dimensions."""

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 2048},
}  # fmt: skip


def llama_config(scaling: str, theta: float = 500000.0) -> LlamaConfig:
    params = {"rope_theta": theta, **(SCALINGS[scaling] or {"rope_type": "default"})}
    return LlamaConfig(**SHAPE, rope_parameters=params)


def direct(config, rotary_module, raw: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Keys at ``positions`` as the model computes them: ``raw`` is the projected,
    unrotated key ``(heads, tokens, head_dim)`` in fp32; returns ``(tokens, heads, dim)``."""
    cos, sin = rotary_module(raw[None], positions[None])
    rot = RotaryConfig.from_config(config).rotary_dim
    k = raw[None].clone()
    _, k[..., :rot] = apply_rotary_pos_emb(k[..., :rot], k[..., :rot], cos, sin)
    return k[0].transpose(0, 1).contiguous()


def random_case(tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    raw = torch.randn(2, tokens, 32, generator=gen) * 4  # magnitudes of real keys
    old = torch.randint(0, 12000, (tokens,), generator=gen)
    new = torch.randint(0, 12000, (tokens,), generator=gen)
    return raw, old, new


@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_fp32_rerotation_matches_the_model_at_the_new_positions(scaling):
    config = llama_config(scaling)
    rotary = LlamaRotaryEmbedding(config)
    raw, old, new = random_case(512, seed=1)
    keys = direct(config, rotary, raw, old)
    rerotate_(keys, old, new, RotaryConfig.from_config(config))
    expected = direct(config, rotary, raw, new)
    assert float((keys - expected).abs().max()) <= 1e-5


@pytest.mark.parametrize("config_cls", [Qwen2Config, MistralConfig])
def test_qwen2_and_mistral_configs(config_cls):
    config = config_cls(**SHAPE, rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    rotary = LlamaRotaryEmbedding(config)
    raw, old, new = random_case(256, seed=2)
    keys = direct(config, rotary, raw, old)
    rerotate_(keys, old, new, RotaryConfig.from_config(config))
    assert float((keys - direct(config, rotary, raw, new)).abs().max()) <= 1e-5


def test_partial_rotary_dims_rotate_only_the_leading_dims():
    config = StableLmConfig(**SHAPE, partial_rotary_factor=0.25)
    rope = RotaryConfig.from_config(config)
    assert (rope.rotary_dim, rope.head_dim) == (8, 32)
    rotary = StableLmRotaryEmbedding(config)
    raw, old, new = random_case(256, seed=3)
    keys = direct(config, rotary, raw, old)
    before = keys.clone()
    rerotate_(keys, old, new, rope)
    assert float((keys - direct(config, rotary, raw, new)).abs().max()) <= 1e-5
    assert torch.equal(keys[..., 8:], before[..., 8:])


def ulps_at_pair_magnitude(reference: torch.Tensor, rot: int) -> torch.Tensor:
    """One ulp of ``reference``'s dtype at the magnitude of each element's rotary pair.

    A rotation mixes the two entries of a pair, so the rounding error of the stored key
    (half an ulp of the larger entry) moves between them: the bound is in ulps of the
    pair, whose norm the rotation keeps."""
    half = rot // 2
    x = reference[..., :rot].float()
    norm = torch.sqrt(x[..., :half] ** 2 + x[..., half:] ** 2)
    norm = torch.cat([norm, norm], dim=-1).to(reference.dtype)
    up = torch.nextafter(norm, torch.full_like(norm, float("inf")))
    return (up.float() - norm.float()).clamp_min(torch.finfo(reference.dtype).tiny)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scaling", list(SCALINGS))
def test_half_precision_is_within_two_ulps_of_the_directly_computed_keys(dtype, scaling):
    config = llama_config(scaling)
    rotary = LlamaRotaryEmbedding(config)
    raw, old, new = random_case(512, seed=4)
    stored = direct(config, rotary, raw, old).to(dtype)  # the cache holds rounded keys
    rerotate_(stored, old, new, RotaryConfig.from_config(config))
    assert stored.dtype == dtype
    reference = direct(config, rotary, raw, new).to(dtype)
    error = (stored.float() - reference.float()).abs()
    assert bool((error <= 2 * ulps_at_pair_magnitude(reference, 32)).all())


def test_strided_views_and_start_positions():
    """kvtier's chunks are [layers, 2, tokens, heads, dim]: the keys are a strided view."""
    config = llama_config("default")
    rope = RotaryConfig.from_config(config)
    kv = torch.randn(3, 2, 100, 2, 32)
    values = kv[:, 1].clone()
    expected = kv[:, 0].clone()
    rerotate_(expected, torch.arange(100), torch.arange(700, 800), rope)
    rerotate_(kv[:, 0], 0, 700, rope)  # a start position for a contiguous run
    assert torch.equal(kv[:, 0], expected) and torch.equal(kv[:, 1], values)
    back = kv[:, 0].clone()
    rerotate_(back, 700, 0, rope)
    same = kv[:, 0].clone()
    rerotate_(same, 5, 5, rope)
    assert torch.equal(same, kv[:, 0])


@pytest.mark.parametrize("kind", ["yarn", "dynamic", "longrope"])
def test_other_scalings_are_refused_by_name(kind):
    params = {"rope_type": kind, "rope_theta": 10000.0, "factor": 2.0,
              "original_max_position_embeddings": 2048}  # fmt: skip
    if kind == "longrope":
        params.update(short_factor=[1.0] * 16, long_factor=[2.0] * 16)
    config = LlamaConfig(**SHAPE, rope_parameters=params)
    with pytest.raises(ConfigError, match=f"rope_type '{kind}'"):
        RotaryConfig.from_config(config)


def test_models_without_rope_and_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="rope"):
        RotaryConfig.from_config(GPT2Config())
    with pytest.raises(ConfigError, match="'ntk'"):
        RotaryConfig(head_dim=32, rotary_dim=32, theta=1e4, scaling="ntk")
    with pytest.raises(ConfigError, match="rotary_dim"):
        RotaryConfig(head_dim=32, rotary_dim=33, theta=1e4)
    rope = RotaryConfig(head_dim=32, rotary_dim=32, theta=1e4)
    with pytest.raises(ConfigError, match="head_dim=32"):
        rerotate_(torch.zeros(4, 2, 16), 0, 1, rope)
    with pytest.raises(ConfigError, match="4 integer positions"):
        rerotate_(torch.zeros(4, 2, 32), torch.zeros(3, dtype=torch.long), 1, rope)
    with pytest.raises(ConfigError, match="non-negative"):
        rerotate_(torch.zeros(4, 2, 32), -1, 1, rope)


def test_the_fingerprint_tells_encodings_apart():
    texts = {RotaryConfig.from_config(llama_config(s)).canonical() for s in SCALINGS}
    texts.add(RotaryConfig.from_config(llama_config("default", theta=10000.0)).canonical())
    assert len(texts) == 4
    with_context = RotaryConfig(head_dim=32, rotary_dim=32, theta=1e4, max_positions=4096)
    assert with_context.canonical() == RotaryConfig(32, 32, 1e4).canonical()
