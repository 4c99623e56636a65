"""Fusing reused segment KV into one prompt: which tokens a transformers model recomputes.

Segments reused from storage were computed with other text (or none) before them, so
their KV lacks attention to what now precedes them. A fused forward runs the model's
own decoder layers (norms, projections, rotary embedding, attention, MLP) on a subset
of the prompt's tokens, layer by layer, while every layer attends over the whole
prompt: the KV of the tokens it does not run comes from storage. Which tokens run is
the strategy (``blend:`` in the config):

* ``none``: only the tokens without stored KV (missing segments, separators, the
  query); reused KV is used as it is (the lower bound on quality).
* ``cacheblend`` (CacheBlend, arXiv 2405.16444): every token runs up to and through the
  first check layer; there each reused token's fresh K and V are compared with the
  stored ones, and from then on only the ``recompute_ratio`` share of reused tokens
  that deviate most (plus the tokens without stored KV) run; their fresh KV replaces
  the stored KV. With several check layers the choice narrows gradually, among the
  tokens still running: the ``j``-th of ``m`` keeps ``recompute_ratio ** (j / m)``.
* ``epic`` (EPIC's LegoLink, arXiv 2410.15332): the first ``epic_k`` tokens of every
  reused segment run in every layer, with the tokens without stored KV.

``recompute_ratio: 1.0`` (or ``epic_k`` at least every segment's length) runs every
token in every layer: a full prefill. Batch of one, Llama / Qwen2 / Mistral-family
decoders (RoPE, GQA) without sliding windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from kvtier.core.config import BlendConfig
from kvtier.core.errors import ConfigError
from kvtier.plugins.transformers.compat import CACHE_ARGUMENT

MODEL_TYPES = ("llama", "qwen2", "mistral")
"""``config.model_type`` of the decoders whose layers a fused forward can drive."""


def check_model(model: PreTrainedModel, blend: BlendConfig) -> None:
    """Raise :class:`ConfigError` unless ``model`` is a decoder this module can drive
    with ``blend``'s settings."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    if model_type not in MODEL_TYPES:
        raise ConfigError(
            f"segment reuse supports Llama, Qwen2 and Mistral-family models (model_type "
            f"{', '.join(MODEL_TYPES)}); {type(model).__name__} has model_type {model_type!r}"
        )
    decoder = getattr(model, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, p) for p in parts):
        raise ConfigError(
            f"{type(model).__name__} lacks the decoder modules a fused forward drives "
            f"(model.{', model.'.join(parts)})"
        )
    layers = len(decoder.layers)
    if blend.strategy == "cacheblend" and blend.check_layers[-1] >= layers:
        raise ConfigError(
            f"blend.check_layers {blend.check_layers}: the model has {layers} layers "
            f"(0..{layers - 1})"
        )


@dataclass(frozen=True)
class Span:
    """One segment in the prompt: ``length`` tokens from ``start``, the first ``reused``
    of them with stored KV."""

    start: int
    length: int
    reused: int


class _FusedCache:
    """The whole prompt's KV, one ``(1, kv_heads, tokens, head_dim)`` tensor per layer,
    standing in for a transformers cache: each layer's attention writes the fresh KV of
    the tokens it runs (``rows``) into place and attends over all of it."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys = keys
        self.values = values
        self.rows = torch.arange(keys[0].shape[2], device=keys[0].device)
        self.compare = False
        self.deviation: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *_: Any,
        **__: Any,
    ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self.compare:  # squared distance of fresh from stored KV, per token
            dk = (key_states - keys[:, :, self.rows]).float().pow(2).sum(dim=(0, 1, 3))
            dv = (value_states - values[:, :, self.rows]).float().pow(2).sum(dim=(0, 1, 3))
            self.deviation = dk + dv
        keys.index_copy_(2, self.rows, key_states)
        values.index_copy_(2, self.rows, value_states)
        return keys, values


def _always(tokens: int, spans: list[Span]) -> torch.Tensor:
    """Mask of the tokens without stored KV: they run in every layer."""
    mask = torch.ones(tokens, dtype=torch.bool)
    for s in spans:
        mask[s.start : s.start + s.reused] = False
    return mask


def _first_tokens(tokens: int, spans: list[Span], k: int) -> torch.Tensor:
    mask = torch.zeros(tokens, dtype=torch.bool)
    for s in spans:
        mask[s.start : s.start + min(k, s.reused)] = True
    return mask


@dataclass
class Fused:
    """What a fused forward computed."""

    logits: torch.Tensor
    """``(1, rows, vocab)``: the logits of the ``logit_rows`` asked for."""
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    """Per layer, the whole prompt's KV, ``(1, kv_heads, tokens, head_dim)``."""
    recomputed: int
    """Reused tokens that ran in every layer after the last check layer."""


@torch.no_grad()
def fused_forward(
    model: PreTrainedModel,
    ids: torch.Tensor,
    keys: list[torch.Tensor],
    values: list[torch.Tensor],
    spans: list[Span],
    blend: BlendConfig,
    logit_rows: torch.Tensor,
) -> Fused:
    """Run ``model`` on the prompt ``ids`` (``(tokens,)``) whose stored KV is in
    ``keys``/``values`` (rows of ``spans``' reused tokens, keys at their positions in
    the prompt; other rows are overwritten) under ``blend``'s strategy; ``logit_rows``
    (tokens without stored KV) get logits."""
    decoder: Any = model.model
    tokens = ids.shape[0]
    always = _always(tokens, spans)
    if not bool(always[logit_rows].all()):
        raise ConfigError("logits are computed only for tokens without stored KV")
    reused = int((~always).sum())
    keep: dict[int, int] = {}  # check layer -> reused tokens still running after it
    if blend.strategy == "cacheblend":
        running = torch.ones(tokens, dtype=torch.bool)
        steps = len(blend.check_layers)
        for j, layer in enumerate(blend.check_layers):  # gradual: the last keeps the ratio
            keep[layer] = math.ceil(reused * blend.recompute_ratio ** ((j + 1) / steps))
    elif blend.strategy == "epic":
        running = always | _first_tokens(tokens, spans, blend.epic_k)
    else:
        running = always
    rows = running.nonzero()[:, 0].to(ids.device)
    always, logit_rows = always.to(ids.device), logit_rows.to(ids.device)
    cache = _FusedCache(keys, values)
    hidden = decoder.embed_tokens(ids[rows][None])
    for index, layer in enumerate(decoder.layers):
        cache.rows, cache.compare = rows, index in keep
        hidden = _run_layer(decoder, layer, hidden, rows, cache, tokens)
        if cache.compare and rows.shape[0] > int(always.sum()):
            assert cache.deviation is not None
            candidates = ~always[rows]
            score = cache.deviation.masked_fill(~candidates, -1.0)
            chosen = score.topk(min(keep[index], int(candidates.sum()))).indices
            selected = (~candidates).clone()
            selected[chosen] = True
            rows, hidden = rows[selected], hidden[:, selected]
    where = torch.searchsorted(rows, logit_rows)
    final = decoder.norm(hidden[:, where])
    head: Any = model.lm_head
    logits: torch.Tensor = head(final)
    recomputed = int((~always[rows]).sum())
    return Fused(logits, cache.keys, cache.values, recomputed)


def _run_layer(
    decoder: Any,
    layer: nn.Module,
    hidden: torch.Tensor,
    rows: torch.Tensor,
    cache: _FusedCache,
    tokens: int,
) -> torch.Tensor:
    """One decoder layer on the tokens ``rows`` (attending causally over all tokens)."""
    position_ids = rows[None]
    embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)
    mask: torch.Tensor | None = None
    if rows.shape[0] != tokens:  # all rows: the causal kernel, as a plain forward uses
        visible = torch.arange(tokens, device=rows.device)[None, :] <= rows[:, None]
        mask = torch.zeros(visible.shape, dtype=hidden.dtype, device=rows.device)
        mask.masked_fill_(~visible, torch.finfo(hidden.dtype).min)
        mask = mask[None, None]
    out = layer(
        hidden,
        attention_mask=mask,
        position_ids=position_ids,
        position_embeddings=embeddings,
        **{CACHE_ARGUMENT: cache},
    )
    hidden_out: torch.Tensor = out[0] if isinstance(out, tuple) else out
    return hidden_out
