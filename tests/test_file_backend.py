"""The ``file`` tier: layout, persistence across restarts and processes, cleanup,
capacity on disk, error translation, cancellation, parallel batches, CREATE, and an
event loop that never waits for the disk (alone and in a chain with a redis tier)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import multiprocessing
import os
import random
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

from kvtier.backends.file import TEMP_GRACE_S, FileBackend, chunkio
from kvtier.core import KVLayout, KVTier
from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import Buffer, address_of, default_pool
from kvtier.core.errors import BackendError, BackendUnavailableError, ConfigError
from kvtier.core.factory import build_backend
from kvtier.core.testing import BackendConformance

T = TypeVar("T")
KiB, MiB = 1 << 10, 1 << 20


def key(i: int, ns: str = "test") -> str:
    return f"{ns}.{i:032x}"


def data(i: int, nbytes: int) -> bytes:
    return random.Random(i).randbytes(nbytes)


def buf(payload: bytes) -> Buffer:
    return default_pool().copy_of(payload)


def run(scenario: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(scenario())


def make(url: str, capacity: int | None = 1 << 20, **options: Any) -> FileBackend:
    backend = build_backend(url, capacity=capacity, options=options)
    assert isinstance(backend, FileBackend)
    return backend


async def put(
    backend: FileBackend, items: dict[str, bytes], mode: PutMode = PutMode.OVERWRITE
) -> list[bool]:
    bufs = [buf(v) for v in items.values()]
    try:
        return await backend.put_many(list(zip(items, bufs, strict=True)), mode)
    finally:
        for b in bufs:
            b.release()


async def get(backend: FileBackend, keys: list[str]) -> list[bytes | None]:
    out = []
    for b in await backend.get_many(keys):
        out.append(None if b is None else bytes(b.view))
        if b is not None:
            b.release()
    return out


def disk_bytes(root: Path) -> int:
    """Bytes of the files under ``root``; a file renamed during the walk counts once."""
    sizes = {}
    for path in root.rglob("*"):
        try:
            st = path.stat()
        except FileNotFoundError:
            continue
        if path.is_file():
            sizes[st.st_dev, st.st_ino] = st.st_size
    return sum(sizes.values())


def paused(
    real: Callable[..., Any], when: Callable[[], bool] = lambda: True, count: int = 1
) -> tuple[Callable[..., Any], threading.Event, threading.Event]:
    """``real`` wrapped so that calls for which ``when()`` holds block until ``resume``
    is set, and ``started`` is set once ``count`` of them are blocked; returns
    ``(wrapper, started, resume)``."""
    started, resume = threading.Event(), threading.Event()
    entered = itertools.count(1)

    def wrapper(*args: Any) -> Any:
        if when():
            if next(entered) >= count:
                started.set()
            resume.wait(10)
        return real(*args)

    return wrapper, started, resume


def chunk_path(root: Path, k: str) -> Path:
    return root / k.rpartition(".")[2][:2] / k


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "kv"


@pytest.fixture
def url(root: Path) -> str:
    return f"file://{root}"


class TestFileConformance(BackendConformance):
    capacity = 128 << 20

    @pytest.fixture
    def backend_url(self, tmp_path: Path) -> str:
        return f"file://{tmp_path}/kv"

    def stop_server(self, url: str) -> None:
        """An outage: a file where the folder was, so it can be neither used nor made
        again. (A folder deleted is no outage: a write makes it again.)"""
        root = Path(url.removeprefix("file://"))
        shutil.rmtree(root)
        root.write_bytes(b"")

    def raw_write(self, backend: Backend, key: str, data: bytes) -> None:
        """A chunk file written with plain file I/O, as another writer would."""
        path = chunk_path(Path(backend.url.removeprefix("file://")), key)
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.parent / f".{key}.raw"
        temp.write_bytes(data)
        temp.rename(path)

    def raw_read(self, backend: Backend, key: str) -> bytes | None:
        """The bytes of ``key``'s chunk file, read with plain file I/O."""
        try:
            return chunk_path(Path(backend.url.removeprefix("file://")), key).read_bytes()
        except FileNotFoundError:
            return None


class TestFileDirectSyncConformance(TestFileConformance):
    options = {"o_direct": True, "fsync": True}


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["file://relative/kv", "file:relative/kv", "file:///tmp/kv?fsync=1", "file://host/kv"]
)
def test_bad_urls_explain_the_form(bad: str) -> None:
    with pytest.raises(ConfigError, match="file:///absolute/path"):
        make(bad)


def test_capacity_is_required(url: str) -> None:
    with pytest.raises(ConfigError, match="capacity"):
        make(url, capacity=None)


def test_unknown_options_and_policies_are_config_errors(url: str) -> None:
    with pytest.raises(ConfigError, match="o_direct"):
        make(url, o_drect=True)
    with pytest.raises(ConfigError, match="lru"):
        make(url, eviction="lruu")
    with pytest.raises(ConfigError, match="rescan_interval"):
        make(url, rescan_interval=-1)


def test_refused_o_direct_is_a_clear_error(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = os.open

    def no_direct(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_direct)
    with pytest.raises(ConfigError, match="o_direct: false"):
        run(make(url, o_direct=True).open)


# -- layout and persistence ------------------------------------------------------------


@pytest.mark.parametrize("o_direct", [False, True])
def test_one_file_per_chunk_in_shards(root: Path, url: str, o_direct: bool) -> None:
    items = {key(i): data(i, 5000 * i + 1) for i in range(1, 5)}
    unaligned = bytearray(data(9, 7001))  # not pool memory: O_DIRECT copies it first

    async def scenario() -> None:
        async with make(url, o_direct=o_direct) as backend:
            assert await put(backend, items) == [True] * 4
            wrapped = Buffer.wrap(memoryview(unaligned)[1:])
            assert await backend.put_many([(key(9), wrapped)]) == [True]
            items[key(9)] = bytes(unaligned[1:])
            assert await get(backend, list(items)) == list(items.values())

    run(scenario)
    for k, v in items.items():
        assert chunk_path(root, k).read_bytes() == v
    assert list((root / ".tmp").iterdir()) == []


def test_restart_keeps_keys_sizes_and_eviction_order(url: str) -> None:
    size = 100 * KiB
    first = {key(i): data(i, size) for i in range(4)}

    async def before() -> None:
        async with make(url, capacity=5 * size) as backend:
            await put(backend, first)
            for k in (0, 1, 0):  # LRU order now 2, 3, 1, 0
                await get(backend, [key(k)])

    async def after() -> list[tuple[str, int]]:
        evicted: list[tuple[str, int]] = []
        async with make(url, capacity=5 * size) as backend:
            backend.eviction_listener = evicted.extend
            stats = await backend.stats()
            assert (stats.keys, stats.bytes_used) == (4, 4 * size)
            assert sorted([k async for k in backend.iter_keys("test.")]) == sorted(first)
            assert await get(backend, [key(3)]) == [first[key(3)]]
            await put(backend, {key(i): data(i, size) for i in (4, 5, 6)})
            assert await backend.contains_many([key(0), key(3)]) == [True, True]
        return evicted

    run(before)
    assert run(after) == [(key(2), size), (key(1), size)]


@pytest.mark.parametrize(("policy", "victim"), [("lru", 0), ("lfu", 1)])
def test_eviction_policy_option(url: str, policy: str, victim: int) -> None:
    async def scenario() -> list[tuple[str, int]]:
        evicted: list[tuple[str, int]] = []
        async with make(url, capacity=2000, eviction=policy) as backend:
            backend.eviction_listener = evicted.extend
            await put(backend, {key(0): b"0" * 1000, key(1): b"1" * 1000})
            for k in (0, 0, 1):  # key 1 is the most recent, key 0 the most frequent
                await get(backend, [key(k)])
            await put(backend, {key(2): b"2" * 1000})
        return evicted

    assert run(scenario) == [(key(victim), 1000)]


def test_fsync_syncs_each_file_and_each_folder_once(
    root: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    async def scenario() -> None:
        async with make(url, fsync=True) as backend:
            monkeypatch.setattr(os, "fsync", record)
            await put(backend, {key(i): b"x" for i in range(3)})  # all in shard "00"

    run(scenario)
    temps = [p for p in synced if "/.tmp/" in p]
    assert len(temps) == 3
    assert sorted(p for p in synced if p not in temps) == [str(root), str(root / "00")]


def test_restart_with_a_smaller_capacity_trims_the_folder(root: Path, url: str) -> None:
    async def fill() -> None:  # one thread: the batch is written in order, oldest first
        async with make(url, capacity=1 << 20, threads=1) as backend:
            await put(backend, {key(i): data(i, 100 * KiB) for i in range(10)})

    async def reopen() -> list[tuple[str, int]]:
        evicted: list[tuple[str, int]] = []
        backend = make(url, capacity=300 * KiB)
        backend.eviction_listener = evicted.extend
        async with backend:
            assert (await backend.stats()).keys == 3
        return evicted

    run(fill)
    assert [k for k, _ in run(reopen)] == [key(i) for i in range(7)]
    assert disk_bytes(root) == 300 * KiB


# -- sharing a folder ------------------------------------------------------------------


def test_two_instances_see_writes_and_deletions(url: str) -> None:
    async def scenario() -> None:
        async with make(url) as a, make(url) as b:
            await put(a, {key(1): b"one", key(2): b"two"})
            assert await b.contains_many([key(2), key(3)]) == [True, False]
            assert await get(b, [key(1)]) == [b"one"]
            assert (await b.stats()).details["adopted"] == 2
            assert await put(b, {key(1): b"uno"}, PutMode.CREATE) == [False]

            assert await a.delete_many([key(1)]) == [True]
            assert await get(b, [key(1)]) == [None]
            stats = await b.stats()
            assert (stats.keys, stats.bytes_used, stats.details["vanished"]) == (1, 3, 1)

    run(scenario)


def _child_writes(url: str, keys: list[str]) -> None:
    async def scenario() -> None:
        async with make(url) as backend:
            assert await get(backend, [key(0)]) == [data(0, 300 * KiB)]
            assert all(await put(backend, {k: data(i, 200 * KiB) for i, k in enumerate(keys, 1)}))

    run(scenario)


def test_another_process_writes_and_this_one_reads(url: str) -> None:
    child_keys = [key(i, "child") for i in range(1, 4)]

    async def scenario() -> None:
        async with make(url) as backend:
            await put(backend, {key(0): data(0, 300 * KiB)})
            ctx = multiprocessing.get_context("spawn")
            proc = ctx.Process(target=_child_writes, args=(url, child_keys))
            proc.start()
            await asyncio.to_thread(proc.join, 60)
            assert proc.exitcode == 0
            want = [data(i, 200 * KiB) for i in range(1, 4)]
            assert await get(backend, child_keys) == want
            assert (await backend.stats()).keys == 4

    run(scenario)


RESCAN_S = 0.02
"""A short ``rescan_interval`` for tests; sleeping twice as long makes a rescan due."""


def test_rescans_hold_capacity_across_instances_sharing_a_folder(root: Path, url: str) -> None:
    size, capacity = 100 * KiB, 500 * KiB
    evicted: dict[str, list[tuple[str, int]]] = {"a": [], "b": []}

    async def scenario() -> None:
        options = {"capacity": capacity, "rescan_interval": RESCAN_S}
        async with make(url, **options) as a, make(url, **options) as b:
            writers = {"a": a, "b": b}
            for ns, backend in writers.items():
                backend.eviction_listener = evicted[ns].extend
            for i in range(20):  # a and b take turns, each writing its own keys
                ns = "ab"[i % 2]
                await asyncio.sleep(2 * RESCAN_S)
                assert await put(writers[ns], {key(i, ns): data(i, size)}) == [True]
                assert disk_bytes(root) <= capacity
            for ns, backend in writers.items():
                stats = await backend.stats()
                assert stats.details["rescans"] == 10  # one before each write
                assert stats.evictions == len(evicted[ns])
                other = "b" if ns == "a" else "a"
                assert any(k.startswith(f"{other}.") for k, _ in evicted[ns])

    run(scenario)
    survivors = {key(i, "ab"[i % 2]) for i in range(15, 20)}  # LRU over both writers
    assert {p.name for p in root.glob("??/*")} == survivors
    everyone = [k for ns in "ab" for k, _ in evicted[ns]]
    assert sorted(everyone) == sorted({key(i, "ab"[i % 2]) for i in range(20)} - survivors)


def test_a_rescan_forgets_chunks_other_instances_deleted(url: str) -> None:
    async def scenario() -> None:
        async with make(url, rescan_interval=RESCAN_S) as a, make(url) as b:
            await put(a, {key(i): b"x" * 1000 for i in range(3)})
            assert await b.delete_many([key(0), key(1)]) == [True, True]
            await asyncio.sleep(2 * RESCAN_S)
            await put(a, {key(9): b"y" * 10})
            stats = await a.stats()
            assert (stats.keys, stats.bytes_used) == (2, 1010)
            assert (stats.details["vanished"], stats.details["adopted"]) == (2, 0)

    run(scenario)


@pytest.mark.parametrize("interval", [0, 60])
def test_no_rescan_before_its_interval(root: Path, url: str, interval: float) -> None:
    async def scenario() -> None:
        options = {"capacity": 300 * KiB, "rescan_interval": interval}
        async with make(url, **options) as a, make(url, **options) as b:
            for i in range(6):
                await put(a if i % 2 else b, {key(i): data(i, 100 * KiB)})
            for backend in (a, b):
                stats = await backend.stats()
                assert (stats.details["rescans"], stats.bytes_used) == (0, 300 * KiB)

    run(scenario)
    assert disk_bytes(root) == 600 * KiB  # the documented excess: others' writes in between


def _child_fills(url: str, ns: str, turn: int, barrier: Any, results: Any) -> None:
    """Write 3x the capacity of ``ns`` keys racing a sibling; then, on ``turn``, once
    more after a rescan is due; put ``(ns, evicted keys, stats.evictions)`` on
    ``results``."""

    async def scenario() -> tuple[list[str], int]:
        evicted: list[tuple[str, int]] = []
        async with make(url, capacity=1 << 20, rescan_interval=RESCAN_S) as backend:
            backend.eviction_listener = evicted.extend
            barrier.wait(30)  # both indexes start empty
            for i in range(0, 30, 3):
                items = {key(j, ns): data(j, 100 * KiB) for j in range(i, i + 3)}
                assert all(await put(backend, items))
            for t in range(2):
                barrier.wait(30)
                if t == turn:
                    await asyncio.sleep(2 * RESCAN_S)
                    assert await put(backend, {key(99, ns): data(99, 100 * KiB)}) == [True]
            evictions = (await backend.stats()).evictions
        return [k for k, _ in evicted], evictions

    results.put((ns, *run(scenario)))


def test_processes_sharing_a_folder_stay_within_capacity(root: Path, url: str) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_child_fills, args=(url, ns, turn, barrier, results))
        for turn, ns in enumerate("ab")
    ]
    for proc in procs:
        proc.start()
    reports = {}
    for _ in procs:
        ns, evicted, evictions = results.get(timeout=120)
        assert len(evicted) == evictions
        reports[ns] = evicted
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    assert disk_bytes(root) <= 1 << 20  # without rescans: about 2 MiB, 1 MiB each
    written = {key(j, ns) for ns in "ab" for j in [*range(30), 99]}
    on_disk = {p.name for p in root.glob("??/*")}
    assert on_disk <= written
    assert written - on_disk <= set(reports["a"]) | set(reports["b"])  # all reported


# -- cleanup on open -------------------------------------------------------------------


def test_open_removes_only_stale_temp_files(root: Path, url: str) -> None:
    temps = root / ".tmp"
    temps.mkdir(parents=True)

    def temp(name: str, age_s: float | None) -> Path:
        path = temps / f"{name}.tmp"
        path.write_bytes(b"partial")
        if age_s is not None:
            os.utime(path, (time.time() - age_s,) * 2)
        return path

    dead = temp("99999999-0123456789abcdef", 60)
    ancient = temp("1-00000000000000aa", TEMP_GRACE_S + 60)
    fresh = temp("2-00000000000000bb", None)  # its writer may not hold the lock yet
    live = temp("3-00000000000000cc", 60)
    with open(live, "rb+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)

        async def scenario() -> int:
            async with make(url) as backend:
                return int((await backend.stats()).details["stale_temps_removed"])

        assert run(scenario) == 2
    assert (dead.exists(), ancient.exists(), fresh.exists(), live.exists()) == (
        False,
        False,
        True,
        True,
    )


def test_open_leaves_a_running_write_alone(
    root: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_pwrite, started, resume = paused(os.pwrite)

    async def scenario() -> None:
        async with make(url) as writer:
            monkeypatch.setattr(os, "pwrite", slow_pwrite)
            task = asyncio.ensure_future(put(writer, {key(1): b"payload"}))
            await asyncio.to_thread(started.wait, 10)
            (temp,) = (root / ".tmp").iterdir()
            os.utime(temp, (time.time() - 60,) * 2)  # looks abandoned but is locked
            async with make(url) as other:
                assert (await other.stats()).details["stale_temps_removed"] == 0
            resume.set()
            assert await task == [True]
            assert await get(writer, [key(1)]) == [b"payload"]

    run(scenario)


def test_create_loses_to_a_key_stored_while_it_was_writing(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_pwrite, started, resume = paused(
        os.pwrite,
        lambda: threading.current_thread() is not threading.main_thread() and not started.is_set(),
    )

    async def scenario() -> None:
        async with make(url) as a, make(url) as b:
            monkeypatch.setattr(os, "pwrite", slow_pwrite)
            task = asyncio.ensure_future(put(a, {key(1): b"from a"}, PutMode.CREATE))
            await asyncio.to_thread(started.wait, 10)
            assert await put(b, {key(1): b"from b"}) == [True]
            resume.set()
            assert await task == [False]
            assert await get(a, [key(1)]) == [b"from b"]

    run(scenario)


def test_foreign_files_are_counted_and_never_deleted(root: Path, url: str) -> None:
    misplaced = root / "ab" / key(0xCD)  # a valid key, but its shard is "00"
    foreign = [
        root / "README",
        root / "zz" / "x",
        root / "ab" / "notes.txt",
        misplaced,
        root / ".tmp" / "mine.txt",
    ]
    for path in foreign:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"not kvtier's")

    async def scenario() -> None:
        async with make(url, capacity=256 * KiB) as backend:
            stats = await backend.stats()
            assert (stats.keys, stats.details["foreign_files"]) == (0, 5)
            await put(backend, {key(i): data(i, 100 * KiB) for i in range(6)})  # evicts
            assert [k async for k in backend.iter_keys()] != []
            assert key(0xCD) not in [k async for k in backend.iter_keys()]

    run(scenario)
    assert all(path.read_bytes() == b"not kvtier's" for path in foreign)


# -- capacity --------------------------------------------------------------------------


@pytest.mark.parametrize("rescan_interval", [2.0, 1e-6])  # 1e-6: rescans race the writes
@pytest.mark.parametrize("o_direct", [False, True])
def test_disk_never_exceeds_capacity(
    root: Path, url: str, o_direct: bool, rescan_interval: float
) -> None:
    capacity = 1 << 20
    rng = random.Random(7)
    evicted: list[tuple[str, int]] = []

    async def writer(backend: FileBackend, start: int) -> None:
        for batch in range(start, start + 40, 4):
            items = {key(i): data(i, rng.randrange(1, 200 * KiB)) for i in range(batch, batch + 4)}
            assert all(await put(backend, items))
            # A folder walk racing the other writer is no atomic snapshot (it can see a
            # victim before its unlink and its replacement after), so check the
            # backend's accounting here and the disk itself once both writers are done.
            assert (await backend.stats()).bytes_used <= capacity

    async def scenario() -> None:
        options = {"o_direct": o_direct, "rescan_interval": rescan_interval}
        async with make(url, capacity=capacity, **options) as backend:
            backend.eviction_listener = evicted.extend
            await asyncio.gather(writer(backend, 0), writer(backend, 1000))
            assert await put(backend, {key(9999): b"x" * (capacity + 1)}) == [False]
            stats = await backend.stats()
            assert stats.bytes_used == disk_bytes(root) <= capacity
            assert stats.evictions == len(evicted) > 0
            assert stats.details["reserved_bytes"] == 0
            assert stats.keys + len(evicted) == 80
            assert stats.details["rescans"] > 0 or rescan_interval > 1

    run(scenario)


def test_a_chunk_deleted_while_read_is_returned_whole_and_stays_deleted(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_preadv, started, resume = paused(os.preadv)

    payload = data(1, 100 * KiB)

    async def scenario() -> None:
        async with make(url, threads=2) as backend:
            await put(backend, {key(1): payload})
            monkeypatch.setattr(os, "preadv", slow_preadv)
            reading = asyncio.ensure_future(get(backend, [key(1)]))
            await asyncio.to_thread(started.wait, 10)
            assert await backend.delete_many([key(1)]) == [True]
            resume.set()
            assert await reading == [payload]
            stats = await backend.stats()
            assert (stats.keys, stats.bytes_used) == (0, 0)

    run(scenario)


# -- a byte store: corrupt files are data, and deletable ---------------------------------


def test_truncated_or_replaced_files_are_returned_and_deletable(root: Path, url: str) -> None:
    async def scenario() -> None:
        async with make(url) as backend:
            await put(backend, {key(1): data(1, 10_000), key(2): data(2, 10_000)})
            os.truncate(chunk_path(root, key(1)), 4321)
            chunk_path(root, key(2)).write_bytes(b"garbage")
            assert await get(backend, [key(1), key(2)]) == [data(1, 10_000)[:4321], b"garbage"]
            assert await backend.delete_many([key(1), key(2), key(3)]) == [True, True, False]
            assert await backend.contains_many([key(1), key(2)]) == [False, False]
            assert (await backend.stats()).bytes_used == 0

    run(scenario)
    assert not chunk_path(root, key(1)).exists()
    assert not chunk_path(root, key(2)).exists()


# -- errors ----------------------------------------------------------------------------


def test_disk_full_rejects_the_item(root: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(*args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    async def scenario() -> None:
        async with make(url) as backend:
            monkeypatch.setattr(os, "pwrite", full)
            assert await put(backend, {key(1): b"x" * 5000}) == [False]
            stats = await backend.stats()
            assert (stats.keys, stats.bytes_used, stats.details["reserved_bytes"]) == (0, 0, 0)
            assert stats.details["rejected_no_space"] == 1

    run(scenario)
    assert list((root / ".tmp").iterdir()) == []


def test_os_errors_are_translated(root: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: Any) -> int:
        raise PermissionError(errno.EACCES, "Permission denied")

    async def scenario() -> None:
        backend = make(url)
        with pytest.raises(BackendUnavailableError, match="not open"):
            await backend.get_many([key(1)])
        await backend.open()
        with monkeypatch.context() as patch:
            patch.setattr(os, "pwrite", denied)
            with pytest.raises(BackendError, match="Permission denied") as info:
                await put(backend, {key(1): b"x"})
            assert not isinstance(info.value, BackendUnavailableError)
        shutil.rmtree(root)
        root.write_bytes(b"")  # the folder can be neither used nor made again
        with pytest.raises(BackendUnavailableError, match="not accessible"):
            await backend.get_many([key(1)])
        with pytest.raises(BackendUnavailableError, match="not accessible"):
            await put(backend, {key(1): b"x"})
        await backend.close()
        with pytest.raises(BackendUnavailableError, match="closed"):
            await backend.contains_many([key(1)])

    run(scenario)


def test_invalid_keys_never_become_paths(url: str) -> None:
    async def scenario() -> None:
        async with make(url) as backend:
            for bad in ("../../etc/passwd", "ns./0123456789abcdef0123456789abcdef", ".hidden"):
                with pytest.raises(ConfigError):
                    await backend.get_many([bad])

    run(scenario)


# -- cancellation ----------------------------------------------------------------------


@pytest.mark.parametrize(("threads", "started"), [(1, [0]), (2, [0, 2])])
def test_cancelled_put_leaves_keys_absent_or_complete(
    root: Path, url: str, monkeypatch: pytest.MonkeyPatch, threads: int, started: list[int]
) -> None:
    """A batch of 4 runs as ``threads`` groups, one item after another in each; after
    a cancel the items running finish, the others are skipped."""
    slow_pwrite, writing, resume = paused(os.pwrite, count=threads)

    items = {key(i): data(i, MiB) for i in range(4)}  # 1 MiB a thread at least

    async def scenario() -> None:
        async with make(url, capacity=64 * MiB, threads=threads) as backend:
            monkeypatch.setattr(os, "pwrite", slow_pwrite)
            bufs = [buf(v) for v in items.values()]
            task = asyncio.ensure_future(backend.put_many(list(zip(items, bufs, strict=True))))
            await asyncio.to_thread(writing.wait, 10)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            for b in bufs:
                b.release()  # the caller is done; the running write must not lose its bytes
            scratch = [default_pool().acquire(MiB) for _ in bufs]
            for b in scratch:  # reuses the callers' memory if the backend did not retain it
                b.view[:] = bytes(MiB)
                b.release()
            resume.set()
        assert all(b.refcount == 0 for b in bufs)

    run(scenario)
    for i, (k, v) in enumerate(items.items()):
        if i in started:
            assert chunk_path(root, k).read_bytes() == v
        else:
            assert not chunk_path(root, k).exists()
    assert list((root / ".tmp").iterdir()) == []


# -- ranged reads ----------------------------------------------------------------------


@pytest.mark.parametrize("o_direct", [False, True])
def test_ranged_reads_read_only_their_ranges(
    url: str, monkeypatch: pytest.MonkeyPatch, o_direct: bool
) -> None:
    """``read_into_many`` asks the disk for its ranges alone, straight into ``out``
    (opened without O_DIRECT, so unaligned ranges of an ``o_direct`` tier work)."""
    items = {key(i): data(i, 3 * MiB + i) for i in range(2)}
    asked: list[tuple[int, int]] = []  # (address of the first byte, bytes)
    real = os.preadv

    def preadv(fd: int, views: list[memoryview], offset: int) -> int:
        asked.extend((address_of(v), v.nbytes) for v in views)
        return real(fd, views, offset)

    async def scenario() -> None:
        async with make(url, capacity=64 * MiB, o_direct=o_direct) as backend:
            assert backend.capabilities.ranged_reads
            assert await put(backend, items) == [True, True]
            outs = [memoryview(bytearray(n)) for n in (4096, 1000, 333)]
            reads = [
                (key(0), 5, outs[0]),
                (key(1), MiB + 1, outs[1]),
                (key(0), 3 * MiB - 3, outs[2]),
            ]
            monkeypatch.setattr(os, "preadv", preadv)
            assert await backend.read_into_many(reads) == [4096, 1000, 3]
            monkeypatch.undo()
            for k, offset, out in reads:
                want = items[k][offset : offset + out.nbytes]
                assert out[: len(want)] == want
            assert sorted(asked) == sorted((address_of(out), out.nbytes) for out in outs)

    run(scenario)


def test_cancelled_ranged_reads_write_nothing_after_the_cancel(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancelled ``read_into_many`` raises only once its running reads are done, and
    starts no other: after it, nothing writes into the caller's memory."""
    threads = 2
    items = {key(i): data(i, MiB) for i in range(8)}
    slow_preadv, reading, resume = paused(os.preadv, count=threads)
    active = [0]
    real = os.preadv

    async def scenario() -> None:
        async with make(url, capacity=64 * MiB, threads=threads) as backend:
            assert await put(backend, items) == [True] * 8

            def preadv(*args: Any) -> int:
                active[0] += 1
                try:
                    return slow_preadv(*args)
                finally:
                    active[0] -= 1

            outs = [memoryview(bytearray(MiB)) for _ in items]
            monkeypatch.setattr(os, "preadv", preadv)
            reads = [(k, 0, out) for k, out in zip(items, outs, strict=True)]
            task = asyncio.ensure_future(backend.read_into_many(reads))
            await asyncio.to_thread(reading.wait, 10)
            task.cancel()
            done, _ = await asyncio.wait([task], timeout=0.1)
            assert not done, "the cancel returned while reads still wrote into out"
            resume.set()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert active[0] == 0
            monkeypatch.setattr(os, "preadv", real)
            filled = [bytes(out) == items[k] for k, out in zip(items, outs, strict=True)]
            assert filled.count(True) == threads, "reads started after the cancel"

    run(scenario)


# -- parallel batches ------------------------------------------------------------------


def test_threads_option(url: str) -> None:
    assert make(url).options.threads == 4
    with pytest.raises(ConfigError, match="threads"):
        make(url, threads=0)


def meeting(real: Callable[..., Any], parties: int) -> tuple[Callable[..., Any], set[str]]:
    """``real`` wrapped so that calls wait (up to 10 s) until ``parties`` of them are in
    at once, which fails unless they run in parallel; returns ``(wrapper, names of the
    threads that called it)``."""
    barrier = threading.Barrier(parties, timeout=10)
    names: set[str] = set()

    def wrapper(*args: Any) -> Any:
        names.add(threading.current_thread().name)
        barrier.wait()
        return real(*args)

    return wrapper, names


@pytest.mark.parametrize("o_direct", [False, True])
@pytest.mark.parametrize(
    ("threads", "size", "used"),
    [(1, MiB, 1), (4, MiB, 4), (4, MiB // 4, 2)],  # at least 1 MiB a thread
)
def test_a_batch_is_read_and_written_by_threads_in_parallel(
    url: str, monkeypatch: pytest.MonkeyPatch, threads: int, size: int, used: int, o_direct: bool
) -> None:
    items = {key(i): data(i, size + i) for i in range(8)}  # one pwrite/preadv each

    async def scenario() -> None:
        async with make(url, capacity=64 * MiB, threads=threads, o_direct=o_direct) as backend:
            with monkeypatch.context() as patch:
                pwrite, writers = meeting(os.pwrite, used)
                patch.setattr(os, "pwrite", pwrite)
                assert await put(backend, items) == [True] * 8
            with monkeypatch.context() as patch:
                preadv, readers = meeting(os.preadv, used)
                patch.setattr(os, "preadv", preadv)
                assert await get(backend, list(items)) == list(items.values())
            assert len(writers) == len(readers) == used

    run(scenario)


def test_parallel_writes_wait_for_room_instead_of_failing(
    root: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While 3 writes of 1.2 MiB hold their room (paused), a 4th needs more than the
    4 MiB capacity left: it waits for them, then evicts; none is refused."""
    size, capacity = 1200 * KiB, 4 * MiB
    items = {key(i): data(i, size) for i in range(8)}
    evicted: list[tuple[str, int]] = []
    slow_pwrite, writing, resume = paused(os.pwrite, count=3)

    async def scenario() -> None:
        async with make(url, capacity=capacity, threads=4) as backend:
            backend.eviction_listener = evicted.extend
            room = backend.index._room
            waiting = threading.Event()

            def wait_for_room(timeout: float | None = None) -> bool:
                waiting.set()
                return threading.Condition.wait(room, timeout)

            monkeypatch.setattr(room, "wait", wait_for_room)
            monkeypatch.setattr(os, "pwrite", slow_pwrite)
            task = asyncio.ensure_future(put(backend, items))
            assert await asyncio.to_thread(writing.wait, 10)
            assert await asyncio.to_thread(waiting.wait, 10)  # the 4th waits for room
            assert (await backend.stats()).details["reserved_bytes"] == 3 * size
            resume.set()
            assert await task == [True] * 8
            stats = await backend.stats()
            assert (stats.keys, stats.bytes_used, stats.evictions) == (3, 3 * size, 5)
            assert stats.details["reserved_bytes"] == 0

    run(scenario)
    on_disk = {p.name for p in root.glob("??/*")}
    assert len(on_disk) == 3 and disk_bytes(root) == 3 * size
    assert sorted(evicted) == sorted((k, size) for k in set(items) - on_disk)


# -- the event loop never blocks -------------------------------------------------------

OS_CALLS = (
    "open", "close", "stat", "lstat", "fstat", "pwrite", "preadv", "utime", "fsync",
    "replace", "link", "unlink", "scandir", "listdir", "makedirs", "access", "ftruncate",
)  # fmt: skip
"""The ``os`` functions the file tier calls."""


def on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def record_loop_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Wrap :data:`OS_CALLS`; returns the list of those called on an event loop thread."""
    on_loop: list[str] = []

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if on_event_loop():
                on_loop.append(name)
            return real(*args, **kwargs)

        return wrapper

    for name in OS_CALLS:
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    return on_loop


@pytest.mark.parametrize("fsync", [False, True])
def test_the_event_loop_makes_no_syscall(
    url: str, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    async def scenario() -> None:
        backend = make(url, capacity=300 * KiB, fsync=fsync, rescan_interval=1e-6)
        on_loop = record_loop_calls(monkeypatch)
        evicted: list[tuple[str, int]] = []
        backend.eviction_listener = evicted.extend
        async with backend:
            assert await put(backend, {key(i): data(i, 100 * KiB) for i in range(3)}) == [True] * 3
            assert await put(backend, {key(0): b"0"}, PutMode.CREATE) == [False]
            assert await put(backend, {key(5): data(5, 100 * KiB)}, PutMode.CREATE) == [True]
            assert await backend.contains_many([key(5), key(9)]) == [True, False]
            assert await backend.contains_many([key(5)]) == [True]  # known: from memory
            assert await get(backend, [key(5), key(9)]) == [data(5, 100 * KiB), None]
            out = memoryview(bytearray(10))
            assert await backend.read_into_many([(key(5), 7, out), (key(9), 0, out)]) == [10, None]
            assert len([k async for k in backend.iter_keys()]) == 3
            assert (await backend.stats()).keys == 3
            assert await backend.delete_many([key(5), key(9)]) == [True, False]
        assert on_loop == []
        assert len(evicted) == 1

    run(scenario)


def stall(
    monkeypatch: pytest.MonkeyPatch, name: str, needle: str
) -> tuple[threading.Event, threading.Event]:
    """Make ``os.<name>`` calls on a path (or descriptor) containing ``needle`` block (up
    to 10 s) until ``resume`` is set; returns ``(started, resume)``."""
    real = getattr(os, name)
    started, resume = threading.Event(), threading.Event()

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        paths = [str(arg) for arg in args]
        if args and isinstance(args[0], int):
            with contextlib.suppress(OSError):
                paths.append(os.readlink(f"/proc/self/fd/{args[0]}"))
        if any(needle in path for path in paths):
            started.set()
            resume.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(os, name, wrapper)
    return started, resume


@pytest.mark.parametrize("slow", ["replace", "unlink", "stat", "preadv"])
def test_a_slow_syscall_delays_nothing_else(
    url: str, monkeypatch: pytest.MonkeyPatch, slow: str
) -> None:
    """While a worker thread is stuck in a syscall on key 1's file (holding key 1's
    lock where it takes one), every other operation, on the loop or in the other
    threads, goes on."""
    one = key(1)
    stuck_in = {
        "replace": lambda b: put(b, {one: b"uno"}),  # rename of an OVERWRITE
        "unlink": lambda b: b.delete_many([one]),
        "stat": lambda b: put(b, {one: b"uno"}, PutMode.CREATE),  # a known key: probed
        "preadv": lambda b: get(b, [one]),
    }

    async def scenario() -> None:
        async with make(url, rescan_interval=0) as backend:
            await put(backend, {one: b"one", key(2): b"two", key(6): b"six"})
            started, resume = stall(monkeypatch, slow, one)
            task = asyncio.ensure_future(stuck_in[slow](backend))
            assert await asyncio.to_thread(started.wait, 10)
            begin = time.monotonic()
            others = asyncio.gather(
                backend.stats(),
                get(backend, [key(2), key(3)]),
                backend.contains_many([key(2), key(3)]),
                put(backend, {key(4): b"four"}),
                put(backend, {key(5): b"five"}, PutMode.CREATE),
                backend.delete_many([key(6)]),
                collect(backend.iter_keys()),
            )
            try:
                done = await asyncio.wait_for(others, 5)
                assert time.monotonic() - begin < 2.5 and not task.done()
            finally:
                resume.set()
            assert done[1:6] == [[b"two", None], [True, False], [True], [True], [True]]
            await task

    run(scenario)


async def collect(keys: Any) -> list[str]:
    return [k async for k in keys]


# -- CREATE ----------------------------------------------------------------------------


def count_calls(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Count the calls of :data:`OS_CALLS` (and ``renameat2``) from now on."""
    calls: Counter[str] = Counter()

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    for name in OS_CALLS:
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    real = chunkio._rename_noreplace
    monkeypatch.setattr(chunkio, "_rename_noreplace", wrap("renameat2", real))
    return calls


def test_create_costs_what_overwrite_costs(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """CREATE of a new key renames with RENAME_NOREPLACE instead of ``os.replace`` and
    looks nothing up first; of a key known present, it stats it and writes nothing."""

    async def scenario() -> None:
        async with make(url) as backend:
            await put(backend, {key(0): b"first in shard 00"})
            with monkeypatch.context() as patch:
                overwrite = count_calls(patch)
                assert await put(backend, {key(1): b"one"}) == [True]
            with monkeypatch.context() as patch:
                create = count_calls(patch)
                assert await put(backend, {key(2): b"two"}, PutMode.CREATE) == [True]
            with monkeypatch.context() as patch:
                present = count_calls(patch)
                assert await put(backend, {key(2): b"deux"}, PutMode.CREATE) == [False]
            assert await get(backend, [key(1), key(2)]) == [b"one", b"two"]
        assert overwrite - Counter(replace=1) == create - Counter(renameat2=1)
        assert create["renameat2"] == 1 and not create["stat"] + create["link"]
        assert present == Counter(stat=1)

    run(scenario)


def test_create_adopts_a_key_another_process_stored(url: str) -> None:
    async def scenario() -> None:
        async with make(url) as a, make(url) as b:
            await put(a, {key(1): b"from a"})
            assert await put(b, {key(1): b"from b"}, PutMode.CREATE) == [False]
            stats = await b.stats()
            assert (stats.keys, stats.bytes_used, stats.details["adopted"]) == (1, 6, 1)
            assert stats.details["reserved_bytes"] == 0
            assert await get(b, [key(1)]) == [b"from a"]

    run(scenario)
    assert list(Path(url.removeprefix("file://"), ".tmp").iterdir()) == []


def test_create_links_where_rename_noreplace_is_unsupported(
    root: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def unsupported(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
        raise OSError(errno.EINVAL, "Invalid argument", dst)

    monkeypatch.setattr(chunkio, "_rename_noreplace", unsupported)

    async def scenario() -> None:
        async with make(url, threads=1) as backend, make(url, threads=1) as other:
            await put(backend, {key(0): b"0"})  # makes shard 00
            calls = count_calls(monkeypatch)
            assert await put(backend, {key(1): b"1", key(2): b"2"}, PutMode.CREATE) == [True] * 2
            assert await put(backend, {key(1): b"uno"}, PutMode.CREATE) == [False]
            # unknown to the other instance: written, then the link fails
            assert await put(other, {key(2): b"dos"}, PutMode.CREATE) == [False]
            assert await get(backend, [key(1), key(2)]) == [b"1", b"2"]
            assert await get(other, [key(1), key(2)]) == [b"1", b"2"]
            assert calls["renameat2"] == 2  # once per backend: then it knows
            assert calls["link"] == 3

    run(scenario)
    assert list((root / ".tmp").iterdir()) == []


# -- in a tier chain with a redis tier -------------------------------------------------

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, dtype=torch.float16)
CHUNK = 16
HOLD_S = 2.0
"""How long the slow file tier's I/O hangs."""


def prompt(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (4 * CHUNK,), generator=gen)
    return tokens, torch.randn(LAYOUT.chunk_shape(4 * CHUNK), generator=gen).to(LAYOUT.dtype)


def telling(real: Callable[..., Any], called: threading.Event, done: threading.Event) -> Any:
    """Async method ``real`` wrapped to set ``called`` when called, ``done`` when done."""

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        called.set()
        result = await real(*args, **kwargs)
        done.set()
        return result

    return wrapper


def test_a_slow_file_tier_never_delays_the_redis_tier(
    tmp_path: Path, valkey_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While every syscall of the file tier's threads hangs (a disk that stopped
    answering) and a retrieve waits for the file tier, the redis tier in the same
    chain takes its writes and serves its reads at its own speed, and the event loop
    makes no file syscall."""
    gate, hanging = threading.Event(), threading.Event()
    asked, redis_wrote, ignored = threading.Event(), threading.Event(), threading.Event()
    gate.set()
    on_loop: list[str] = []

    def wrap(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if on_event_loop():
                on_loop.append(name)
            elif threading.current_thread() is not threading.main_thread() and not gate.is_set():
                hanging.set()
                gate.wait(10)
            return real(*args, **kwargs)

        return wrapper

    for name in OS_CALLS:
        monkeypatch.setattr(os, name, wrap(name, getattr(os, name)))
    config = {
        "chunk_tokens": CHUNK,
        "tiers": [
            {"url": valkey_server.url, "name": "redis", "timeout": 30},
            {"url": f"file://{tmp_path}/kv", "name": "file", "capacity": "64MiB", "timeout": 60},
        ],
    }
    with KVTier.open(config, model="slow-file", layout=LAYOUT) as kv, ThreadPoolExecutor(1) as bg:
        first, first_kv = prompt(1)
        kv.store(first, first_kv)
        kv.flush()
        assert [kv.stats().tier(t).stored for t in ("redis", "file")] == [4, 4]

        backends = {t.name: t.backend for t in kv.chain.tiers}
        put_many = backends["redis"].put_many
        monkeypatch.setattr(backends["redis"], "put_many", telling(put_many, ignored, redis_wrote))
        for method in ("contains_many", "get_many"):
            real = getattr(backends["file"], method)
            monkeypatch.setattr(backends["file"], method, telling(real, asked, ignored))
        gate.clear()
        try:
            closed = time.monotonic()
            second, second_kv = prompt(2)
            kv.store(second, second_kv)  # the file tier's write hangs
            assert hanging.wait(10), "the file tier's I/O never started"
            assert redis_wrote.wait(10), "the redis write waited for the file tier"
            asked.clear()
            nowhere = bg.submit(kv.retrieve, prompt(3)[0])  # in no tier: waits for the file tier
            assert asked.wait(10), "the retrieve never asked the file tier"

            start = time.monotonic()
            n, got = kv.retrieve(first)  # from redis
            assert time.monotonic() - start < HOLD_S / 4, "a redis read waited for the file tier"
            assert n == len(first) and torch.equal(got, first_kv)
            assert kv.lookup(second) == len(second)
            assert not gate.is_set() and not nowhere.done()  # the file tier still hangs

            time.sleep(max(0.0, HOLD_S - (time.monotonic() - closed)))
        finally:
            gate.set()
        assert nowhere.result(10)[0] == 0
        kv.flush()
        redis, file = kv.stats().tier("redis"), kv.stats().tier("file")
        assert file.stored == 8 and file.errors == redis.errors == 0
        assert file.max_op_seconds > 0.8 * HOLD_S
        assert redis.max_op_seconds < HOLD_S / 4, "a redis operation waited for the file tier"
    assert on_loop == []
