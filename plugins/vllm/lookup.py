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
* Prefetch: every lookup (:func:`ask`) also starts copying the leading chunks it
  found only in slower tiers (file, Redis, ...) into the worker's ``cpu`` tier, in
  the background, so that the load that follows reads RAM; not those inside vLLM's
  own prefix-cache hit, which it will not load. The config's ``prefetch_bytes``
  bounds the bytes in flight (``0`` turns it off).
"""

from __future__ import annotations

import concurrent.futures
import logging
from collections.abc import Sequence
from typing import NamedTuple, Protocol

from kvtier.core.engine import KVTier
from kvtier.core.keys import ExtraKeys, Tokens

log = logging.getLogger(__name__)


class Answer(NamedTuple):
    """A lookup's answer, in leading tokens of the prompt."""

    hit: int
    """Held by some tier."""
    fast: int
    """Held by the tiers inside the worker process (``cpu``): a load of these is a
    memory copy; the rest of the hit comes from slower tiers."""


NO_HIT = Answer(0, 0)


def answer(counts: Sequence[int], local_tiers: int) -> Answer:
    """The :class:`Answer` of :meth:`KVTier.lookup_by_tier`'s ``counts`` for a chain
    whose first ``local_tiers`` tiers are inside the process."""
    hit = counts[-1] if counts else 0
    return Answer(hit, counts[local_tiers - 1] if local_tiers else 0)


def local_tiers(kv: KVTier) -> int:
    """How many of ``kv``'s tiers, from the fastest, are inside the process."""
    n = 0
    for tier in kv.chain.tiers:
        if not tier.backend.capabilities.process_local:
            break
        n += 1
    return n


class Pending(Protocol):
    """One submitted lookup."""

    def result(self, timeout: float) -> Answer | None:
        """The answer, waiting at most ``timeout`` seconds; ``None`` if it has not
        arrived yet (ask again later)."""
        ...

    def cancel(self) -> None:
        """The answer is no longer wanted."""
        ...


class Lookups(Protocol):
    """Where the scheduler side sends its lookups (``held``: leading tokens vLLM
    holds itself, not prefetched)."""

    def submit(
        self, tokens: Sequence[int], extra_keys: tuple[ExtraKeys, ...], held: int = 0
    ) -> Pending: ...

    def close(self) -> None: ...


def ask(
    kv: KVTier,
    tokens: Tokens,
    extra_keys: tuple[ExtraKeys, ...],
    limits: Sequence[float | None] | None,
    held: int = 0,
) -> concurrent.futures.Future[list[int]]:
    """A worker's lookup for the scheduler side: ``kv``'s answer tier by tier, each
    tier waited for at most its ``limits``, prefetching what only slower tiers hold,
    past the ``held`` tokens vLLM holds itself, toward the ``cpu`` tier (within
    ``prefetch_bytes``)."""
    return kv.lookup_by_tier(tokens, extra_keys=extra_keys, limits=limits, prefetch=True, held=held)


def tier_limits(kv: KVTier, local: float, remote: float) -> list[float | None]:
    """Seconds each tier of ``kv``'s chain is waited for in a lookup: ``local`` for
    tiers inside the process (``cpu``), ``remote`` for the others."""
    return [local if tier.backend.capabilities.process_local else remote for tier in kv.chain.tiers]


# -- in this process -----------------------------------------------------------------------


class _FuturePending:
    def __init__(self, future: concurrent.futures.Future[list[int]], local: int) -> None:
        self.future = future
        self.local = local

    def result(self, timeout: float) -> Answer | None:
        try:
            return answer(self.future.result(timeout), self.local)
        except concurrent.futures.TimeoutError:
            return None
        except Exception:
            log.exception("kvtier: a lookup failed; counted as a miss")
            return NO_HIT

    def cancel(self) -> None:
        self.future.cancel()


class LocalLookups:
    """Lookups in a ``KVTier`` of this process, on its I/O loop."""

    def __init__(self, kv: KVTier, limits: Sequence[float | None] | None = None) -> None:
        self.kv = kv
        self.limits = None if limits is None else list(limits)
        self.local = local_tiers(kv)

    def submit(
        self, tokens: Sequence[int], extra_keys: tuple[ExtraKeys, ...], held: int = 0
    ) -> Pending:
        return _FuturePending(ask(self.kv, tokens, extra_keys, self.limits, held), self.local)

    def close(self) -> None:
        pass
