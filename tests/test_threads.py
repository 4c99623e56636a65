"""kvtier's threads run on the CPUs the config's ``thread_cpus`` names, whatever CPUs
the thread that opens the ``KVTier`` is bound to (:mod:`kvtier.core.threads`): engines
bind their main threads to one core, as vLLM's CPU backend does."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from kvtier.core import KVLayout, KVTier
from kvtier.core.blocking import BlockingPool
from kvtier.core.config import load_config
from kvtier.core.errors import ConfigError
from kvtier.core.threads import cpu_list, process_cpus

if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
    pytest.skip("needs Linux thread affinity and two CPUs", allow_module_level=True)

T = TypeVar("T")
ALL = frozenset(os.sched_getaffinity(0))
FIRST, LAST = min(ALL), max(ALL)
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16


def run_bound_to(cpus: set[int], work: Callable[[], T]) -> T:
    """``work()`` in a new thread bound to ``cpus`` (as vLLM binds its main thread)."""
    result: dict[str, Any] = {}

    def main() -> None:
        os.sched_setaffinity(0, cpus)
        try:
            result["value"] = work()
        except BaseException as exc:
            result["error"] = exc

    thread = threading.Thread(target=main)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def cpus_of_new_kvtier_threads(before: set[int]) -> dict[str, frozenset[int]]:
    return {
        t.name: frozenset(os.sched_getaffinity(t.native_id))
        for t in threading.enumerate()
        if t.name.startswith("kvtier") and t.native_id not in before and t.is_alive()
    }


def open_use_and_inspect(tmp_path: Path, **top: Any) -> tuple[dict[str, frozenset[int]], set[int]]:
    """Open a KVTier (cpu and file tiers) from a thread bound to the first CPU, store and
    retrieve through it; the CPUs of the kvtier threads that started, and the opener's
    CPUs after it closed the KVTier."""
    before = {t.native_id for t in threading.enumerate() if t.native_id is not None}
    config = {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": "cpu://", "capacity": "64MiB"},
            {"url": f"file://{tmp_path}/kv", "capacity": "64MiB"},
        ],
        **top,
    }
    tokens = torch.arange(4 * CHUNK)
    kv = torch.randn(LAYOUT.chunk_shape(4 * CHUNK)).to(LAYOUT.dtype)

    def work() -> tuple[dict[str, frozenset[int]], set[int]]:
        with KVTier.open(config, model="m", layout=LAYOUT) as cache:
            cache.store(tokens, kv)
            cache.flush()
            assert cache.retrieve(tokens)[0] == 4 * CHUNK
            threads = cpus_of_new_kvtier_threads(before)
        return threads, os.sched_getaffinity(0)

    return run_bound_to({FIRST}, work)


def test_by_default_kvtiers_threads_run_on_every_cpu_of_the_process(tmp_path: Path) -> None:
    threads, opener = open_use_and_inspect(tmp_path)
    names = {name.rsplit("_", 1)[0] for name in threads}
    assert {"kvtier-io", "kvtier-codec", "kvtier-FileBackend"} <= names, threads
    assert set(threads.values()) == {ALL}, threads
    assert opener == {FIRST}, "the opening thread is bound back to its own CPUs"


def test_inherit_keeps_the_cpus_of_the_opening_thread(tmp_path: Path) -> None:
    threads, _ = open_use_and_inspect(tmp_path, thread_cpus="inherit")
    assert threads and set(threads.values()) == {frozenset({FIRST})}, threads


def test_a_cpu_list_binds_every_kvtier_thread_to_it(tmp_path: Path) -> None:
    threads, opener = open_use_and_inspect(tmp_path, thread_cpus=str(LAST))
    assert threads and set(threads.values()) == {frozenset({LAST})}, threads
    assert opener == {FIRST}


def test_cpus_the_process_may_not_use_are_a_config_error(tmp_path: Path) -> None:
    before = {t.native_id for t in threading.enumerate() if t.native_id is not None}
    absent = max(ALL) + 1000
    config = {"tiers": [{"url": "cpu://", "capacity": "64MiB"}], "thread_cpus": [absent]}
    with pytest.raises(ConfigError) as caught:
        KVTier.open(config, model="m", layout=LAYOUT)
    assert f"thread_cpus [{absent}]" in str(caught.value)
    assert f"may only run on CPUs {cpu_list(ALL)}" in str(caught.value)
    assert cpus_of_new_kvtier_threads(before) == {}, "nothing started"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("process", "process"),
        ("inherit", "inherit"),
        ([3, 1, 3], [1, 3]),
        ("0-3,8", [0, 1, 2, 3, 8]),
    ],
)
def test_thread_cpus_config_values(value: Any, expected: Any) -> None:
    config = load_config({"tiers": [{"url": "cpu://"}], "thread_cpus": value})
    assert config.thread_cpus == expected


@pytest.mark.parametrize("value", [[], [-1], [0, "x"], True, "all", "0-", "1,,2"])
def test_bad_thread_cpus_name_what_is_accepted(value: Any) -> None:
    with pytest.raises(ConfigError, match="thread_cpus must be 'process', 'inherit', or CPU"):
        load_config({"tiers": [{"url": "cpu://"}], "thread_cpus": value})


def test_cpu_lists_are_written_as_linux_writes_them() -> None:
    assert cpu_list([8, 0, 1, 2, 3]) == "0-3,8"
    assert cpu_list([5]) == "5"


def test_the_process_cpus_are_not_narrowed_by_a_bound_main_thread() -> None:
    code = (
        f"import os; os.sched_setaffinity(0, {{{FIRST}}}); "
        "from kvtier.core.threads import cpu_list, process_cpus; print(cpu_list(process_cpus()))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == cpu_list(ALL)
    assert process_cpus() == ALL


def test_a_blocking_pools_threads_run_on_the_cpus_of_the_thread_that_made_it() -> None:
    pool = run_bound_to({LAST}, lambda: BlockingPool("test", 1, name="kvtier-test"))
    try:
        # started by this thread's call, bound to every CPU
        assert pool.submit(lambda: os.sched_getaffinity(0)).result() == {LAST}
    finally:
        asyncio.run(pool.shutdown())
