"""Segment reuse for a transformers causal LM: prompts given as segments, in any order.

::

    with PrefixCache.open(model, "kvtier.yaml", model_id="org/model") as kv:
        out, reused = kv.forward(segments=[system, doc_a, doc_b, question])
        ids, reused = kv.generate(segments=[system, doc_b, doc_a, question], max_new_tokens=32)

Every segment but the last is cacheable: its stored KV is retrieved wherever it now
stands (:meth:`~kvtier.core.engine.KVTier.retrieve_segments` rotates its keys), and
the segments that missed are computed and stored for later reuse. The last segment is
the query: always computed, never stored. Which reused tokens are recomputed as well
is the config's ``blend:`` strategy (:mod:`kvtier.plugins.transformers.blend`).
Prefix keys are never written from this path: its KV is approximate by design.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import DynamicCache, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from kvtier.core.config import BlendConfig
from kvtier.core.engine import KVTier
from kvtier.core.errors import ConfigError
from kvtier.core.keys import Tokens, _as_int64
from kvtier.core.layout import KVLayout
from kvtier.core.segments import split_on_separator
from kvtier.plugins.transformers.blend import Span, check_model, fused_forward
from kvtier.plugins.transformers.compat import CACHE_ARGUMENT
from kvtier.plugins.transformers.layers import dynamic_layers, fill


@dataclass
class Blended:
    """A prompt given as segments, computed with the stored KV of its segments."""

    ids: torch.Tensor
    """The whole prompt, ``(1, tokens)``."""
    outputs: CausalLMOutputWithPast
    """``logits`` of the query (the last segment), ``(1, query tokens, vocab)``; the
    cache (``outputs.cache``, ``past_key_values`` before transformers 5.24) holds the
    whole prompt's KV."""
    segments: list[torch.Tensor]
    spans: list[Span]
    """Where each segment stands and how many of its tokens came from storage."""
    recomputed: int
    """Reused tokens the strategy recomputed through the last layer."""

    @property
    def reused(self) -> int:
        """Prompt tokens whose stored KV was used."""
        return sum(s.reused for s in self.spans)

    @property
    def cache(self) -> DynamicCache:
        cache = getattr(self.outputs, CACHE_ARGUMENT)
        assert isinstance(cache, DynamicCache)
        return cache


class SegmentReuse:
    """The segment methods of :class:`~kvtier.plugins.transformers.PrefixCache` (a
    mixin: it uses the adapter's model, tier chain and cache helpers)."""

    model: PreTrainedModel
    kv: KVTier
    layout: KVLayout
    separator: list[int] | None
    """The ids of ``segments.separator``, when the config names one."""
    rotary_error: str | None
    """Why this model's KV cannot be re-rotated (``None`` when it can)."""

    new_cache: Callable[[], DynamicCache]

    def split(self, input_ids: torch.Tensor | Sequence[int]) -> list[list[int]] | None:
        """``input_ids`` cut at the configured separator, or ``None`` when there is no
        separator in the config or in the prompt (it is then an ordinary prompt)."""
        if self.separator is None:
            return None
        ids = torch.as_tensor(input_ids)
        pieces = split_on_separator(ids[0] if ids.dim() == 2 else ids, self.separator)
        return pieces if len(pieces) > 1 else None

    def _check(self, segments: Sequence[Tokens], blend: BlendConfig) -> list[torch.Tensor]:
        if self.rotary_error is not None:
            raise ConfigError(f"segment reuse: {self.rotary_error}")
        check_model(self.model, blend)
        if isinstance(segments, torch.Tensor) or not isinstance(segments, Sequence):
            raise ConfigError("segments must be a list of token sequences, the query last")
        if not segments:
            raise ConfigError("segments is empty: give at least the query")
        try:
            parts = [torch.from_numpy(_as_int64(s).copy()) for s in segments]
        except ConfigError as exc:
            raise ConfigError(f"segments: {exc}") from None
        if not len(parts[-1]):
            raise ConfigError("the last segment (the query) is empty: it must have a token")
        tokens, limit = sum(len(p) for p in parts), getattr(self.kv.rotary, "max_positions", None)
        if limit is not None and tokens > limit:
            raise ConfigError(
                f"the prompt has {tokens} tokens, past the model's context of {limit} positions"
            )
        return parts

    @torch.no_grad()
    def blend(self, segments: Sequence[Tokens], *, blend: BlendConfig | None = None) -> Blended:
        """Compute the prompt ``segments`` (token lists, the query last), reusing the
        stored KV of the other segments under ``blend`` (default: the config's).
        Stores nothing: see :meth:`store_blended`."""
        blend = blend or self.kv.config.blend
        parts = self._check(segments, blend)
        lengths = [len(p) for p in parts]
        starts = [sum(lengths[:i]) for i in range(len(parts))]
        tokens = sum(lengths)
        cached = sum(lengths[:-1])
        layout = self.layout
        with torch.inference_mode(False):  # kvtier's tensors: see PrefixCache._allocate
            heads_first = torch.empty(
                (layout.num_layers, 2, layout.num_kv_heads, tokens, layout.head_dim),
                dtype=layout.dtype,
            )
            out = heads_first.permute(0, 1, 3, 2, 4)  # [L, 2, tokens, H, D] view
            hits, _ = self.kv.retrieve_segments(parts[:-1], starts[:-1], out=out[:, :, :cached])
        spans = [Span(s, n, h) for s, n, h in zip(starts, lengths, [*hits, 0], strict=True)]
        device = self.model.device
        keys = [heads_first[i, 0][None].to(device) for i in range(layout.num_layers)]
        values = [heads_first[i, 1][None].to(device) for i in range(layout.num_layers)]
        ids = torch.cat(parts).to(device)
        query = torch.arange(starts[-1], tokens)
        fused = fused_forward(self.model, ids, keys, values, spans, blend, query)
        cache = self.new_cache()
        fill(cache, fused.keys, fused.values)
        fields: dict[str, Any] = {"logits": fused.logits, CACHE_ARGUMENT: cache}
        outputs = CausalLMOutputWithPast(**fields)
        return Blended(ids[None], outputs, parts, spans, fused.recomputed)

    @torch.no_grad()
    def store_blended(self, blended: Blended) -> int:
        """Queue the KV of the cacheable segments that were not (fully) stored; return the
        tokens accepted. Never waits for storage."""
        todo = [
            (tokens, span.start)
            for tokens, span in zip(blended.segments[:-1], blended.spans[:-1], strict=True)
            if span.reused < span.length
        ]
        return self.store_segments([t for t, _ in todo], blended.cache, [p for _, p in todo])

    @torch.no_grad()
    def store_segments(
        self, segments: Sequence[Tokens], cache: DynamicCache, starts: Sequence[int]
    ) -> int:
        """Queue the KV that ``cache`` holds for ``segments``, segment ``i`` standing at
        position ``starts[i]`` of the cached prompt (segments shorter than
        ``segments.min_tokens`` are skipped); return the tokens accepted."""
        layers = dynamic_layers(cache)
        accepted = 0
        for tokens, start in zip(segments, starts, strict=True):
            length = len(tokens)
            if length < self.kv.config.segments.min_tokens:
                continue
            rows = slice(start, start + length)
            kv = torch.stack(
                [torch.stack([la.keys[0, :, rows], la.values[0, :, rows]]) for la in layers]  # type: ignore[index]
            ).transpose(2, 3)  # [L, 2, tokens, H, D]
            with torch.inference_mode(False):
                accepted += self.kv.store_segments([tokens], kv.cpu(), [start])[0]
        return accepted

    def _forward_segments(
        self, segments: Sequence[Tokens], store: bool, kwargs: dict[str, Any]
    ) -> tuple[Any, int]:
        if kwargs:
            raise ConfigError(
                f"forward(segments=...) takes no model arguments, got {', '.join(kwargs)}"
            )
        blended = self.blend(segments)
        if store:
            self.store_blended(blended)
        return blended.outputs, blended.reused

    def _generate_segments(
        self, segments: Sequence[Tokens], store: bool, kwargs: dict[str, Any]
    ) -> tuple[Any, int]:
        blended = self.blend(segments)
        if store:
            self.store_blended(blended)
        cache = blended.cache
        cache.crop(-1)  # generate computes the last token again
        # Before 5.24 transformers types generate's self as a protocol its models do not
        # match; from 5.24 on generate is untyped.
        out = self.model.generate(  # type: ignore[operator, unused-ignore]
            blended.ids, **{CACHE_ARGUMENT: cache}, **kwargs
        )
        return out, blended.reused
