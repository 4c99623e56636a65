"""Layer-by-layer fetches of the tier chain (:meth:`ChainLayerReads.fetch_layers`): layer
``i`` of every chunk is handed over as soon as it is checked, while later layers are
still arriving.

A tier that reads byte ranges (``ranged_reads``, outside the process) streams layered
blobs (:mod:`kvtier.core.blob.layered`): one batch reads each blob's head, one its
section table and trailer (the head is checked against them, and the MAC), then one
batch per layer reads that layer's section of every chunk straight into the blob's
buffer at its offset, and each section is checked against its digest before its layer
is handed over. Every other chunk (whole-chunk blobs, tiers in the process or without
ranged reads) is read whole, through the chain's read path, and handed over layer by
layer from memory. A stream that breaks off (the tier fails, the blob is gone or
shorter than its head says, a section fails its digest: counted and deleted) is read
whole from the tiers below and goes on from the layer it stopped at. Streamed blobs
end up whole in their buffers, checked, and are promoted like any other read.

A ranged read that fails may still be writing into its buffers (a timeout does not
stop the backend's thread): those buffers are abandoned, never given back to the pool,
and freed once nothing writes into them.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import torch

from kvtier.core import blob as fmt
from kvtier.core.blob import Blob, BlobHeader
from kvtier.core.buffers import Buffer, BufferPool, release_all
from kvtier.core.codecs import decode as decoding
from kvtier.core.errors import ChunkCorruptedError, CodecUnavailableError
from kvtier.core.plugins import PluginRegistry
from kvtier.core.reads import ChainReads, Read
from kvtier.core.tier import Tier

HEAD_BYTES = 4096
"""Bytes read first from each streamed blob: prefix and header fit in them unless the
header is long (then a second read gets the rest)."""

LayerSink = Callable[[int, int, torch.Tensor], None]
"""``deliver(chunk index, layer, kv)``, ``kv`` that layer's ``[2, T, H, D]`` KV."""


@dataclass
class _Held:
    """A chunk whose layers come from memory: a blob read whole (checked, and decoded
    into ``chunk`` unless its codec is ``raw``), or a stream whose bytes are all in
    place. Handed over from layer ``first`` on."""

    read: Read
    first: int = 0
    chunk: torch.Tensor | None = field(default=None, repr=False)

    def layer(self, layer: int, registry: PluginRegistry) -> torch.Tensor:
        if self.chunk is not None:
            return self.chunk[layer]
        blob = self.read.blob
        assert blob is not None
        if blob.header.layers is not None:
            return decoding.layer_of(blob, blob.header, layer, registry)
        return decoding.chunk_of(blob, registry)[layer]  # raw: a view


@dataclass
class _Stream:
    """A layered blob of chunk ``index`` being read from tier ``tier`` into ``buf``."""

    index: int
    tier: int
    header: BlobHeader
    buf: Buffer

    def read(self) -> Read:
        """The whole blob, once every section is in place and checked."""
        return Read(self.index, self.tier, self.buf, Blob(self.buf, self.header, sealed=True))


class _Targets:
    """What each chunk must hold, as sinks for the chain's read path (``sinks[i]``), and
    the chunks read whole in codecs other than ``raw``, decoded once by those sinks."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> None:
        self.decoded: dict[int, torch.Tensor] = {}
        self.sinks = [
            decoding.Sink(shape, dtype, partial(self._keep, i)) for i, shape in enumerate(shapes)
        ]

    def _keep(self, i: int, chunk: torch.Tensor, buf: Buffer | None) -> None:
        if buf is None:  # decoded into per-thread scratch: keep a copy
            self.decoded[i] = chunk.clone()


def _ranged(tier: Tier) -> bool:
    caps = tier.backend.capabilities
    return caps.ranged_reads and not caps.process_local


class ChainLayerReads(ChainReads):
    """:meth:`fetch_layers` for :class:`~kvtier.core.chain.TierChain` (a mixin: it also
    uses the chain's buffer pool)."""

    pool: BufferPool

    async def fetch_layers(
        self,
        keys: Sequence[str],
        shapes: Sequence[tuple[int, ...]],
        dtype: torch.dtype,
        deliver: LayerSink,
        layer_done: Callable[[int], None],
    ) -> list[bool]:
        """Hand every layer of the chunks ``keys`` (``keys[i]`` a ``shapes[i]`` chunk of
        ``dtype``; a blob holding anything else is corrupt) to ``deliver``, layer after layer,
        calling ``layer_done(i)`` once layer ``i`` of every chunk that can be had was
        handed over (for every layer, even when nothing was); return, per key, whether
        all of its chunk's layers were handed over.

        ``deliver`` runs in a codec thread, one chunk after another; its ``kv`` is only
        valid during the call and must not be written. A layer reaches ``deliver`` only
        after its bytes passed their check (a streamed section its digest, once the
        blob's head passed its check and MAC; anything else its whole blob's check). A
        chunk handed over in part (its stream broke off and no tier below holds it)
        counts as not delivered. An exception from ``deliver`` propagates (once the
        layer's other chunks are handed over)."""
        await self.prefetches.settled(keys)
        layers = shapes[0][0] if shapes else 0
        targets = _Targets(shapes, dtype)
        held: dict[int, _Held] = {}
        streams: dict[int, _Stream] = {}
        reading: asyncio.Future[list[tuple[_Stream, bool]]] | None = None
        try:
            pending = list(range(len(keys)))
            for t, tier in enumerate(self.tiers):
                if not pending:
                    break
                whole = pending
                if _ranged(tier):
                    opened, whole = await self._open_streams(t, pending, keys, targets)
                    streams.update(opened)
                await self._read_whole([t], whole, keys, targets, held)
                pending = [i for i in pending if i not in held and i not in streams]
            reading = asyncio.ensure_future(self._read_sections(0, keys, dict(streams)))
            for layer in range(layers):
                broken = await reading
                await self._replace(broken, layer, keys, targets, streams, held)
                if layer + 1 < layers:  # read the next layer while this one is handed over
                    reading = asyncio.ensure_future(
                        self._read_sections(layer + 1, keys, dict(streams))
                    )
                await self._deliver(layer, streams, held, deliver)
                layer_done(layer)
            for s in streams.values():
                held[s.index] = _Held(s.read())
            streams.clear()
            self._promote([h.read for h in held.values()])
            return [i in held for i in range(len(keys))]
        finally:
            if reading is not None:  # nothing may write into the buffers once released
                await asyncio.gather(reading, return_exceptions=True)
            release_all(h.read.buf for h in held.values())
            release_all(s.buf for s in streams.values())

    async def _read_whole(
        self,
        tiers: Sequence[int],
        wanted: list[int],
        keys: Sequence[str],
        targets: _Targets,
        held: dict[int, _Held],
        first: int = 0,
    ) -> None:
        """Read the chunks ``wanted`` whole from ``tiers`` (the first holding a valid
        copy of each, of its target's shape) into ``held``, to be handed over from layer
        ``first`` on."""
        served: dict[int, Read] = {}
        try:
            await self._serve_tiers(tiers, wanted, keys, targets.sinks, served)
        finally:
            held.update(
                (i, _Held(r, first, targets.decoded.pop(i, None))) for i, r in served.items()
            )

    async def _read_into(
        self, t: int, reads: list[tuple[str, int, memoryview]]
    ) -> list[int | None] | None:
        """``read_into_many`` of tier ``t`` through its guard; ``None`` if it failed
        (then its targets may still be written: abandon their buffers)."""
        tier = self.tiers[t]
        return await tier.guarded("get", tier.backend.read_into_many, reads, count=len(reads))

    # -- one layer ---------------------------------------------------------------------

    async def _replace(
        self,
        broken: list[tuple[_Stream, bool]],
        layer: int,
        keys: Sequence[str],
        targets: _Targets,
        streams: dict[int, _Stream],
        held: dict[int, _Held],
    ) -> None:
        """Drop the streams that broke off at ``layer`` (their buffers given back, or
        abandoned where a failed read may still write into them) and read their chunks
        whole from the tiers below, to be handed over from ``layer`` on."""
        by_tier: dict[int, list[int]] = {}
        for s, abandon in broken:
            del streams[s.index]
            if not abandon:
                s.buf.release()
            by_tier.setdefault(s.tier, []).append(s.index)
        for t, indexes in by_tier.items():
            below = range(t + 1, len(self.tiers))
            await self._read_whole(below, indexes, keys, targets, held, layer)

    async def _deliver(
        self, layer: int, streams: dict[int, _Stream], held: dict[int, _Held], deliver: LayerSink
    ) -> None:
        """Hand layer ``layer`` of every chunk over, one chunk after another in a codec
        thread (measured faster here than spreading them over the codec threads, which
        the next layer's reads and checks need meanwhile)."""

        def from_memory(i: int, h: _Held) -> None:
            deliver(i, layer, h.layer(layer, self.registry))

        def from_stream(s: _Stream) -> None:
            deliver(s.index, layer, decoding.layer_of(s.buf, s.header, layer, self.registry))

        calls = [partial(from_memory, i, h) for i, h in held.items() if h.first <= layer]
        calls += [partial(from_stream, s) for s in streams.values()]
        await self.codec.run(lambda: [call() for call in calls])

    async def _read_sections(
        self, layer: int, keys: Sequence[str], streams: dict[int, _Stream]
    ) -> list[tuple[_Stream, bool]]:
        """Read and check layer ``layer``'s section of every stream into its buffer;
        returns the streams that broke off, each with whether its buffer must be
        abandoned (corrupt sections counted and deleted). Gives no buffer back: the
        caller may be handing the previous layer over from them."""
        broken: list[tuple[_Stream, bool]] = []
        by_tier: dict[int, list[_Stream]] = {}
        for s in streams.values():
            by_tier.setdefault(s.tier, []).append(s)
        for t, group in by_tier.items():
            spans = [s.header.section(layer) for s in group]
            reads = [
                (keys[s.index], offset, s.buf.view[offset : offset + nbytes])
                for s, (offset, nbytes) in zip(group, spans, strict=True)
            ]
            got = await self._read_into(t, reads)
            if got is None:  # the failed read may still write into the buffers
                broken += [(s, True) for s in group]
                continue
            arrived = [s for s, n, (_, want) in zip(group, got, spans, strict=True) if n == want]
            broken += [(s, False) for s in group if s not in arrived]

            def check(s: _Stream) -> ChunkCorruptedError | None:
                try:
                    fmt.check_section(s.buf.view, s.header, layer)
                except ChunkCorruptedError as exc:
                    return exc
                return None

            problems = await self.codec.run_all([partial(check, s) for s in arrived])
            for s, problem in zip(arrived, problems, strict=True):
                if problem is not None:
                    await self._discard_corrupt(t, keys[s.index], str(problem))
                    broken.append((s, False))
        return broken

    # -- opening streams -------------------------------------------------------------

    async def _open_streams(
        self, t: int, wanted: list[int], keys: Sequence[str], targets: _Targets
    ) -> tuple[dict[int, _Stream], list[int]]:
        """Read and check the heads, section tables and trailers of ``keys[i]`` (``i``
        in ``wanted``) in tier ``t``: the streams of the layered blobs found there that
        hold their target's shape, and the indexes of the whole-chunk blobs found (to
        read whole from the same tier). Corrupt ones are counted and deleted; those
        needing a codec this process lacks are misses here."""
        tier = self.tiers[t]
        began = time.perf_counter()
        heads = await self._read_heads(t, wanted, keys)
        if heads is None:
            return {}, []
        old = [i for i, head in heads.items() if head is None]
        streams: dict[int, _Stream] = {}
        for i, head in heads.items():
            if head is None:
                continue
            try:
                header = fmt.read_head(head.view, keys[i])
                target = targets.sinks[i]
                decoding.check_target(header, self.registry, target.shape, target.dtype)
            except (ChunkCorruptedError, CodecUnavailableError) as exc:
                await self._unusable(t, keys[i], exc)
                continue
            buf = self.pool.acquire(header.nbytes)
            buf.view[: head.nbytes] = head.view
            streams[i] = _Stream(i, t, header, buf)
        release_all(h for h in heads.values())
        await self._read_tails(t, keys, streams)
        found = [s.buf for s in streams.values()]
        self._count_reads(
            tier, found, len(wanted) - len(found) - len(old), time.perf_counter() - began
        )
        if tier.name in self.quotas:
            self.quotas[tier.name].touch([keys[i] for i in streams], [b.nbytes for b in found])
        return streams, old

    async def _read_heads(
        self, t: int, wanted: list[int], keys: Sequence[str]
    ) -> dict[int, Buffer | None] | None:
        """The prefix and header of each blob of ``keys[i]`` (``i`` in ``wanted``) found
        in tier ``t``, exactly (``None`` for a whole-chunk blob, read whole instead);
        ``None`` if the tier failed. Corrupt prefixes are counted and deleted."""
        buffers = [self.pool.acquire(HEAD_BYTES) for _ in wanted]
        heads: dict[int, Buffer | None] = {}
        longer: dict[int, int] = {}
        reads = [(keys[i], 0, b.view) for i, b in zip(wanted, buffers, strict=True)]
        got = await self._read_into(t, reads)
        if got is None:
            return None  # the buffers are abandoned
        try:
            for i, buf, count in zip(wanted, buffers, got, strict=True):
                if count is None:
                    continue
                try:
                    prefix = fmt.read_prefix(buf.view[:count])
                except ChunkCorruptedError as exc:
                    await self._discard_corrupt(t, keys[i], str(exc))
                    continue
                if prefix.version == fmt.FORMAT_VERSION:
                    heads[i] = None
                elif prefix.head_nbytes <= count:
                    heads[i] = self.pool.copy_of(buf.view[: prefix.head_nbytes])
                else:
                    longer[i] = prefix.head_nbytes
        finally:
            release_all(buffers)
        if longer:
            await self._read_long_heads(t, keys, longer, heads)
        return heads

    async def _read_long_heads(
        self, t: int, keys: Sequence[str], longer: dict[int, int], heads: dict[int, Buffer | None]
    ) -> None:
        """Read the heads longer than :data:`HEAD_BYTES` (``longer``: index -> bytes)."""
        buffers = {i: self.pool.acquire(n) for i, n in longer.items()}
        got = await self._read_into(t, [(keys[i], 0, b.view) for i, b in buffers.items()])
        if got is None:
            return  # the buffers are abandoned
        for (i, buf), count in zip(buffers.items(), got, strict=True):
            if count == buf.nbytes:
                heads[i] = buf
            else:  # gone meanwhile, or replaced by a shorter blob
                buf.release()

    async def _read_tails(self, t: int, keys: Sequence[str], streams: dict[int, _Stream]) -> None:
        """Read each stream's section table and trailer into its buffer and check the
        head against them (and the MAC); streams that fail are removed (corrupt ones
        counted and deleted)."""
        if not streams:
            return
        spans = {
            i: (s.header.payload_offset + s.header.payload_nbytes, s.header.nbytes)
            for i, s in streams.items()
        }
        got = await self._read_into(
            t, [(keys[i], a, streams[i].buf.view[a:b]) for i, (a, b) in spans.items()]
        )
        if got is None:
            streams.clear()  # the buffers are abandoned
            return
        for (i, (a, b)), count in zip(spans.items(), got, strict=True):
            s = streams[i]
            problem = None if count is None else self._tail_problem(s, count, b - a)
            if count is not None and problem is None:
                continue
            del streams[i]  # gone meanwhile, or corrupt
            s.buf.release()
            if problem is not None:
                await self._discard_corrupt(t, keys[i], str(problem))

    def _tail_problem(self, s: _Stream, count: int, expected: int) -> ChunkCorruptedError | None:
        """What is wrong with a stream whose tail read gave ``count`` bytes of
        ``expected``: a short tail, a head that fails its check or MAC; ``None``."""
        try:
            if count != expected:
                raise ChunkCorruptedError(
                    f"corrupt blob: {count} bytes of the {expected}-byte tail its head declares"
                )
            fmt.check_head(s.buf.view, s.header)
            digest, mac_at = fmt.layered.mac_parts(s.buf.view, s.header)
            fmt.check_signature(s.buf.view, s.header, digest, mac_at, self.integrity)
        except ChunkCorruptedError as exc:
            return exc
        return None
