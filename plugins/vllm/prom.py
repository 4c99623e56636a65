"""The connector's counters in vLLM's Prometheus metrics (its ``/metrics``).

vLLM hands each step's connector stats to its stat loggers. Its log line (``KV Transfer
metrics: ...``) is written at debug level when the engine computed no token in the
interval and the one before (a load right after an idle spell), so counting loads from
the log loses some. Prometheus counters keep every one: ``vllm:kvtier_<counter>_total``
for each of :data:`~kvtier.plugins.vllm.worker.COUNTERS`, with vLLM's labels (model
name, engine).
"""

from __future__ import annotations

from typing import Any

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorPromMetrics
except ImportError as exc:  # pragma: no cover - depends on the environment
    from kvtier.core.errors import MissingExtraError

    raise MissingExtraError("kvtier's vLLM connector", "vllm") from exc

from kvtier.plugins.vllm.worker import COUNTERS


class KVTierPromMetrics(KVConnectorPromMetrics):  # type: ignore[misc]
    """One Prometheus counter per connector counter, per engine."""

    def __init__(self, *args: Any) -> None:
        """vLLM's arguments: its config, the metric classes, the label names and each
        engine's label values (see ``KVTierConnector.build_prom_metrics``)."""
        super().__init__(*args)
        self._counters: dict[tuple[str, int], Any] = {}
        for name, text in COUNTERS.items():
            counter = self._counter_cls(
                name=f"vllm:kvtier_{name}", documentation=text, labelnames=self._labelnames
            )
            for engine, values in self.per_engine_labelvalues.items():
                self._counters[name, engine] = counter.labels(*values)

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        for name, value in transfer_stats_data.items():
            counter = self._counters.get((name, engine_idx))
            if counter is not None and value:
                counter.inc(value)
