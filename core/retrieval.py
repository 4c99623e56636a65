"""Lookups and retrieves of :class:`~kvtier.core.engine.KVTier`: how many leading
tokens of a prompt the tiers hold, and their KV, into a tensor (:meth:`RetrieveAPI.retrieve`),
handed to a sink chunk by chunk (:meth:`RetrieveAPI.retrieve_to`), held as views of
the verified blobs (:meth:`RetrieveAPI.retrieve_held`), or handed over layer by layer
as each layer arrives (:meth:`RetrieveAPI.retrieve_layers`). Every call is counted in
the engine's stats."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, NamedTuple

import torch

from kvtier.core.buffers import Buffer, release_all
from kvtier.core.codecs import decode as decoding
from kvtier.core.errors import ConfigError
from kvtier.core.inplace import HeldChunks
from kvtier.core.keys import ExtraKeys, Tokens

if TYPE_CHECKING:
    from kvtier.core.chain import TierChain
    from kvtier.core.layout import KVLayout
    from kvtier.core.runtime import LoopThread

ChunkSink = Callable[[int, torch.Tensor], None]
"""What :meth:`KVTier.retrieve_to` hands each chunk to: ``sink(first, chunk)``."""

LayerSink = Callable[[int, int, int, torch.Tensor], None]
"""What :meth:`KVTier.retrieve_layers` hands each layer of each chunk to:
``sink(request, first, layer, kv)``."""


async def _leading(delivered: list[bool]) -> int:
    """How many leading chunks were delivered."""
    return next((n for n, ok in enumerate(delivered) if not ok), len(delivered))


class Wanted(NamedTuple):
    """One prompt of :meth:`KVTier.retrieve_layers`: its tokens from ``start`` on."""

    tokens: Tokens
    extra_keys: Sequence[ExtraKeys] = ()
    start: int = 0


class RetrieveAPI:
    """The lookup and retrieve methods of :class:`~kvtier.core.engine.KVTier` (a mixin:
    it uses the engine's chain, loop and chunk keys)."""

    layout: KVLayout
    chain: TierChain
    _io: LoopThread
    _reads: list[int]
    """lookups, their tokens, hit; retrieves, their tokens, hit (owned by the loop)."""
    _check_open: Callable[[], None]
    _chunks: Callable[..., tuple[list[str], list[tuple[int, int]]]]

    def _check_out(self, out: object, tokens: int) -> torch.Tensor:
        """``out`` if it can hold ``tokens`` tokens of this layout; else :class:`ConfigError`
        naming what is wrong (a caller's mistake: nothing is read, nothing deleted)."""
        want = self.layout.chunk_shape(tokens)
        if not isinstance(out, torch.Tensor):
            raise ConfigError(
                f"out must be a torch.Tensor of shape {want}, got {type(out).__name__}"
            )
        shape = tuple(out.shape)
        if (
            out.dtype != self.layout.dtype
            or len(shape) != 5
            or shape[:2] != want[:2]
            or shape[3:] != want[3:]
            or shape[2] < tokens
        ):
            raise ConfigError(
                f"out has shape {shape} and dtype {out.dtype}; it must be {self.layout.dtype} "
                f"[num_layers={want[0]}, 2, tokens >= {tokens}, kv_heads={want[3]}, "
                f"head_dim={want[4]}]"
            )
        try:
            decoding.check_out(out)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        return out

    def lookup(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        limits: Sequence[float | None] | None = None,
        prefetch: bool = False,
        held: int = 0,
    ) -> int:
        """Leading tokens of ``tokens`` whose KV is available in some tier (no tier
        counter moves, nothing is promoted; the engine counts the lookup). ``limits``:
        seconds to wait for each tier (see :meth:`TierChain.lookup_by_tier`).

        ``prefetch``: also start copying the leading chunks found only in slower tiers
        into the faster tiers that promote, in the background and within the config's
        ``prefetch_bytes``, so that the :meth:`retrieve` that follows reads them from
        RAM (:meth:`flush` waits for the copies; a retrieve of a chunk still being
        copied waits for it instead of reading it again), except the chunks inside the
        first ``held`` tokens, which the caller holds itself (an engine's own prefix
        cache). The answer does not wait."""
        self._check_open()
        counts = self._io.run(self._lookup(tokens, extra_keys, limits, prefetch, held))
        return counts[-1] if counts else 0

    def lookup_by_tier(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        limits: Sequence[float | None] | None = None,
        prefetch: bool = False,
        held: int = 0,
    ) -> concurrent.futures.Future[list[int]]:
        """:meth:`lookup` without waiting, tier by tier: a future of, for each tier
        ``i``, the leading tokens available in tiers ``0..i`` (the last one is
        :meth:`lookup`'s answer). For callers that must never block on storage,
        such as an engine's scheduler."""
        self._check_open()
        return self._io.submit(self._lookup(tokens, extra_keys, limits, prefetch, held))

    async def _lookup(
        self,
        tokens: Tokens,
        extra_keys: Sequence[ExtraKeys],
        limits: Sequence[float | None] | None,
        prefetch: bool = False,
        held: int = 0,
    ) -> list[int]:
        keys, bounds = self._chunks(tokens, extra_keys)
        counts: list[int] = []
        held_chunks = sum(1 for _, end in bounds if end <= held)

        async def by_tier() -> int:
            found = await self.chain.lookup_by_tier(
                keys, limits, prefetch=prefetch, held=held_chunks
            )
            counts.extend(found)
            return counts[-1] if counts else 0

        await self._counted(0, len(tokens), by_tier, bounds)
        return [bounds[n - 1][1] if n else 0 for n in counts] or [0] * len(self.chain.tiers)

    async def _counted(
        self,
        which: int,
        asked: int,
        chain_call: Callable[[], Awaitable[int]],
        bounds: list[tuple[int, int]],
        start: int = 0,
    ) -> int:
        """Await ``chain_call()`` (chunks found; not called without chunks), count the
        call, the tokens asked for and those found in ``self._reads[which:which + 3]``;
        return the end of the tokens found."""
        n = await chain_call() if bounds else 0
        end = bounds[n - 1][1] if n else start
        self._reads[which] += 1
        self._reads[which + 1] += asked
        self._reads[which + 2] += end - start
        return end

    def retrieve(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        out: torch.Tensor | None = None,
        start: int = 0,
    ) -> tuple[int, torch.Tensor]:
        """The longest available run of ``tokens`` from ``start`` and its KV.

        Returns ``(n, kv)``: ``tokens[start:n]`` are available (``n == start`` when none
        is) and ``kv``, shaped ``[num_layers, 2, n - start, kv_heads, head_dim]``, holds
        their KV (a view of ``out`` if given: it must have room for ``len(tokens) -
        start`` tokens, and may be written beyond ``n``). Each chunk comes from the
        fastest tier holding a valid copy (see :meth:`TierChain.fetch`). Every argument
        is checked before anything is read: a bad one raises :class:`ConfigError` and
        leaves every stored chunk as it was.
        """
        self._check_open()
        keys, bounds = self._chunks(tokens, extra_keys, start, note=True)
        needed = len(tokens) - start
        if out is None:
            out = torch.empty(self.layout.chunk_shape(needed), dtype=self.layout.dtype)
        else:
            out = self._check_out(out, needed)
        targets = [out[:, :, s - start : e - start] for s, e in bounds]
        end = self._fetch(keys, targets, bounds, start, needed)
        return end, out[:, :, : end - start]

    def retrieve_to(
        self,
        tokens: Tokens,
        sink: ChunkSink,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        start: int = 0,
    ) -> int:
        """:meth:`retrieve` without a target tensor: each chunk is handed to
        ``sink(first, chunk)``, ``chunk`` being the KV of ``tokens[first:first + T]``
        (``[num_layers, 2, T, kv_heads, head_dim]``), and the copy is the sink's. Returns
        the end of the longest available run from ``start`` (``start`` when none is).

        The contract, for a sink that copies straight into an engine's KV memory:

        * ``chunk`` is only valid during the call and must not be written: for the
          ``raw`` codec it is a zero-copy view of the blob's bytes (shared with the
          ``cpu`` tier), for other codecs a scratch tensor reused by the next decode.
        * A chunk reaches the sink only after its blob passed its checksum (and MAC)
          and decoded to the expected shape: a corrupt blob is deleted and counted,
          never delivered, and the chunk is asked of the next tier.
        * The sink runs in kvtier's codec threads, several chunks at once and in any
          order; it may also be called for chunks past the returned end (when an
          earlier chunk is missing): those are not delivered, as with :meth:`retrieve`'s
          ``out`` beyond ``n``.
        * An exception from the sink propagates out of this call (after the chunks in
          flight finish).
        """
        self._check_open()
        if not callable(sink):
            raise ConfigError(f"sink must be callable as sink(first, chunk), got {sink!r}")
        return self._fetch_to(tokens, extra_keys, start, lambda first, chunk, _: sink(first, chunk))

    def retrieve_held(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        start: int = 0,
    ) -> HeldChunks:
        """:meth:`retrieve_to`, keeping the chunks instead of handing them over one at
        a time: for a caller that copies them out in another order (layer by layer).
        With the raw codec each chunk stays a zero-copy view of its verified blob, kept
        alive until :meth:`HeldChunks.release`; other codecs' chunks are decoded into
        new tensors. Only the leading run that was delivered is held."""
        self._check_open()
        kept: list[tuple[int, torch.Tensor, Buffer | None]] = []
        lock = threading.Lock()

        def keep(first: int, chunk: torch.Tensor, buf: Buffer | None) -> None:
            item = (first, chunk, buf.retain()) if buf is not None else (first, chunk.clone(), None)
            with lock:
                kept.append(item)

        try:
            end = self._fetch_to(tokens, extra_keys, start, keep)
        except BaseException:
            release_all(buf for _, _, buf in kept)
            raise
        kept.sort(key=lambda item: item[0])
        release_all(buf for first, _, buf in kept if first >= end)
        held = [item for item in kept if item[0] < end]
        return HeldChunks(end, [(first, chunk) for first, chunk, _ in held], [b for *_, b in held])

    def retrieve_layers(
        self,
        wanted: Sequence[Wanted],
        sink: LayerSink,
        layer_done: Callable[[int], None],
    ) -> list[int]:
        """Fetch the chunks of several prompts and hand them over layer by layer, each
        layer as soon as it arrived and passed its check: ``sink(request, first, layer,
        kv)``, ``kv`` being layer ``layer``'s KV (``[2, T, kv_heads, head_dim]``) of
        ``wanted[request].tokens[first:first + T]``; ``layer_done(layer)`` once that
        layer of every chunk that can be had was handed over (called for every layer,
        in order, from kvtier's I/O thread). Returns, per prompt, the end of the longest
        run delivered from its ``start`` (``start`` when none was).

        Layered blobs (``blob_layout: layers``) in tiers that read byte ranges (file,
        redis) are read layer by layer, so layer 0 is handed over while later layers are
        still on their way; every other chunk is read whole first
        (:meth:`TierChain.fetch_layers <kvtier.core.layer_reads.ChainLayerReads.fetch_layers>`).
        The sink's contract is :meth:`retrieve_to`'s (valid during the call, read only,
        called from the codec threads, for chunks past the returned end too); an
        exception from it propagates. Every argument is checked before anything is
        read: a bad one raises :class:`ConfigError`."""
        self._check_open()
        if not callable(sink) or not callable(layer_done):
            raise ConfigError("sink(request, first, layer, kv) and layer_done(layer) are callables")
        keys: list[str] = []
        shapes: list[tuple[int, ...]] = []
        owners: list[tuple[int, int]] = []  # per chunk: (request, first token)
        spans: list[tuple[int, list[tuple[int, int]]]] = []  # per request: (offset, bounds)
        for r, w in enumerate(wanted):
            chunk_keys, bounds = self._chunks(w.tokens, w.extra_keys, w.start, note=True)
            spans.append((len(keys), bounds))
            keys += chunk_keys
            shapes += [self.layout.chunk_shape(end - first) for first, end in bounds]
            owners += [(r, first) for first, _ in bounds]

        def deliver(i: int, layer: int, kv: torch.Tensor) -> None:
            sink(*owners[i], layer, kv)

        async def fetch() -> list[int]:
            dtype = self.layout.dtype
            done = await self.chain.fetch_layers(keys, shapes, dtype, deliver, layer_done)
            ends = []
            for w, (offset, bounds) in zip(wanted, spans, strict=True):
                run = partial(_leading, done[offset : offset + len(bounds)])
                ends.append(await self._counted(3, len(w.tokens) - w.start, run, bounds, w.start))
            return ends

        return self._io.run(fetch())

    def _fetch_to(
        self,
        tokens: Tokens,
        extra_keys: Sequence[ExtraKeys],
        start: int,
        deliver: Callable[[int, torch.Tensor, Buffer | None], None],
    ) -> int:
        """Fetch the chunks of ``tokens[start:]`` into sinks calling ``deliver(first,
        chunk, buffer)`` (see :class:`~kvtier.core.codecs.decode.Sink`)."""
        keys, bounds = self._chunks(tokens, extra_keys, start, note=True)
        dtype = self.layout.dtype
        targets = [
            decoding.Sink(self.layout.chunk_shape(e - s), dtype, partial(deliver, s))
            for s, e in bounds
        ]
        return self._fetch(keys, targets, bounds, start, len(tokens) - start)

    def _fetch(
        self,
        keys: list[str],
        targets: Sequence[torch.Tensor | decoding.Sink],
        bounds: list[tuple[int, int]],
        start: int,
        needed: int,
    ) -> int:
        """Fetch ``keys`` into ``targets`` on the loop, counted as a retrieve."""
        fetched = partial(self.chain.fetch, keys, targets)
        return self._io.run(self._counted(3, needed, fetched, bounds, start))
