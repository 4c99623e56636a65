"""One tier of the chain: a backend with its codec pipeline, circuit breaker and counters."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, TypeVar

from kvtier.core.backend import Backend
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.config import TierConfig
from kvtier.core.errors import KVTierError
from kvtier.core.specs import EventKind, TierEvent
from kvtier.core.urls import redact

log = logging.getLogger(__name__)
T = TypeVar("T")
MAX_RETRY_AFTER = 60.0

STRICT = False
"""Re-raise a backend's bugs (exceptions other than kvtier errors and timeouts) instead
of skipping the tier. Off in production, where a failing tier must never crash
inference; kvtier's own test suite turns it on, so that a bug never passes for an
outage."""


@dataclass
class TierStats:
    """Counters of one tier since it was opened."""

    name: str
    url: str
    """The tier's URL without credentials."""
    codec: str
    hits: int = 0
    misses: int = 0
    stored: int = 0
    bytes_in: int = 0
    """Encoded bytes written into the tier."""
    bytes_out: int = 0
    """Encoded bytes read from the tier."""
    evictions: int = 0
    rejected: int = 0
    """Chunks offered but not written: already present (``CREATE``) or refused (full,
    too large); the backend's ``stats().details`` tell refusals apart."""
    corrupt: int = 0
    """Blobs that failed validation; each was deleted from the tier."""
    errors: int = 0
    skipped: int = 0
    """Operations not attempted because the tier was marked unavailable."""
    ops: int = 0
    op_seconds: float = 0.0
    max_op_seconds: float = 0.0
    available: bool = True

    @property
    def mean_latency_ms(self) -> float:
        return 1000 * self.op_seconds / self.ops if self.ops else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mean_latency_ms": round(self.mean_latency_ms, 3)}


@dataclass
class KVTierStats:
    """Per-tier counters plus the store queue's."""

    tiers: list[TierStats]
    stores_queued: int = 0
    stores_dropped: int = 0
    tokens_stored: int = 0
    queue_bytes: int = 0

    def tier(self, name: str) -> TierStats:
        return next(t for t in self.tiers if t.name == name)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tiers": [t.as_dict() for t in self.tiers],
            "stores_queued": self.stores_queued,
            "stores_dropped": self.stores_dropped,
            "tokens_stored": self.tokens_stored,
            "queue_bytes": self.queue_bytes,
        }


class CircuitBreaker:
    """Skips a failing tier for ``retry_after`` seconds, doubling (up to a minute) each
    time a try after the wait fails. Calls already in flight when the tier failed belong
    to the same outage: their failures neither double nor extend the wait."""

    def __init__(self, retry_after: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.base = retry_after
        self.clock = clock
        self.delay = retry_after
        self.open_until: float | None = None
        self._opened_at = -math.inf

    @property
    def closed(self) -> bool:
        return self.open_until is None

    def allow(self) -> bool:
        """Whether to try the tier now (always when closed; once the wait is over when open)."""
        return self.open_until is None or self.clock() >= self.open_until

    def success(self) -> None:
        self.open_until = None
        self.delay = self.base

    def failure(self, started: float) -> None:
        """A call begun at ``started`` (this breaker's clock) failed."""
        if started < self._opened_at:
            return  # in flight when the breaker opened: the same outage
        now = self.clock()
        if self.open_until is not None:
            self.delay = min(self.delay * 2, MAX_RETRY_AFTER)
        self._opened_at = now
        self.open_until = now + self.delay


class Tier:
    """A backend in the chain. :meth:`guarded` runs one operation with the tier's timeout
    and circuit breaker and turns every failure into ``None``, counted and reported."""

    def __init__(
        self,
        config: TierConfig,
        backend: Backend,
        pipeline: CodecPipeline,
        *,
        retry_after: float,
        emit: Callable[[TierEvent], None],
    ) -> None:
        assert config.name is not None
        self.name = config.name
        self.config = config
        self.backend = backend
        self.pipeline = pipeline
        self.breaker = CircuitBreaker(retry_after)
        self.emit = emit
        self.stats = TierStats(name=self.name, url=redact(config.url), codec=pipeline.name)
        self._opened = True

    def mark_unopened(self, exc: Exception) -> None:
        """The backend could not be opened; the next allowed operation opens it first."""
        self._opened = False
        self._failed("open", exc, 0, self.breaker.clock())

    async def guarded(
        self, op: str, call: Callable[..., Awaitable[T]], *args: Any, count: int = 0
    ) -> T | None:
        """Await ``call(*args)`` unless the tier is unavailable; ``None`` on skip or failure.

        An outage (a kvtier error, such as ``BackendUnavailableError``, or the tier's
        timeout) opens the circuit breaker. Any other exception is a bug in the backend:
        logged with its traceback and, with :data:`STRICT`, re-raised; otherwise the
        tier is skipped like an outage. ``count`` is the number of chunks involved, for
        the failure event."""
        if not self.breaker.allow():
            self.stats.skipped += 1
            return None
        began = self.breaker.clock()
        start = time.perf_counter()
        try:
            if not self._opened:
                await asyncio.wait_for(self.backend.open(), self.config.timeout)
                self._opened = True
            result = await asyncio.wait_for(call(*args), self.config.timeout)
        except (KVTierError, asyncio.TimeoutError) as exc:
            self._failed(op, exc, count, began)
            return None
        except Exception as exc:
            self._failed(op, exc, count, began)
            if STRICT:
                raise
            return None
        seconds = time.perf_counter() - start
        self.stats.ops += 1
        self.stats.op_seconds += seconds
        self.stats.max_op_seconds = max(self.stats.max_op_seconds, seconds)
        if not self.breaker.closed:
            log.info("tier %s is available again", self.name)
        self.breaker.success()
        self.stats.available = True
        return result

    def encode_failed(self, exc: Exception, count: int) -> None:
        """Encoding for this tier failed: count and report it; the tier stays available."""
        self.stats.errors += 1
        log.error("tier %s: encoding %d chunks failed: %s", self.name, count, exc)
        self.emit(TierEvent(EventKind.FAILED, self.name, count, detail=f"encode failed: {exc}"))

    def _failed(self, op: str, exc: Exception, count: int, began: float) -> None:
        self.stats.errors += 1
        self.stats.available = False
        self.breaker.failure(began)
        if isinstance(exc, asyncio.TimeoutError):
            detail = f"{op} timed out after {self.config.timeout}s"
        elif isinstance(exc, KVTierError):
            detail = f"{op} failed: {exc}"
        else:
            log.error(
                "tier %s: bug in backend %s during %s (not an outage)",
                self.name,
                type(self.backend).__name__,
                op,
                exc_info=exc,
            )
            detail = f"{op} failed by a bug in the backend: {type(exc).__name__}: {exc}"
        log.warning("tier %s skipped for %.1fs: %s", self.name, self.breaker.delay, detail)
        self.emit(TierEvent(EventKind.FAILED, self.name, count, detail=detail))
