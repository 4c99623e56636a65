"""Reuse stored KV in a transformers causal LM, so that it computes only new tokens.

Before a prefill, :meth:`PrefixCache.prefix` retrieves the longest stored prefix of
the prompt into a ``DynamicCache``; after it, :meth:`PrefixCache.store` queues the KV
the model computed. :meth:`PrefixCache.forward` and :meth:`PrefixCache.generate` wrap
``model(...)`` and ``model.generate(...)`` with both steps.

kvtier's chunks are ``[num_layers, 2, tokens, kv_heads, head_dim]``; a ``DynamicCache``
layer holds keys and values shaped ``(batch, kv_heads, tokens, head_dim)``. A prefix is
decoded into one reusable, already-touched buffer and every cache layer gets strided
views of it, with no copy; the model's first forward pass concatenates the new tokens
onto them into fresh tensors (as it does for any ``DynamicCache``), which frees the
buffer for the next prefix. A cache still viewing the buffer is never overwritten: the
next prefix then gets a new buffer.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import torch
from transformers import DynamicCache, GenerationMixin, PreTrainedModel

from kvtier.core.config import KVTierConfig, load_config
from kvtier.core.engine import KVTier
from kvtier.core.errors import ConfigError
from kvtier.core.keys import Tokens
from kvtier.core.layout import KVLayout
from kvtier.kernels.rope import RotaryConfig
from kvtier.plugins.transformers.compat import CACHE_ARGUMENT
from kvtier.plugins.transformers.layers import dynamic_layers, fill
from kvtier.plugins.transformers.segments import SegmentReuse


def layout_for(model: PreTrainedModel) -> KVLayout:
    """The KV layout of ``model``: its decoder's layers, KV heads (GQA), head size, dtype."""
    cfg = model.config.get_text_config(decoder=True)
    heads = int(cfg.num_attention_heads)
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or int(cfg.hidden_size) // heads
    return KVLayout(
        num_layers=int(cfg.num_hidden_layers),
        num_kv_heads=int(kv_heads),
        head_dim=int(head_dim),
        dtype=model.dtype,
    )


def _one_row(input_ids: torch.Tensor | Sequence[int]) -> torch.Tensor:
    """The token ids of a batch of one (``(1, T)``) or of a flat ``(T,)`` sequence."""
    ids = torch.as_tensor(input_ids)
    if ids.dim() == 2 and ids.shape[0] == 1:
        ids = ids[0]
    if ids.dim() != 1:
        raise ConfigError(
            f"input_ids has shape {tuple(ids.shape)}; kvtier.plugins.transformers handles "
            "a batch of one sequence, shape (1, tokens): run the rows one at a time"
        )
    return ids


@dataclass
class Prefix:
    """A prompt's longest stored prefix, ready for the model."""

    tokens: int
    """Leading prompt tokens whose KV ``cache`` holds; the model computes the rest."""
    cache: DynamicCache
    """Pass it to the model (see :meth:`model_kwargs`) with the ids from ``tokens`` on."""

    def model_kwargs(self) -> dict[str, Any]:
        """``cache`` as the installed transformers' keyword argument (``cache``, or
        ``past_key_values`` before 5.24): ``model(ids[:, p.tokens :], **p.model_kwargs())``."""
        return {CACHE_ARGUMENT: self.cache}


def rotary_for(model: PreTrainedModel) -> tuple[RotaryConfig | None, str | None]:
    """The model's rotary encoding, or why segments cannot be re-rotated for it."""
    try:
        return RotaryConfig.from_config(model.config), None
    except ConfigError as exc:
        return None, str(exc)


class PrefixCache(SegmentReuse):
    """A transformers causal LM's KV cache, kept in a kvtier tier chain.

    Batch size 1, full-attention layers (``DynamicLayer``; GQA included). Not thread
    safe: use one per thread. Prompts of any length work: chunks are whole
    ``chunk_tokens`` runs (plus a trailing partial one with ``store_partial_chunks``),
    and the tokens past the last stored chunk are computed. Prompts given as segments
    reuse text at any position (:mod:`~kvtier.plugins.transformers.segments`).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        kv: KVTier,
        *,
        close_kv: bool = False,
        separator: Sequence[int] | None = None,
    ) -> None:
        """Use ``kv`` (opened with :func:`layout_for` of ``model``, and ``rotary=`` its
        :func:`rotary_for` for segments) for ``model``; ``close_kv`` makes :meth:`close`
        close it too; ``separator`` (token ids) splits flat prompts into segments."""
        layout = layout_for(model)
        if kv.layout != layout:
            raise ConfigError(f"the KVTier was opened for {kv.layout}, but the model has {layout}")
        self.model = model
        self.kv = kv
        self.layout = layout
        self.separator = list(separator) if separator is not None else None
        self.rotary_error = rotary_for(model)[1] if kv.rotary is None else None
        self._close_kv = close_kv
        self._buffer = self._allocate(0)
        self._lent: weakref.ref[DynamicCache] | None = None
        self.new_cache()  # fails now for layer kinds this module cannot fill

    @classmethod
    def open(
        cls,
        model: PreTrainedModel,
        config: str | Path | Mapping[str, Any] | KVTierConfig | None = None,
        *,
        model_id: str | None = None,
        tenant: str | None = None,
        tokenizer: Any = None,
    ) -> PrefixCache:
        """Open the tier chain of ``config`` (as :meth:`KVTier.open`) for ``model``.

        ``model_id`` names the weights; it defaults to the model's ``name_or_path`` and
        must be given for a model built from a config, so that chunks of different
        weights never mix. ``tokenizer`` tokenises the config's ``segments.separator``
        (without special tokens); it is needed only when the config names one.
        """
        model_id = model_id or getattr(model.config, "name_or_path", "")
        if not model_id:
            raise ConfigError(
                "the model has no name_or_path (built from a config?): pass model_id='...' "
                "naming its weights, so that KV of different weights never mixes"
            )
        with torch.inference_mode(False):  # see _allocate
            cfg = load_config(config)
            separator = _separator_ids(cfg, tokenizer)
            layout, rotary = layout_for(model), rotary_for(model)[0]
            kv = KVTier.open(cfg, model=model_id, layout=layout, tenant=tenant, rotary=rotary)
        try:
            return cls(model, kv, close_kv=True, separator=separator)
        except BaseException:
            kv.close()
            raise

    def new_cache(self) -> DynamicCache:
        """An empty ``DynamicCache`` for the model."""
        cache = DynamicCache(config=self.model.config)
        if len(dynamic_layers(cache)) != self.layout.num_layers:
            raise ConfigError(
                f"the model's cache has {len(cache.layers)} layers, its config "
                f"{self.layout.num_layers}; layers sharing KV are not supported"
            )
        return cache

    # -- reuse ------------------------------------------------------------------------

    @torch.no_grad()
    def prefix(self, input_ids: torch.Tensor | Sequence[int]) -> Prefix:
        """The longest stored prefix of ``input_ids`` in a ``DynamicCache``.

        At most ``len - 1`` tokens are reused: the model must compute the last one to
        give the next token's logits. The cache views a buffer this object reuses
        until the model's first forward pass on it (see the module doc).
        """
        tokens = _one_row(input_ids)
        cache = self.new_cache()
        if len(tokens) < 2:
            return Prefix(0, cache)
        wanted = tokens[:-1]
        with torch.inference_mode(False):  # see _allocate
            n, kv = self.kv.retrieve(wanted, out=self._free_buffer(len(wanted)))
        if n:
            device = self.model.device
            views = [kv[i].permute(0, 2, 1, 3).unsqueeze(1).to(device) for i in range(len(kv))]
            fill(cache, [v[0] for v in views], [v[1] for v in views])
            self._lent = weakref.ref(cache)
        return Prefix(n, cache)

    @torch.no_grad()
    def store(self, input_ids: torch.Tensor | Sequence[int], cache: DynamicCache) -> int:
        """Queue the KV in ``cache`` of the leading tokens of ``input_ids`` (the prompt,
        plus generated tokens once the cache holds them); return the tokens accepted.

        Only whole chunks are stored (unless ``store_partial_chunks``); chunks the tiers
        hold already are not written again. Never waits for storage.
        """
        tokens = _one_row(input_ids)
        n = cache.get_seq_length()
        if n > len(tokens):
            raise ConfigError(
                f"the cache holds {n} tokens but input_ids only {len(tokens)}: pass the ids "
                "the cache was computed from"
            )
        bounds = self.kv.hasher.chunk_bounds(n, partial=self.kv.config.store_partial_chunks)
        if not bounds:
            return 0
        end = bounds[-1][1]
        staged = self._free_buffer(end)[:, :, :end]
        for i, layer in enumerate(dynamic_layers(cache)):
            assert layer.keys is not None and layer.values is not None
            if layer.keys.shape[0] != 1:
                raise ConfigError(f"the cache has batch size {layer.keys.shape[0]}; only 1 works")
            staged[i, 0].copy_(layer.keys[0, :, :end].transpose(0, 1))
            staged[i, 1].copy_(layer.values[0, :, :end].transpose(0, 1))
        with torch.inference_mode(False):
            return self.kv.store(tokens[:end], staged)

    # -- model calls ------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.Tensor | Sequence[int] | None = None,
        *,
        segments: Sequence[Tokens] | None = None,
        store: bool = True,
        **kwargs: Any,
    ) -> tuple[Any, int]:
        """``model(input_ids, **kwargs)`` computing only the tokens after the stored
        prefix; returns ``(outputs, reused)``.

        ``outputs.logits`` covers the computed tokens ``input_ids[:, reused:]`` only;
        the outputs' cache (``outputs.cache``, ``outputs.past_key_values`` before
        transformers 5.24) holds the whole prompt. ``store`` queues its KV. A prompt
        given as ``segments`` (or split at the config's separator) reuses stored
        segments at any position instead: ``outputs.logits`` then covers the last
        segment (see :mod:`~kvtier.plugins.transformers.segments`).
        """
        _no_cache_given(kwargs)
        segments = _segments_or_ids(self, input_ids, segments)
        if segments is not None:
            return self._forward_segments(segments, store, kwargs)
        assert input_ids is not None
        ids = _one_row(input_ids)[None]
        prefix = self.prefix(ids)
        out = self.model(ids[:, prefix.tokens :], use_cache=True, **prefix.model_kwargs(), **kwargs)
        if store:
            self.store(ids, prefix.cache)
        return out, prefix.tokens

    def generate(
        self,
        input_ids: torch.Tensor | Sequence[int] | None = None,
        *,
        segments: Sequence[Tokens] | None = None,
        store: bool = True,
        **kwargs: Any,
    ) -> tuple[Any, int]:
        """``model.generate(input_ids, **kwargs)`` starting from the stored prefix; returns
        ``(what generate returned, reused)``. ``store`` queues the KV of the prompt and
        the generated tokens (all but the last, whose KV is never computed). With
        ``segments`` (or a separator in the prompt) it starts from the fused segments
        and stores only the segments computed anew."""
        _no_cache_given(kwargs)
        if not isinstance(self.model, GenerationMixin):
            raise ConfigError(f"{type(self.model).__name__} cannot generate (no GenerationMixin)")
        segments = _segments_or_ids(self, input_ids, segments)
        if segments is not None:
            return self._generate_segments(segments, store, kwargs)
        assert input_ids is not None
        ids = _one_row(input_ids)[None]
        prefix = self.prefix(ids)
        # Before 5.24 transformers types generate's self as a protocol its own models do
        # not match; from 5.24 on generate is untyped (a deprecation decorator wraps it).
        out = self.model.generate(ids, **prefix.model_kwargs(), **kwargs)  # type: ignore[misc, unused-ignore]
        if store:
            sequences = out if isinstance(out, torch.Tensor) else out.sequences
            self.store(sequences, prefix.cache)
        return out, prefix.tokens

    # -- buffers and lifetime ---------------------------------------------------------

    def reserve(self, tokens: int) -> None:
        """Allocate the reuse buffer for prompts of up to ``tokens`` tokens now, so that
        the first requests do not pay for touching its memory."""
        self._free_buffer(tokens)

    def _allocate(self, tokens: int) -> torch.Tensor:
        # Zeroed, so that its pages are touched here rather than in a timed copy.
        # Every tensor kvtier creates or keeps (this buffer, the codecs' scratch tensors)
        # is made with inference mode off: an inference tensor cannot be written to
        # outside inference mode, and callers often run the model inside it.
        with torch.inference_mode(False):
            return torch.zeros(self.layout.chunk_shape(tokens), dtype=self.layout.dtype)

    def _free_buffer(self, tokens: int) -> torch.Tensor:
        """The reusable buffer with room for ``tokens``; a new one if it is too small or
        a cache lent by :meth:`prefix` still views it."""
        if self._buffer.shape[2] < tokens:
            self._buffer = self._allocate(max(tokens, 2 * self._buffer.shape[2]))
        elif self._borrowed():
            self._buffer = self._allocate(self._buffer.shape[2])
        return self._buffer

    def _borrowed(self) -> bool:
        cache = self._lent() if self._lent is not None else None
        if cache is None:
            return False
        storage = self._buffer.untyped_storage().data_ptr()
        return any(
            layer.keys is not None and layer.keys.untyped_storage().data_ptr() == storage
            for layer in dynamic_layers(cache)
        )

    def close(self) -> None:
        """Close the tier chain if :meth:`open` opened it (flushing queued stores)."""
        if self._close_kv:
            self.kv.close()

    def __enter__(self) -> PrefixCache:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _separator_ids(config: KVTierConfig, tokenizer: Any) -> list[int] | None:
    text = config.segments.separator
    if text is None:
        return None
    if tokenizer is None:
        raise ConfigError(
            f"segments.separator is {text!r}: pass tokenizer=... to PrefixCache.open so "
            "that it can be tokenised"
        )
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise ConfigError(f"segments.separator {text!r} tokenises to no tokens")
    return ids


def _segments_or_ids(
    cache: PrefixCache,
    input_ids: torch.Tensor | Sequence[int] | None,
    segments: Sequence[Tokens] | None,
) -> Sequence[Tokens] | None:
    """The segments of a call: given, or ``input_ids`` split at the separator; ``None``
    for an ordinary prompt."""
    if (input_ids is None) == (segments is None):
        raise ConfigError("give either input_ids or segments=[...], not both or neither")
    if segments is not None:
        return segments
    assert input_ids is not None
    return cache.split(_one_row(input_ids))


def _no_cache_given(kwargs: Mapping[str, Any]) -> None:
    given = sorted({"cache", "past_key_values"} & kwargs.keys())
    if given:
        raise ConfigError(f"do not pass {' or '.join(given)}: PrefixCache builds the cache")
