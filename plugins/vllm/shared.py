"""One :class:`KVTier` per config and model shard per process, and the workers'
``KVTier`` of each engine running in this process.

Only workers open a ``KVTier``. When vLLM runs the worker in the scheduler's process
(``VLLM_ENABLE_V1_MULTIPROCESSING=0``, tensor parallel size 1), the scheduler side
finds it here (:func:`workers`) and looks up in it directly; otherwise it asks the
workers' lookup servers (:mod:`kvtier.plugins.vllm.lookup`).
"""

from __future__ import annotations

import atexit
import threading
from dataclasses import dataclass

from kvtier.core.config import KVTierConfig
from kvtier.core.engine import KVTier
from kvtier.core.layout import KVLayout, ModelFingerprint


@dataclass
class _Entry:
    kv: KVTier
    users: int = 0


_lock = threading.Lock()
_open: dict[tuple[str, str], _Entry] = {}


def acquire(
    config: KVTierConfig, *, model: str, layout: KVLayout, tp_rank: int, tp_size: int
) -> KVTier:
    """The process's ``KVTier`` for ``config`` and this model shard, opened on first use."""
    fingerprint = ModelFingerprint(model, layout, tp_rank=tp_rank, tp_size=tp_size)
    key = (config.model_dump_json(), fingerprint.canonical())
    with _lock:
        entry = _open.get(key)
        if entry is None:
            kv = KVTier.open(config, model=model, layout=layout, tp_rank=tp_rank, tp_size=tp_size)
            entry = _open[key] = _Entry(kv)
        entry.users += 1
        return entry.kv


_workers: dict[str, dict[int, KVTier]] = {}


def add_worker(engine: str, tp_rank: int, kv: KVTier) -> None:
    """Rank ``tp_rank`` of engine ``engine`` runs in this process and uses ``kv``."""
    with _lock:
        _workers.setdefault(engine, {})[tp_rank] = kv


def remove_worker(engine: str, tp_rank: int) -> None:
    with _lock:
        ranks = _workers.get(engine, {})
        ranks.pop(tp_rank, None)
        if not ranks:
            _workers.pop(engine, None)


def workers(engine: str) -> dict[int, KVTier]:
    """The ``KVTier`` of each rank of engine ``engine`` that runs in this process."""
    with _lock:
        return dict(_workers.get(engine, {}))


def release(kv: KVTier) -> None:
    """Drop one use of ``kv``; the last one flushes queued stores and closes it."""
    with _lock:
        key = next((k for k, e in _open.items() if e.kv is kv), None)
        if key is None:
            return
        _open[key].users -= 1
        if _open[key].users:
            return
        del _open[key]
    kv.close()


@atexit.register
def _close_all() -> None:
    """At interpreter exit, flush and close what vLLM did not shut down."""
    with _lock:
        entries = list(_open.values())
        _open.clear()
    for entry in entries:
        entry.kv.close()
