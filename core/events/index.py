"""A reference consumer: the prefix index a router builds from one publisher's events.

It learns only from events, as llm-d's indexer and vllm-router's ``kv_aware`` policy
do: each ``BlockStored`` links a block (found by its parent and its tokens) to its
hash and marks it held in ``medium``; ``BlockRemoved`` unmarks; ``AllBlocksCleared``
forgets every mark. :meth:`prefix` then predicts how many leading tokens of a prompt
the publisher holds, which tests compare with ``KVTier.lookup``. Works on kvtier's wire
structs and on vLLM's alike (it reads attributes only).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

Hash = bytes | int


class PrefixIndex:
    """Blocks known from events, and the media each one is held in."""

    def __init__(self) -> None:
        self.block_size: int | None = None
        self._child: dict[tuple[Hash | None, tuple[int, ...]], Hash] = {}
        self._held: dict[Hash, set[str | None]] = {}

    def apply(self, events: Iterable[Any]) -> None:
        """Apply the events of one batch, in order."""
        for event in events:
            kind = type(event).__name__
            if kind == "BlockStored":
                self._stored(event)
            elif kind == "BlockRemoved":
                for block in event.block_hashes:
                    self._held.get(block, set()).discard(event.medium)
            elif kind == "AllBlocksCleared":
                self._held.clear()

    def _stored(self, event: Any) -> None:
        size = event.block_size
        if self.block_size is None:
            self.block_size = size
        elif size != self.block_size:
            raise ValueError(f"block size changed from {self.block_size} to {size}")
        parent = event.parent_block_hash
        for i, block in enumerate(event.block_hashes):
            tokens = tuple(event.token_ids[i * size : (i + 1) * size])
            self._child[(parent, tokens)] = block
            self._held.setdefault(block, set()).add(event.medium)
            parent = block

    def prefix(self, tokens: Sequence[int], media: Iterable[str] | None = None) -> int:
        """Leading tokens of ``tokens`` held in some medium (or in one of ``media``)."""
        if not self.block_size:
            return 0
        wanted = None if media is None else set(media)
        size, parent, matched = self.block_size, None, 0
        for start in range(0, len(tokens) - size + 1, size):
            block = self._child.get((parent, tuple(tokens[start : start + size])))
            held = self._held.get(block, set()) if block is not None else set()
            if not (held if wanted is None else held & wanted):
                break
            parent, matched = block, start + size
        return matched

    def held(self, medium: str) -> int:
        """Blocks held in ``medium``."""
        return sum(medium in media for media in self._held.values())

    def media(self, tokens: Sequence[int]) -> dict[str | None, int]:
        """Per medium, the leading tokens of ``tokens`` it holds."""
        names = {m for held in self._held.values() for m in held}
        return {m: self.prefix(tokens, [m]) for m in names if m is not None}


class Subscriber:
    """Follows one publisher as routers do: a SUB socket for live batches, and the
    replay socket to fill a gap in the sequence numbers (batches missed before the
    subscription took hold, or dropped). Each batch is decoded with ``decode`` (e.g.
    vLLM's own ``KVEventBatch`` decoder) and applied to ``index``."""

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None,
        topic: str,
        decode: Any,
        index: PrefixIndex | None = None,
    ) -> None:
        import zmq

        self._zmq = zmq
        self._ctx = zmq.Context()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.connect(endpoint)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self.replay_endpoint = replay_endpoint
        self.decode = decode
        self.index = index if index is not None else PrefixIndex()
        self.next_seq = 0
        self.batches: list[Any] = []

    def follow(self, last_seq: int, timeout: float = 10.0) -> None:
        """Apply batches until ``last_seq`` has been applied."""
        import time

        deadline = time.monotonic() + timeout
        while self.next_seq <= last_seq:
            if time.monotonic() > deadline:
                raise TimeoutError(f"batch {self.next_seq} never arrived (want {last_seq})")
            if self._sub.poll(100):
                _, seq, payload = self._sub.recv_multipart()
                number = int.from_bytes(seq, "big", signed=True)
                if number > self.next_seq:
                    self._replay()
                if number == self.next_seq:
                    self._apply(payload)
            elif self.replay_endpoint is not None:
                self._replay()

    def _apply(self, payload: bytes) -> None:
        batch = self.decode(payload)
        self.batches.append(batch)
        self.index.apply(batch.events)
        self.next_seq += 1

    def _replay(self) -> None:
        if self.replay_endpoint is None:
            return
        dealer = self._ctx.socket(self._zmq.DEALER)
        try:
            dealer.connect(self.replay_endpoint)
            dealer.send_multipart([b"", self.next_seq.to_bytes(8, "big")])
            while dealer.poll(2000):
                *_, seq, payload = dealer.recv_multipart()
                number = int.from_bytes(seq, "big", signed=True)
                if number == -1:
                    break
                if number == self.next_seq:
                    self._apply(payload)
        finally:
            dealer.close(linger=0)

    def close(self) -> None:
        self._sub.close(linger=0)
        self._ctx.term()
