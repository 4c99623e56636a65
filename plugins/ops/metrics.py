"""Prometheus metrics of every open :class:`~kvtier.core.engine.KVTier` in this process.

Counters and gauges are copied from ``kv.stats()`` (the same numbers, never a second
count that could drift) by :meth:`KVTierMetrics.sync`, which runs at the start of
every collection of the registry (any scrape: ``kvtier serve``, ``start_http_server``,
``generate_latest``). Latency histograms are fed by the ``kvtier_tier_event`` hook (one
observation per batch).

All metrics are plain prometheus-client metrics, so they work in its multiprocess
mode: set ``PROMETHEUS_MULTIPROC_DIR`` before the processes start (vLLM's workers
inherit it); each process then also syncs every ``ops.metrics.sync_seconds`` from a
daemon thread, and any process that scrapes with :func:`scrape` (``kvtier serve``, or
vLLM's own ``/metrics``, which then uses a ``MultiProcessCollector``) sums them.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from kvtier.core.engine_stats import open_instances
from kvtier.core.specs import EventKind, TierEvent

if TYPE_CHECKING:
    from kvtier.core.engine import KVTier
    from kvtier.core.engine_stats import EngineStats

log = logging.getLogger(__name__)

TIER_COUNTERS: dict[str, tuple[str, str]] = {
    "hits": ("kvtier_tier_hits", "Chunks served by the tier."),
    "misses": ("kvtier_tier_misses", "Chunks asked of the tier and not found there."),
    "stored": ("kvtier_tier_stored", "Chunks written into the tier."),
    "bytes_in": ("kvtier_tier_written_bytes", "Encoded bytes written into the tier."),
    "bytes_out": ("kvtier_tier_read_bytes", "Encoded bytes read from the tier."),
    "evictions": ("kvtier_tier_evictions", "Chunks the tier evicted to make room."),
    "rejected": ("kvtier_tier_rejected", "Chunks offered and not written (present or full)."),
    "corrupt": ("kvtier_tier_corrupt", "Blobs that failed validation (and were deleted)."),
    "errors": ("kvtier_tier_errors", "Failed tier operations (outages, timeouts, bugs)."),
    "skipped": ("kvtier_tier_skipped", "Operations skipped while the tier was unavailable."),
}
"""``TierStats`` field -> counter name (without ``_total``, which the client adds)."""

ENGINE_COUNTERS: dict[str, tuple[str, str]] = {
    "lookups": ("kvtier_lookups", "Calls of lookup()."),
    "lookup_requested_tokens": ("kvtier_lookup_requested_tokens", "Tokens asked of lookup()."),
    "lookup_hit_tokens": ("kvtier_lookup_hit_tokens", "Tokens lookup() found."),
    "retrieves": ("kvtier_retrieves", "Calls of retrieve()."),
    "retrieve_requested_tokens": (
        "kvtier_retrieve_requested_tokens",
        "Tokens asked of retrieve().",
    ),
    "retrieve_hit_tokens": ("kvtier_retrieve_hit_tokens", "Tokens retrieve() returned KV for."),
    "tokens_stored": ("kvtier_stored_tokens", "Tokens accepted by store()."),
    "stores_queued": ("kvtier_store_queued_chunks", "Chunks queued for the tiers by store()."),
    "stores_dropped": ("kvtier_store_dropped_chunks", "Chunks dropped: the store queue was full."),
    "prefetched": (
        "kvtier_prefetched_chunks",
        "Chunks a lookup started prefetching toward faster tiers.",
    ),
    "prefetch_read_bytes": (
        "kvtier_prefetch_read_bytes",
        "Bytes prefetches read from slower tiers.",
    ),
    "prefetch_dropped": (
        "kvtier_prefetch_dropped_chunks",
        "Chunks not prefetched: prefetch_bytes was in flight already.",
    ),
    "prefetch_joined": (
        "kvtier_prefetch_joined_chunks",
        "Chunks a retrieve waited for instead of reading them again.",
    ),
}
"""``EngineStats`` field -> counter name; labels ``model`` and ``tenant``."""

LATENCY_BUCKETS = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
STATS_TIMEOUT = 5.0
"""Seconds a sync waits for one cache's stats (a cache closing meanwhile is skipped)."""
NO_TENANT = "none"
OTHER_TENANT = "other"


class KVTierMetrics:
    """The metrics, registered in ``registry``; tenants beyond ``max_tenants`` are
    labelled ``other``."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, *, max_tenants: int = 20) -> None:
        self.max_tenants = max_tenants
        self._tenants: set[str] = set()
        self._lock = threading.Lock()
        self._last: weakref.WeakKeyDictionary[KVTier, dict[tuple[str, ...], float]] = (
            weakref.WeakKeyDictionary()
        )
        registry.register(_SyncFirst(self))  # before the metrics: collected first
        self.tier_counters = {
            field: Counter(name, doc, ["tier"], registry=registry)
            for field, (name, doc) in TIER_COUNTERS.items()
        }
        self.engine_counters = {
            field: Counter(name, doc, ["model", "tenant"], registry=registry)
            for field, (name, doc) in ENGINE_COUNTERS.items()
        }
        self.get_seconds = Histogram(
            "kvtier_tier_get_seconds",
            "Wall time of one batch read from a tier.",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.put_seconds = Histogram(
            "kvtier_tier_put_seconds",
            "Wall time of one batch written to a tier.",
            ["tier"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.used_bytes = Gauge(
            "kvtier_tier_used_bytes",
            "Bytes held by a bounded tier.",
            ["tier"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.capacity_bytes = Gauge(
            "kvtier_tier_capacity_bytes",
            "Capacity of a bounded tier.",
            ["tier"],
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.available = Gauge(
            "kvtier_tier_available",
            "1 while the tier is in use, 0 while its circuit breaker skips it.",
            ["tier"],
            registry=registry,
            multiprocess_mode="livemin",
        )
        self.queue_bytes = Gauge(
            "kvtier_store_queue_bytes",
            "Bytes of stores waiting for the tiers.",
            registry=registry,
            multiprocess_mode="livesum",
        )
        self.prefetch_bytes = Gauge(
            "kvtier_prefetch_in_flight_bytes",
            "Bytes of prefetch_bytes held by prefetches in flight.",
            registry=registry,
            multiprocess_mode="livesum",
        )

    def tenant_label(self, tenant: str | None) -> str:
        """``tenant`` while fewer than ``max_tenants`` have a label, else ``other``."""
        with self._lock:
            return self._tenant_unlocked(tenant)

    def observe(self, event: TierEvent) -> None:
        """Record one batch's latency (``seconds`` is set on one event per batch)."""
        if event.seconds <= 0:
            return
        if event.kind in (EventKind.HIT, EventKind.MISS):
            self.get_seconds.labels(event.tier).observe(event.seconds)
        elif event.kind is EventKind.STORED:
            self.put_seconds.labels(event.tier).observe(event.seconds)

    def sync(self, instances: list[KVTier] | None = None) -> None:
        """Copy the counters of ``instances`` (default: every open ``KVTier``) into the
        metrics: each counter grows by what its source grew since the last sync."""
        with self._lock:
            used: dict[str, float] = {}
            capacity: dict[str, float] = {}
            available: dict[str, float] = {}
            queued = prefetching = 0.0
            for kv in open_instances() if instances is None else instances:
                try:
                    stats = kv.stats(STATS_TIMEOUT)
                except Exception:  # closed meanwhile
                    continue
                self._add(kv, stats)
                for tier in stats.tiers:
                    available[tier.name] = min(available.get(tier.name, 1.0), tier.available)
                for name, (nbytes, cap) in stats.usage.items():
                    used[name] = used.get(name, 0.0) + (nbytes or 0)
                    capacity[name] = capacity.get(name, 0.0) + (cap or 0)
                queued += stats.queue_bytes
                prefetching += stats.prefetch_in_flight_bytes
            for gauge, values in (
                (self.used_bytes, used),
                (self.capacity_bytes, capacity),
                (self.available, available),
            ):
                for name, value in values.items():
                    gauge.labels(name).set(value)
            self.queue_bytes.set(queued)
            self.prefetch_bytes.set(prefetching)

    def _add(self, kv: KVTier, stats: EngineStats) -> None:
        last = self._last.setdefault(kv, {})

        def grow(counter: Counter, key: tuple[str, ...], value: float) -> None:
            delta = value - last.get(key, 0.0)
            child = counter.labels(*key[1:])  # exported from the first sync on, at 0
            if delta > 0:
                child.inc(delta)
            last[key] = value

        for tier in stats.tiers:
            for field, counter in self.tier_counters.items():
                grow(counter, (field, tier.name), getattr(tier, field))
        labels = (kv.model, self._tenant_unlocked(kv.config.tenant))
        for field, counter in self.engine_counters.items():
            grow(counter, (field, *labels), getattr(stats, field))

    def _tenant_unlocked(self, tenant: str | None) -> str:
        if tenant is None:
            return NO_TENANT
        if tenant in self._tenants or len(self._tenants) < self.max_tenants:
            self._tenants.add(tenant)
            return tenant
        return OTHER_TENANT


class _SyncFirst:
    """A collector that exports nothing and syncs the metrics: registered before them,
    it runs first in every collection of the registry."""

    def __init__(self, target: KVTierMetrics) -> None:
        self._target = weakref.ref(target)

    def collect(self) -> list[Metric]:
        target = self._target()
        if target is not None:
            target.sync()
        return []

    def describe(self) -> list[Metric]:
        return []  # no names of its own (and no sync when registered)


_metrics: KVTierMetrics | None = None
_sync_thread: threading.Thread | None = None
_started = threading.Lock()


def metrics() -> KVTierMetrics:
    """The process's metrics on prometheus-client's default registry (made once)."""
    global _metrics
    with _started:
        if _metrics is None:
            _metrics = KVTierMetrics()
            if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
                # a process that exits drops its live gauges (used bytes, availability)
                # from the sums; one killed keeps them until the folder is wiped
                atexit.register(_exiting)
        return _metrics


def _exiting() -> None:
    """At exit, in multiprocess mode: drop this process's live gauges (by the pid at
    exit: a forked child drops its own, never its parent's)."""
    mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]


def start_sync(every: float) -> None:
    """In multiprocess mode, sync the process's metrics every ``every`` seconds from a
    daemon thread (started once): another process reads them from the shared folder."""
    global _sync_thread
    target = metrics()
    with _started:
        if _sync_thread is not None or not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            return

        def loop() -> None:
            while True:
                time.sleep(every)
                try:
                    target.sync()
                except Exception:
                    log.exception("syncing kvtier metrics failed")

        _sync_thread = threading.Thread(target=loop, name="kvtier-metrics", daemon=True)
        _sync_thread.start()


def scrape() -> bytes:
    """The Prometheus text exposition of this process's metrics (synced first), or of
    every process's under ``PROMETHEUS_MULTIPROC_DIR`` when it is set."""
    metrics()  # made (and so exported) even before any cache opened
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        metrics().sync()
        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)
