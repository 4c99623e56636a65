"""Random-weight Llama models for demos, tests and benchmarks: no download needed."""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvtier.core.errors import ConfigError

MODEL_SIZES: dict[str, dict[str, Any]] = {
    "125m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                 num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=4),
    "tiny": dict(vocab_size=1000, hidden_size=64, intermediate_size=128,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2),
}  # fmt: skip
"""``125m``: Llama architecture with GQA (12 layers, 12 query and 4 KV heads of 64),
124.7M parameters; ``tiny``: the same shape of model, small enough for tests."""


def random_llama(size: str = "125m", *, seed: int = 0) -> LlamaForCausalLM:
    """A Llama model of ``size`` (see :data:`MODEL_SIZES`) with seeded random fp32
    weights, in eval mode; the same seed gives the same weights."""
    if size not in MODEL_SIZES:
        raise ConfigError(f"unknown model size {size!r}; use one of {', '.join(MODEL_SIZES)}")
    config = LlamaConfig(**MODEL_SIZES[size], max_position_embeddings=16384)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # untyped before transformers 5.24
        model = LlamaForCausalLM(config)  # type: ignore[no-untyped-call, unused-ignore]
    torch.nn.Module.eval(model)  # transformers' own eval() is untyped
    return model


def random_llama_id(size: str, seed: int) -> str:
    """The model id under which :func:`random_llama`'s KV is stored."""
    return f"kvtier-random-llama-{size}-seed{seed}"
