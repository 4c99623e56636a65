"""kvtier's own ZMQ publisher of KV events: vLLM's wire protocol, outside vLLM.

A PUB socket sends each batch as three frames, ``(topic, 8-byte big-endian sequence,
msgpack EventBatch)``, sequences counting from 0 per process; an optional ROUTER socket
answers a replay request (``[identity, b"", start sequence]``) with every buffered batch
from that sequence on (``[identity, b"", topic, sequence, payload]``) and then
``[identity, b"", b"", -1, b""]``, as vLLM's ``ZmqEventPublisher`` does. Sockets are
bound when the publisher is built, so a busy or invalid endpoint fails ``KVTier.open``
with a :class:`ConfigError`; after that only the publisher's thread touches them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from kvtier.core.errors import ConfigError, MissingExtraError
from kvtier.core.events import wire
from kvtier.core.events.config import EventsConfig

try:
    import zmq
except ImportError as exc:  # pragma: no cover - depends on the extra
    raise MissingExtraError("the KV event publisher", "events", exc) from exc

if TYPE_CHECKING:
    from kvtier.core.events.wire import KVEvent

log = logging.getLogger(__name__)

IDLE_SECONDS = 0.05
"""Longest wait between two looks at the replay socket."""
LINGER_MS = 1000
"""How long closing waits for the last batches to reach connected subscribers."""


def _bind(sock: zmq.Socket[bytes], endpoint: str, what: str) -> str:
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        sock.close(linger=0)
        raise ConfigError(
            f"events.{what}: cannot bind {endpoint!r}: {exc}. Is another process publishing "
            "there? Choose a free port (0 picks one) or another address"
        ) from None
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


class ZmqPublisher:
    """Publishes what ``source()`` returns, in its own thread."""

    def __init__(
        self, config: EventsConfig, topic: str, source: Callable[[], list[KVEvent]]
    ) -> None:
        self.topic = topic.encode()
        self._source = source
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=config.buffer_steps)
        self._ctx = zmq.Context()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(config.hwm)
        self._replay: zmq.Socket[bytes] | None = None
        try:
            self.endpoint = _bind(self._pub, config.endpoint, "endpoint")
            self.replay_endpoint: str | None = None
            if config.replay_endpoint is not None:
                self._replay = self._ctx.socket(zmq.ROUTER)
                self.replay_endpoint = _bind(
                    self._replay, config.replay_endpoint, "replay_endpoint"
                )
        except BaseException:
            self._pub.close(linger=0)
            self._ctx.term()
            raise
        self.last_seq = -1
        """Sequence number of the last batch sent (-1: none yet)."""
        self._wake = threading.Event()
        self._syncs: list[threading.Event] = []
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="kvtier-events", daemon=True)
        self._thread.start()

    def notify(self) -> None:
        """New events are waiting (called from the tier event hook: cheap)."""
        self._wake.set()

    def sync(self, timeout: float) -> None:
        """Wait until everything ``source()`` had when this was called is sent."""
        if not self._thread.is_alive():
            return
        done = threading.Event()
        self._syncs.append(done)
        self._wake.set()
        if not done.wait(timeout):
            raise TimeoutError(f"KV events not published within {timeout}s")

    def _run(self) -> None:
        while True:
            self._wake.wait(IDLE_SECONDS)
            self._wake.clear()
            stopping = self._stopping
            syncs, self._syncs = self._syncs, []
            try:
                self._serve_replay()
                events = self._source()
                if events:
                    self._send(events)
            except Exception:
                log.exception("publishing KV events failed")
            for done in syncs:
                done.set()
            if stopping:
                return

    def _send(self, events: list[KVEvent]) -> None:
        payload = wire.encode(
            wire.KVEventBatch(ts=time.time(), events=events, data_parallel_rank=0)
        )
        seq = self.last_seq + 1
        self._pub.send_multipart((self.topic, seq.to_bytes(8, "big"), payload))
        self._buffer.append((seq, payload))
        self.last_seq = seq

    def _serve_replay(self) -> None:
        while self._replay is not None and self._replay.poll(0):
            frames = self._replay.recv_multipart()
            if len(frames) != 3 or len(frames[2]) != 8:
                log.warning("ignoring a malformed KV event replay request (%d frames)", len(frames))
                continue
            client, start = frames[0], int.from_bytes(frames[2], "big")
            for seq, payload in self._buffer:
                if seq >= start:
                    self._replay.send_multipart(
                        (client, b"", self.topic, seq.to_bytes(8, "big"), payload)
                    )
            self._replay.send_multipart((client, b"", b"", wire.END_SEQ, b""))

    def close(self) -> None:
        """Send what is left, then close the sockets (waiting up to :data:`LINGER_MS`
        for subscribers to take it)."""
        if self._thread.is_alive():
            self._stopping = True
            self._wake.set()
            self._thread.join()
        self._pub.close(linger=LINGER_MS)
        if self._replay is not None:
            self._replay.close(linger=0)
        self._ctx.term()
