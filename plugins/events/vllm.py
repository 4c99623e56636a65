"""kvtier's KV events through vLLM 0.32's KV-connector event API.

vLLM collects a connector's events in two steps: each worker's connector returns them
from ``get_kv_connector_kv_cache_events()`` (a ``KVConnectorKVEvents`` carried to the
scheduler in ``KVConnectorOutput.kv_cache_events``, combined across workers), and the
scheduler's connector yields them from ``take_events()``; vLLM then publishes them with
its own blocks (``--kv-events-config``). A connector wires it up with::

    # worker side (the KVTier that stores, opened with an ``events:`` section,
    # ``publisher: none``)
    def get_kv_connector_kv_cache_events(self):
        return worker_events(self.kv)

    # scheduler side
    self.kv_events = SchedulerEvents(workers=tp_size * pp_size)    # in __init__
    def update_connector_output(self, connector_output):
        self.kv_events.update(connector_output)
    def take_events(self):
        return self.kv_events.take()

With tensor parallelism every rank stores its own shard of a chunk under the same block
hash; an event is passed on once ``workers`` ranks have reported it (in the same step
or not), so a router never hears of a chunk that some rank lacks.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from kvtier.core.errors import MissingExtraError

try:
    import msgspec
    from vllm.distributed import kv_events as vllm_events
except ImportError as exc:
    raise MissingExtraError("kvtier's vLLM KV events", "vllm", exc) from exc

if TYPE_CHECKING:
    from kvtier.core.engine import KVTier

MAX_WAITING = 100_000
"""Events seen from some ranks but not yet all that are kept (the oldest go first)."""


def to_vllm(event: Any) -> vllm_events.KVCacheEvent:
    """vLLM's own struct for one of kvtier's events (same class name, same fields)."""
    cls = getattr(vllm_events, type(event).__name__)
    return cls(**msgspec.structs.asdict(event))


class KVTierKVEvents(vllm_events.KVConnectorKVEvents):  # type: ignore[misc]
    """The events of one worker (or of several, once vLLM combined them)."""

    def __init__(self, num_workers: int = 1) -> None:
        self._aggregator = vllm_events.KVEventAggregator(num_workers)

    def add_events(self, events: list[vllm_events.KVCacheEvent]) -> None:
        self._aggregator.add_events(events)

    def aggregate(self) -> KVTierKVEvents:
        """Keep only the events every worker reported."""
        common = self._aggregator.get_common_events()
        self._aggregator.clear_events()
        self._aggregator.add_events(common)
        self._aggregator.reset_workers()
        return self

    def increment_workers(self, count: int = 1) -> None:
        self._aggregator.increment_workers(count)

    def get_all_events(self) -> list[vllm_events.KVCacheEvent]:
        return self._aggregator.get_all_events()  # type: ignore[no-any-return]

    def get_number_of_workers(self) -> int:
        return self._aggregator.get_number_of_workers()  # type: ignore[no-any-return]

    def clear_events(self) -> None:
        self._aggregator.clear_events()
        self._aggregator.reset_workers()

    def __repr__(self) -> str:
        return f"<KVTierKVEvents events={len(self.get_all_events())}>"


def worker_events(kv: KVTier) -> KVTierKVEvents | None:
    """For ``get_kv_connector_kv_cache_events()``: this worker's events since the last
    call, or ``None`` (no ``events:`` section, ``publisher: zmq`` (kvtier publishes
    them itself), or nothing new)."""
    if kv.events is None or kv.events.publisher is not None:
        return None  # no events, or kvtier's own publisher sends them
    events = kv.events.drain()
    if not events:
        return None
    out = KVTierKVEvents(num_workers=1)
    out.add_events([to_vllm(e) for e in events])
    return out


class SchedulerEvents:
    """The scheduler side: gathers the workers' events until ``workers`` ranks have
    reported each, for ``take_events()``."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.workers = workers
        self._waiting: Counter[vllm_events.KVCacheEvent] = Counter()
        self._ready: list[vllm_events.KVCacheEvent] = []

    def update(self, connector_output: Any) -> None:
        """For ``update_connector_output()``: take the events the workers sent."""
        events = getattr(connector_output, "kv_cache_events", None)
        if isinstance(events, KVTierKVEvents):
            self.add(events.get_all_events())

    def add(self, events: Iterable[vllm_events.KVCacheEvent]) -> None:
        for event in events:
            self._waiting[event] += 1
            if self._waiting[event] >= self.workers:
                del self._waiting[event]
                self._ready.append(event)
        while len(self._waiting) > MAX_WAITING:
            del self._waiting[next(iter(self._waiting))]

    def take(self) -> list[vllm_events.KVCacheEvent]:
        """For ``take_events()``: the events every rank has reported, oldest first."""
        ready, self._ready = self._ready, []
        return ready
