"""Lookups for the scheduler side, which must never wait on storage.

vLLM's scheduler asks the connector how much of each prompt kvtier holds
(``get_num_new_matched_tokens``) in its own thread, between engine steps. The
answer must come from the tier chains of the *workers* (their ``cpu://`` tier is
their process's RAM), and must never make the scheduler wait on a slow or hung tier.

* Where the workers' chain lives: when the worker (tensor parallel size 1) runs in
  the scheduler's process (vLLM with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``),
  :class:`LocalLookups` asks its ``KVTier`` directly. Otherwise (vLLM's default on
  CPUs, where a worker process runs the model, and every TP > 1 engine) each worker
  runs a lookup server, a ZMQ ``ROUTER`` socket on a local IPC path derived from the
  engine id, and the scheduler side asks every rank (:mod:`kvtier.plugins.vllm.rpc`);
  the hit is the smallest rank's answer (each rank holds its own shard).
* Never waiting: a lookup is submitted once and its answer collected by later calls
  (:meth:`Pending.result` waits at most the scheduler's budget); the workers bound
  each tier's part of the lookup (:func:`tier_limits`), so a hung tier counts as a
  miss there after a few milliseconds, and a tier whose circuit breaker is open is
  not asked at all.
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Sequence
from typing import Protocol

from kvtier.core.engine import KVTier
from kvtier.core.keys import ExtraKeys

log = logging.getLogger(__name__)


class Pending(Protocol):
    """One submitted lookup."""

    def result(self, timeout: float) -> int | None:
        """The hit in tokens, waiting at most ``timeout`` seconds; ``None`` if it has
        not arrived yet (ask again later)."""
        ...

    def cancel(self) -> None:
        """The answer is no longer wanted."""
        ...


class Lookups(Protocol):
    """Where the scheduler side sends its lookups."""

    def submit(self, tokens: Sequence[int], extra_keys: tuple[ExtraKeys, ...]) -> Pending: ...

    def close(self) -> None: ...


def tier_limits(kv: KVTier, local: float, remote: float) -> list[float | None]:
    """Seconds each tier of ``kv``'s chain is waited for in a lookup: ``local`` for
    tiers inside the process (``cpu``), ``remote`` for the others."""
    return [local if tier.backend.capabilities.process_local else remote for tier in kv.chain.tiers]


# -- in this process -----------------------------------------------------------------------


class _FuturePending:
    def __init__(self, future: concurrent.futures.Future[int]) -> None:
        self.future = future

    def result(self, timeout: float) -> int | None:
        try:
            return self.future.result(timeout)
        except concurrent.futures.TimeoutError:
            return None
        except Exception:
            log.exception("kvtier: a lookup failed; counted as a miss")
            return 0

    def cancel(self) -> None:
        self.future.cancel()


class LocalLookups:
    """Lookups in a ``KVTier`` of this process, on its I/O loop."""

    def __init__(self, kv: KVTier, limits: Sequence[float | None] | None = None) -> None:
        self.kv = kv
        self.limits = None if limits is None else list(limits)

    def submit(self, tokens: Sequence[int], extra_keys: tuple[ExtraKeys, ...]) -> Pending:
        return _FuturePending(
            self.kv.lookup_future(tokens, extra_keys=extra_keys, limits=self.limits)
        )

    def close(self) -> None:
        pass
