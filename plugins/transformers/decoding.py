"""Greedy decoding from a prepared cache: a few answer tokens, with no generation config.

``model.generate`` reads the model's generation config (sampling settings, warnings
about them); demos and benchmarks that want the plain greedy answer from a cache they
built (a stored prefix, fused segments) call :func:`greedy` instead.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache

from kvtier.plugins.transformers.compat import CACHE_ARGUMENT


@torch.no_grad()
def greedy(
    model: Any, cache: DynamicCache, logits: torch.Tensor, steps: int, eos: Any = None
) -> list[int]:
    """Up to ``steps`` greedy tokens after a prompt whose KV ``cache`` holds and whose
    next-token ``logits`` (``(vocab,)``) are given; stops after an ``eos`` token (an id
    or a list of ids). ``cache`` grows by the tokens fed back."""
    stop = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}
    out: list[int] = []
    token = int(logits.argmax())
    position = cache.get_seq_length()
    while True:
        out.append(token)
        if token in stop or len(out) >= steps:
            return out
        step = model(
            torch.tensor([[token]], device=model.device),
            position_ids=torch.tensor([[position]], device=model.device),
            **{CACHE_ARGUMENT: cache},
        )
        position += 1
        token = int(step.logits[0, -1].argmax())
