"""One :class:`KVTier` per config and model shard per process.

vLLM runs the scheduler-side and the worker-side connector in one process when the
engine has one worker (tensor parallel size 1): they share one ``KVTier``, so the
chunks a ``cpu://`` tier holds for the worker are the ones the scheduler looks up.
Across processes, tiers that are shared by nature (``file``, Redis, S3, ...) connect
them.
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
