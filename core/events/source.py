"""Tier events -> vLLM KV events, for one :class:`~kvtier.core.engine.KVTier`.

:class:`KVEvents` observes ``kvtier_tier_event`` (chunks stored in, evicted from or
deleted as corrupt from each tier) and turns each into vLLM's ``BlockStored`` /
``BlockRemoved``. A tier event names chunk keys only; ``KVTier.store`` and
``KVTier.retrieve`` :meth:`note` each chunk's parent and token ids first (in a bounded
journal), so that a ``BlockStored`` carries what a router needs to place it: the
chain's parent hash, the token ids and the block size.

Block hashes: each chunk's digest (the hash in its key), so with ``hash:
sha256_cbor``, the seed of vLLM's ``NONE_HASH`` and ``chunk_tokens`` equal to vLLM's
block size they are vLLM's own block hashes. With ``events.block_size`` smaller than
``chunk_tokens`` a chunk is reported as ``chunk_tokens / block_size`` blocks: the last
one's hash is the chunk's digest, the others' are derived from it
(:func:`block_hashes`), so every hash can be recomputed from the key alone.

Only full chunks are reported (vLLM never reports partial blocks). Chunks leave a
process-local tier (``cpu://``) when the process ends: :meth:`close` reports them
removed.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from kvtier.core.errors import ConfigError
from kvtier.core.events.config import EventsConfig
from kvtier.core.hookspecs import hookimpl
from kvtier.core.specs import EventKind, TierEvent
from kvtier.core.urls import redact

if TYPE_CHECKING:
    from kvtier.core.events.publisher import ZmqPublisher
    from kvtier.core.events.wire import KVEvent
    from kvtier.core.keys import ChunkHasher, ExtraKeys, Tokens
    from kvtier.core.plugins import PluginRegistry
    from kvtier.core.tier import Tier

log = logging.getLogger(__name__)

_REPORTED = (EventKind.STORED, EventKind.EVICTED, EventKind.CORRUPT)
ROUTER_MEDIA = {"cpu": "host", "file": "disk"}
"""vllm-router's names for kvtier's tier kinds (by URL scheme); other tiers are
``external``, with ``ownership`` naming the shared pool."""


def block_hashes(digest: bytes, blocks: int) -> list[bytes]:
    """Hashes of the ``blocks`` blocks of a chunk with ``digest``: derived ones, then
    the digest itself (the chunk's last block, the next chunk's parent)."""
    derived = [
        hashlib.blake2b(
            digest + j.to_bytes(4, "big"), digest_size=len(digest), person=b"kvtier-block"
        ).digest()
        for j in range(blocks - 1)
    ]
    return [*derived, digest]


@dataclass(frozen=True, slots=True)
class _Noted:
    """What the journal knows of a chunk: its parent's digest, index and tokens."""

    parent: bytes | None
    index: int
    tokens: np.ndarray[Any, Any]
    extra: ExtraKeys


@dataclass(frozen=True, slots=True)
class _Media:
    medium: str
    ownership: str | None
    process_local: bool


class KVEvents:
    """The KV events of one ``KVTier``; built by :func:`kvtier.core.events.open_events`.

    ``drain()`` hands the events produced since the last call to whoever publishes them:
    kvtier's ZMQ publisher (``events.publisher: zmq``) or the vLLM connector (``none``).
    """

    def __init__(
        self,
        config: EventsConfig,
        *,
        model: str,
        hasher: ChunkHasher,
        tiers: Sequence[Tier],
        registry: PluginRegistry,
    ) -> None:
        self.config = config
        self.chunk_tokens = hasher.chunk_tokens
        self.block_size = config.block_size or hasher.chunk_tokens
        if self.chunk_tokens % self.block_size:
            raise ConfigError(
                f"events.block_size ({self.block_size}) must divide chunk_tokens "
                f"({self.chunk_tokens})"
            )
        self._blocks = self.chunk_tokens // self.block_size
        self._prefix = hasher.namespace + "."
        self._media = self._resolve_media(config, tiers)
        default = f"kv@{config.instance or socket.gethostname()}@{model}"
        self.topic = default if config.topic is None else config.topic
        self._lock = threading.Lock()
        self._journal: OrderedDict[str, _Noted] = OrderedDict()
        self._pending: deque[TierEvent] = deque()
        self._outbox: list[KVEvent] = []
        self._resident: dict[str, dict[str, None]] = {
            name: {} for name, media in self._media.items() if media.process_local
        }
        self._evicted: dict[str, set[str]] = {}
        """Per tier, the chunks evicted since it last reported a stored batch."""
        self.unreported = 0
        """Chunks stored in a tier but not reported: their tokens were not in the journal."""
        self.stored_and_evicted = 0
        """Chunks a tier evicted during the put that stored them: not reported stored."""
        self._registry = registry
        self._closed = False
        self.publisher: ZmqPublisher | None = None
        if config.publisher == "zmq":
            from kvtier.core.events.publisher import ZmqPublisher

            self.publisher = ZmqPublisher(config, self.topic, self.drain)
        registry.pm.register(self, name=f"kvtier-events-{id(self):x}")

    @staticmethod
    def _resolve_media(config: EventsConfig, tiers: Sequence[Tier]) -> dict[str, _Media]:
        names = [t.name for t in tiers]
        for field in ("medium", "ownership"):
            unknown = sorted(set(getattr(config, field)) - set(names))
            if unknown:
                raise ConfigError(
                    f"events.{field} names tiers {unknown} that are not in the chain; "
                    f"tiers: {names}"
                )
        media = {}
        for tier in tiers:
            scheme = tier.config.url.split(":", 1)[0].lower()
            if config.media == "vllm-router":
                medium = ROUTER_MEDIA.get(scheme, "external")
                owner = None if scheme in ROUTER_MEDIA else redact(tier.config.url)
            else:
                medium, owner = tier.name.lower(), None
            medium = config.medium.get(tier.name, medium)
            owner = config.ownership.get(tier.name, owner) or None
            local = tier.backend.capabilities.process_local
            media[tier.name] = _Media(medium, owner, local)
        return media

    # -- input ----------------------------------------------------------------------

    def note(
        self,
        tokens: Tokens,
        keys: Sequence[str],
        bounds: Sequence[tuple[int, int]],
        extra_keys: Sequence[ExtraKeys] = (),
    ) -> None:
        """Remember the parent and tokens of each chunk of ``tokens`` (``keys[i]``
        spans ``bounds[i]``), for the tier events that will report them."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu().numpy()
        arr = np.asarray(tokens, dtype=np.int64)
        if arr.size and arr.min() >= 0 and arr.max() < 1 << 31:
            arr = arr.astype(np.int32)  # half the memory for every real vocabulary
        parent: bytes | None = None
        with self._lock:
            for i, (key, (start, end)) in enumerate(zip(keys, bounds, strict=True)):
                extra = extra_keys[i] if i < len(extra_keys) else None
                # A copy per chunk: the journal holds chunk_tokens ids per entry, never
                # a whole prompt for the sake of one of its chunks.
                self._journal[key] = _Noted(parent, i, arr[start:end].copy(), extra)
                self._journal.move_to_end(key)
                parent = bytes.fromhex(key[len(self._prefix) :])
            while len(self._journal) > self.config.journal_chunks:
                self._journal.popitem(last=False)

    @hookimpl
    def kvtier_tier_event(self, event: TierEvent) -> None:
        """Queue the tier events that move this namespace's chunks (microseconds)."""
        if (
            event.kind in _REPORTED
            and event.tier in self._media
            and event.keys
            and event.keys[0].startswith(self._prefix)
        ):
            self._pending.append(event)
            if self.publisher is not None:
                self.publisher.notify()

    # -- output ---------------------------------------------------------------------

    def drain(self) -> list[KVEvent]:
        """The KV events produced since the last call, oldest first."""
        out: list[KVEvent] = []
        with self._lock:
            out, self._outbox = self._outbox, []
            while self._pending:
                out.extend(self._translate(self._pending.popleft()))
        return out

    def _hashes(self, digest: bytes) -> list[bytes | int]:
        hashes = block_hashes(digest, self._blocks) if self._blocks > 1 else [digest]
        if self.config.block_hashes == "int":
            return [int.from_bytes(h[:8], "big") for h in hashes]
        return list(hashes)

    def _translate(self, event: TierEvent) -> list[KVEvent]:
        from kvtier.core.events.wire import BlockRemoved

        media = self._media[event.tier]
        keys = [k for k in event.keys if k.startswith(self._prefix)]
        resident = self._resident.get(event.tier)
        evicted = self._evicted.setdefault(event.tier, set())
        if event.kind == EventKind.STORED:
            # A tier reports a batch stored once its put returns, after the evictions
            # that put made, which may include chunks of the batch itself.
            gone, stored = evicted & set(keys), [k for k in keys if k not in evicted]
            evicted.clear()
            self.stored_and_evicted += len(gone)
            return self._stored(stored, media, resident)
        evicted.update(keys)
        if resident is not None:
            for key in keys:
                resident.pop(key, None)
        hashes = [h for key in keys for h in self._hashes(self._digest(key))]
        return [BlockRemoved(block_hashes=hashes, medium=media.medium, ownership=media.ownership)]

    def _digest(self, key: str) -> bytes:
        return bytes.fromhex(key[len(self._prefix) :])

    def _stored(
        self, keys: list[str], media: _Media, resident: dict[str, None] | None
    ) -> list[KVEvent]:
        from kvtier.core.events.wire import BlockStored

        found = []
        for key in keys:
            noted = self._journal.get(key)
            if noted is None:
                self.unreported += 1
            elif len(noted.tokens) == self.chunk_tokens:
                found.append((noted.index, key, noted))
        found.sort(key=lambda item: item[0])  # parents before children
        runs: list[tuple[bytes | None, list[tuple[str, _Noted]]]] = []
        tails: dict[bytes, int] = {}  # last digest of a run -> its index in runs
        for _, key, noted in found:
            digest = self._digest(key)
            at = tails.pop(noted.parent, None) if noted.parent is not None else None
            if at is None:
                runs.append((noted.parent, []))
                at = len(runs) - 1
            runs[at][1].append((key, noted))
            tails[digest] = at
            if resident is not None:
                resident[key] = None
        events: list[KVEvent] = []
        for parent, chunks in runs:
            extra = [n.extra for _, n in chunks for _ in range(self._blocks)]
            events.append(
                BlockStored(
                    block_hashes=[h for key, _ in chunks for h in self._hashes(self._digest(key))],
                    parent_block_hash=None if parent is None else self._hashes(parent)[-1],
                    token_ids=[t for _, n in chunks for t in n.tokens.tolist()],
                    block_size=self.block_size,
                    lora_id=None,
                    medium=media.medium,
                    lora_name=None,
                    extra_keys=extra if any(e is not None for e in extra) else None,
                    ownership=media.ownership,
                )
            )
        return events

    # -- lifetime -------------------------------------------------------------------

    def flush(self, timeout: float = 10.0) -> None:
        """Wait until every event produced so far has been published (zmq publisher)."""
        if self.publisher is not None:
            self.publisher.sync(timeout)

    def close(self) -> None:
        """Report the chunks of process-local tiers as removed (the process is ending),
        publish what is left and stop the publisher. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._registry.pm.unregister(self)
        from kvtier.core.events.wire import BlockRemoved

        with self._lock:
            while self._pending:  # before the removals, which must come last
                self._outbox.extend(self._translate(self._pending.popleft()))
            for name, resident in self._resident.items():
                if resident:
                    media = self._media[name]
                    hashes = [h for key in resident for h in self._hashes(self._digest(key))]
                    self._outbox.append(
                        BlockRemoved(
                            block_hashes=hashes, medium=media.medium, ownership=media.ownership
                        )
                    )
                    resident.clear()
        if self.publisher is not None:
            self.publisher.close()

    def __repr__(self) -> str:
        return f"<KVEvents topic={self.topic!r} block_size={self.block_size}>"
