"""Position-independent segments: reuse the KV of text wherever it appears in a prompt.

A prompt given as segments (token lists, e.g. ``[system, doc_a, doc_b, question]``)
stores each segment under keys that hash its own tokens only (plus namespace, tenant
and extra keys), never what precedes it, in a key domain of its own (see
:mod:`kvtier.core.keys`): the same document is found again at any position and in any
order. A segment's KV is stored at canonical positions ``0 .. n-1`` (its keys rotated
there; each blob's header records that it is a segment chunk and its canonical start)
and rotated to its new positions when retrieved (:mod:`kvtier.kernels.rope`); values
carry no position and are never touched. Long segments are cut into chunks of
``chunk_tokens`` chained within the segment, so a segment can be partly available.

Reused KV was computed with other text before it; which tokens to recompute to restore
cross-segment attention is the integration's business (``blend:`` in the config, see
:mod:`kvtier.plugins.transformers.blend`). ::

    kv = KVTier.open(config, model="m", layout=layout, rotary=RotaryConfig.from_config(cfg))
    kv.store_segments([doc_a, doc_b], kv_tensor)        # keys at positions 0..len-1
    hits = kv.lookup_segments([doc_b, doc_a])           # leading tokens stored, per segment
    hits, kv_tensor = kv.retrieve_segments([doc_b, doc_a], [0, len(doc_b)])

:class:`SegmentAPI` gives :class:`~kvtier.core.engine.KVTier` these methods; every
argument is checked before anything is read or written (a bad one raises
:class:`ConfigError` and stores, reads and deletes nothing), and the tier chain's rules
(checksums, corrupt blobs, promotion, failing tiers) apply unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvtier.core.errors import ConfigError
from kvtier.core.keys import ChunkHasher, ExtraKeys, Tokens, _as_int64, segment_namespace_for
from kvtier.core.layout import ModelFingerprint
from kvtier.kernels.rope import RotaryConfig, rerotate_

if TYPE_CHECKING:
    from kvtier.core.chain import TierChain
    from kvtier.core.config import KVTierConfig
    from kvtier.core.layout import KVLayout
    from kvtier.core.runtime import LoopThread

Chunk = tuple[str, torch.Tensor, "int | None"]
"""``(key, [L, 2, T, H, D] chunk, segment_start)``: what :meth:`KVTier._queue` takes."""


def split_on_separator(tokens: Tokens, separator: Sequence[int]) -> list[list[int]]:
    """Cut ``tokens`` at every run equal to ``separator`` (the separator's token ids, as
    the tokenizer gives them without special tokens). Returns the pieces in order, each
    separator run a piece of its own, so that they concatenate to ``tokens``; empty
    pieces are left out. Without a separator run the result is ``[tokens]``."""
    ids = _as_int64(tokens).tolist()
    sep = list(separator)
    if not sep:
        raise ConfigError("the separator has no tokens: give a non-empty separator")
    pieces: list[list[int]] = []
    start = i = 0
    width = len(sep)
    while i + width <= len(ids):
        if ids[i : i + width] == sep:
            pieces.extend(p for p in (ids[start:i], sep) if p)
            i = start = i + width
        else:
            i += 1
    if start < len(ids):
        pieces.append(ids[start:])
    return pieces


@dataclass(frozen=True)
class _Segment:
    """One segment of a call: its tokens' place in the concatenated KV tensor, its
    position in the prompt, and its chunk keys (none when it is too short to cache)."""

    offset: int
    position: int
    length: int
    keys: list[str]
    bounds: list[tuple[int, int]]


class SegmentKeys:
    """Keys of position-independent segments for one model, tenant and RoPE."""

    def __init__(
        self,
        fingerprint: ModelFingerprint,
        rotary: RotaryConfig,
        config: KVTierConfig,
    ) -> None:
        if rotary.head_dim != fingerprint.layout.head_dim:
            raise ConfigError(
                f"the rotary encoding has head_dim {rotary.head_dim}, the KV layout "
                f"{fingerprint.layout.head_dim}: they must describe the same model"
            )
        self.rotary = rotary
        self.min_tokens = config.segments.min_tokens
        self.hasher = ChunkHasher(
            segment_namespace_for(fingerprint, rotary.canonical(), config.tenant),
            chunk_tokens=config.chunk_tokens,
            algorithm=config.hash,
            seed=config.hash_seed,
            segments=True,
        )

    def plan(
        self,
        segments: Sequence[Tokens],
        positions: Sequence[int] | None,
        extra_keys: ExtraKeys,
    ) -> list[_Segment]:
        """Check the arguments of a segment call and lay its segments out; raises
        :class:`ConfigError` naming the first problem."""
        if isinstance(segments, (str, bytes, torch.Tensor, np.ndarray)) or not isinstance(
            segments, Sequence
        ):
            raise ConfigError(
                f"segments must be a list of token sequences, got {type(segments).__name__}"
            )
        arrays = []
        for i, segment in enumerate(segments):
            if isinstance(segment, (int, np.integer)):
                raise ConfigError(
                    f"segments[{i}] is an int: segments is a list of token lists, e.g. "
                    "[system_ids, doc_ids, question_ids]"
                )
            try:
                arrays.append(_as_int64(segment))
            except ConfigError as exc:
                raise ConfigError(f"segments[{i}]: {exc}") from None
        lengths = [len(a) for a in arrays]
        starts = self._positions(positions, lengths)
        offsets = np.cumsum([0, *lengths[:-1]]).tolist() if lengths else []
        planned = []
        for tokens, offset, start in zip(arrays, offsets, starts, strict=True):
            keys: list[str] = []
            bounds: list[tuple[int, int]] = []
            if len(tokens) >= self.min_tokens:
                bounds = self.hasher.chunk_bounds(len(tokens), partial=True)
                keys = self.hasher.key_strings(
                    tokens, extra_keys=[extra_keys] * len(bounds), partial=True
                )
            planned.append(_Segment(int(offset), start, len(tokens), keys, bounds))
        return planned

    def _positions(self, positions: Sequence[int] | None, lengths: list[int]) -> list[int]:
        if positions is None:
            starts = np.cumsum([0, *lengths[:-1]]).tolist() if lengths else []
        else:
            starts = list(positions)
            if len(starts) != len(lengths) or not all(
                isinstance(p, (int, np.integer)) and not isinstance(p, bool) for p in starts
            ):
                raise ConfigError(
                    f"positions must be one int (the start position) per segment: "
                    f"{len(lengths)} segments, got {positions!r:.120}"
                )
        limit = self.rotary.max_positions
        spans = sorted(zip(starts, lengths, range(len(lengths)), strict=True))
        for (start, length, i), after in zip(spans, [*spans[1:], None], strict=True):
            if start < 0:
                raise ConfigError(f"positions[{i}] is {start}; positions start at 0")
            if limit is not None and start + length > limit:
                raise ConfigError(
                    f"segment {i} ({length} tokens at position {start}) ends past the model's "
                    f"context of {limit} positions"
                )
            if after is not None and length and after[1] and start + length > after[0]:
                raise ConfigError(
                    f"segments {i} and {after[2]} overlap: positions {start}..{start + length - 1}"
                    f" and {after[0]}..{after[0] + after[1] - 1}"
                )
        return [int(p) for p in starts]


class SegmentAPI:
    """The segment methods of :class:`~kvtier.core.engine.KVTier` (a mixin: it uses the
    engine's chain, loop and store queue)."""

    config: KVTierConfig
    layout: KVLayout
    chain: TierChain
    _io: LoopThread
    _segment_keys: SegmentKeys | None
    _check_open: Callable[[], None]
    _check_out: Callable[[object, int], torch.Tensor]
    _queue: Callable[[Sequence[Chunk]], int]

    @property
    def rotary(self) -> RotaryConfig | None:
        """The rotary encoding segments are rotated with (``None``: no segments)."""
        return None if self._segment_keys is None else self._segment_keys.rotary

    def _segments(
        self, segments: Sequence[Tokens], positions: Sequence[int] | None, extra_keys: ExtraKeys
    ) -> tuple[SegmentKeys, list[_Segment]]:
        self._check_open()
        if self._segment_keys is None:
            raise ConfigError(
                "this KVTier was opened without a rotary encoding: pass "
                "rotary=RotaryConfig.from_config(model.config) (kvtier.kernels.rope) to "
                "KVTier.open to use segments"
            )
        return self._segment_keys, self._segment_keys.plan(segments, positions, extra_keys)

    def lookup_segments(
        self, segments: Sequence[Tokens], *, extra_keys: ExtraKeys = None
    ) -> list[int]:
        """Per segment, its leading tokens whose KV is available (a multiple of
        ``chunk_tokens``, or its whole length; 0 for segments shorter than
        ``segments.min_tokens``). Side-effect free, as :meth:`KVTier.lookup`."""
        _, plan = self._segments(segments, None, extra_keys)
        cached = [s for s in plan if s.keys]
        counts = self._io.run(self._gather([self.chain.lookup(s.keys) for s in cached]))
        found = {id(s): s.bounds[n - 1][1] if n else 0 for s, n in zip(cached, counts, strict=True)}
        return [found.get(id(s), 0) for s in plan]

    def retrieve_segments(
        self,
        segments: Sequence[Tokens],
        positions: Sequence[int] | None = None,
        *,
        extra_keys: ExtraKeys = None,
        out: torch.Tensor | None = None,
    ) -> tuple[list[int], torch.Tensor]:
        """The stored KV of each segment, its keys rotated to where it now stands.

        ``positions[i]`` is the position of segment ``i``'s first token in the prompt
        (default: the segments back to back from 0); segments must not overlap nor end
        past the model's context. Returns ``(hits, kv)``: ``kv`` is ``[num_layers, 2,
        sum of lengths, kv_heads, head_dim]`` (a view of ``out`` if given) with the
        segments' tokens in the order given, and its first ``hits[i]`` rows of segment
        ``i`` hold that segment's KV (the other rows are unspecified).
        """
        rope, plan = self._segments(segments, positions, extra_keys)
        total = sum(s.length for s in plan)
        if out is None:
            out = torch.empty(self.layout.chunk_shape(total), dtype=self.layout.dtype)
        else:
            out = self._check_out(out, total)[:, :, :total]
        cached = [s for s in plan if s.keys]
        fetches = [
            self.chain.fetch(s.keys, [out[:, :, s.offset + a : s.offset + b] for a, b in s.bounds])
            for s in cached
        ]
        counts = self._io.run(self._gather(fetches))
        hits = {id(s): s.bounds[n - 1][1] if n else 0 for s, n in zip(cached, counts, strict=True)}
        for s in cached:
            if hits[id(s)] and s.position:
                keys = out[:, 0, s.offset : s.offset + hits[id(s)]]
                rerotate_(keys, 0, s.position, rope.rotary)
        return [hits.get(id(s), 0) for s in plan], out

    def store_segments(
        self,
        segments: Sequence[Tokens],
        kv: torch.Tensor,
        positions: Sequence[int] | None = None,
        *,
        extra_keys: ExtraKeys = None,
    ) -> list[int]:
        """Queue the KV of each segment of at least ``segments.min_tokens`` tokens for
        the write-through tiers; return per segment the leading tokens accepted.

        ``kv`` is ``[num_layers, 2, sum of lengths, kv_heads, head_dim]``, the segments'
        KV back to back in the order given, their keys computed at ``positions`` (as in
        :meth:`retrieve_segments`); it is rotated to canonical positions in a copy, so
        the caller may reuse ``kv``. Never waits for storage (see :meth:`KVTier.store`).
        """
        rope, plan = self._segments(segments, positions, extra_keys)
        if not isinstance(kv, torch.Tensor):
            raise ConfigError(f"kv must be a torch.Tensor, got {type(kv).__name__}")
        self.layout.check(kv, sum(s.length for s in plan))
        accepted = []
        for s in plan:
            if not s.keys:
                accepted.append(0)
                continue
            staged = kv[:, :, s.offset : s.offset + s.length].clone()
            rerotate_(staged[:, 0], s.position, 0, rope.rotary)
            chunks = [
                (key, staged[:, :, a:b], a) for key, (a, b) in zip(s.keys, s.bounds, strict=True)
            ]
            n = self._queue(chunks)
            accepted.append(s.bounds[n - 1][1] if n else 0)
        return accepted

    @staticmethod
    async def _gather(calls: Sequence[Any]) -> list[int]:
        return list(await asyncio.gather(*calls))
