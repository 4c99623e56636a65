"""Lookups across processes: each worker's :class:`LookupServer` and the scheduler
side's :class:`RemoteLookups` (see :mod:`kvtier.plugins.vllm.lookup`).

ZMQ over a local IPC socket, msgspec's msgpack for the messages: a request is
``(seq, tokens as int64 bytes, extra_keys, held)`` (``held``: tokens the engine
holds, which the lookup does not prefetch), an answer ``(seq, hit, fast)`` (see
:class:`~kvtier.plugins.vllm.lookup.Answer`; ``hit`` is -1 when the lookup failed). Both come with
vLLM.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import logging
import math
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

try:  # both come with vLLM
    import msgspec  # type: ignore[import-not-found, unused-ignore]
    import zmq  # type: ignore[import-not-found, unused-ignore]
except ImportError as exc:  # pragma: no cover - depends on the environment
    from kvtier.core.errors import MissingExtraError

    raise MissingExtraError("kvtier's vLLM lookup servers", "vllm", exc) from exc

from kvtier.core.engine import KVTier
from kvtier.core.keys import ExtraKeys
from kvtier.core.threads import starting_on
from kvtier.plugins.vllm.lookup import NO_HIT, Answer, Pending, answer, ask, local_tiers

log = logging.getLogger(__name__)

_FAILED = Answer(-1, -1)
"""A server's answer when the lookup itself failed (a bug: logged there)."""


def lookup_address(engine_id: str, tp_rank: int) -> str:
    """The IPC endpoint of rank ``tp_rank``'s lookup server for engine ``engine_id``
    (a short hash keeps the path under the 107 bytes a Unix socket path may have)."""
    tag = hashlib.sha256(engine_id.encode()).hexdigest()[:16]
    return f"ipc://{tempfile.gettempdir()}/kvtier-{tag}-{tp_rank}.sock"


_encode = msgspec.msgpack.Encoder().encode
_decode_request = msgspec.msgpack.Decoder(tuple[int, bytes, Any, int]).decode
_decode_answer = msgspec.msgpack.Decoder(tuple[int, int, int]).decode


class LookupServer:
    """Answers lookups in one worker's ``KVTier`` on ``address``, from its own thread.

    Lookups run on the ``KVTier``'s I/O loop; finished ones wake the socket thread
    through a pipe, so answers go out as soon as they are known and slow lookups
    never hold up quick ones."""

    def __init__(self, kv: KVTier, address: str, limits: Sequence[float | None]) -> None:
        self.kv = kv
        self.address = address
        self.limits = list(limits)
        self._ctx: Any = zmq.Context.instance()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.bind(address)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._done: deque[tuple[bytes, int, Answer]] = deque()
        self._local = local_tiers(kv)
        self._stop = False
        self._thread = threading.Thread(target=self._serve, name="kvtier-lookup", daemon=True)
        with starting_on(kv.thread_cpus):
            self._thread.start()

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop:
            events = dict(poller.poll())
            if self._socket in events:
                while True:
                    try:
                        peer, payload = self._socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._start(peer, payload)
            if self._wake_r in events:
                with contextlib.suppress(BlockingIOError):
                    os.read(self._wake_r, 4096)
            while self._done:
                peer, seq, got = self._done.popleft()
                self._socket.send_multipart([peer, _encode((seq, *got))])
        self._socket.close()

    def _start(self, peer: bytes, payload: bytes) -> None:
        seq, raw, extra, held = _decode_request(payload)
        tokens = np.frombuffer(raw, dtype=np.int64)
        extra_keys = _tuples(extra)
        try:
            future = ask(self.kv, tokens, extra_keys, self.limits, held)
        except Exception:
            log.exception("kvtier: lookup %d failed", seq)
            self._answer(peer, seq, _FAILED)
            return

        def done(f: concurrent.futures.Future[list[int]]) -> None:
            try:
                got = answer(f.result(), self._local)
            except Exception:
                log.exception("kvtier: lookup %d failed", seq)
                got = _FAILED
            self._answer(peer, seq, got)

        future.add_done_callback(done)

    def _answer(self, peer: bytes, seq: int, got: Answer) -> None:
        self._done.append((peer, seq, got))
        with contextlib.suppress(OSError):  # a full pipe: the thread is awake already
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        if self._stop:
            return
        self._stop = True
        os.write(self._wake_w, b"x")
        self._thread.join(5)
        os.close(self._wake_r)
        os.close(self._wake_w)
        path = self.address.removeprefix("ipc://")
        if os.path.exists(path):
            os.unlink(path)


def _tuples(value: Any) -> Any:
    """msgpack's lists back into the tuples the extra keys were made of."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


class _RemotePending:
    def __init__(self, owner: RemoteLookups, seq: int) -> None:
        self.owner = owner
        self.seq = seq

    def result(self, timeout: float) -> Answer | None:
        return self.owner.wait(self.seq, timeout)

    def cancel(self) -> None:
        self.owner.answers.pop(self.seq, None)


class RemoteLookups:
    """The scheduler side's client of every rank's :class:`LookupServer`.

    Used only from the scheduler's thread: sending and polling happen inside
    :meth:`submit` and :meth:`Pending.result`, so no thread is needed here."""

    def __init__(self, addresses: Sequence[str]) -> None:
        self._ctx: Any = zmq.Context.instance()
        self._sockets = []
        for address in addresses:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(address)
            self._sockets.append(sock)
        self._poller = zmq.Poller()
        for sock in self._sockets:
            self._poller.register(sock, zmq.POLLIN)
        self._seq = 0
        self.answers: dict[int, dict[int, Answer]] = {}
        """Answers so far of each lookup still wanted, by rank."""

    def submit(
        self, tokens: Sequence[int], extra_keys: tuple[ExtraKeys, ...], held: int = 0
    ) -> Pending:
        self._seq += 1
        seq = self._seq
        raw = np.asarray(tokens, dtype=np.int64).tobytes()
        payload = _encode((seq, raw, list(extra_keys), held))
        self.answers[seq] = {}
        for rank, sock in enumerate(self._sockets):
            try:
                sock.send(payload, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("kvtier: the lookup server of rank %d is not reachable", rank)
                self.answers[seq][rank] = NO_HIT
        return _RemotePending(self, seq)

    def wait(self, seq: int, timeout: float) -> Answer | None:
        """The answer to lookup ``seq`` (the smallest rank's hit), polling the sockets
        for at most ``timeout`` seconds (once, without waiting, if it is 0);
        ``None`` if some rank has not answered yet."""
        deadline = time.monotonic() + timeout
        polled = False
        while True:
            got = self.answers.get(seq)
            if got is None:
                return NO_HIT  # cancelled
            if len(got) == len(self._sockets):
                del self.answers[seq]
                answers = list(got.values())
                if _FAILED in answers:
                    return NO_HIT
                return Answer(min(a.hit for a in answers), min(a.fast for a in answers))
            left = deadline - time.monotonic()
            if polled and left <= 0:
                return None
            polled = True
            self._receive(max(left, 0.0))

    def _receive(self, timeout: float) -> None:
        """Collect the answers that arrive within ``timeout`` seconds."""
        events = dict(self._poller.poll(math.ceil(timeout * 1000)))
        for rank, sock in enumerate(self._sockets):
            if sock not in events:
                continue
            while True:
                try:
                    payload = sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    break
                answered, hit, fast = _decode_answer(payload)
                if answered in self.answers:
                    self.answers[answered][rank] = Answer(hit, fast)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
        self._sockets = []
