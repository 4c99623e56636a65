"""The ``file`` tier among hostile or vanishing entries: FIFOs, links, sockets and
folders planted under its names, shard and temp folders replaced by links, the tier
folder deleted or replaced while it runs, and read-only opens that change nothing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import stat
import time
from collections import Counter
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest
import test_file_backend
import torch
from test_file_backend import (
    CHUNK,
    KiB,
    chunk_path,
    collect,
    count_calls,
    data,
    get,
    key,
    make,
    prompt,
    put,
    run,
)
from test_file_backend import LAYOUT as FILE_LAYOUT

from kvtier.backends.file import TEMP_GRACE_S, FileBackend
from kvtier.core import KVTier
from kvtier.core.backend import PutMode
from kvtier.core.errors import BackendUnavailableError, ConfigError

T = TypeVar("T")
root, url = test_file_backend.root, test_file_backend.url  # the fixtures, shared
HANG_S = 10.0
"""How long an operation may take before the test calls it hung: far more than any
of them needs, even on a loaded machine."""


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A folder outside the tier's, which links planted in the tier point to."""
    folder = tmp_path / "outside"
    folder.mkdir()
    return folder


def release(fifo: Path) -> None:
    """Let a thread blocked opening ``fifo`` for reading go (a no-op if none is, or the
    FIFO is gone)."""
    with contextlib.suppress(OSError):
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


async def within(call: Awaitable[T], what: str, *fifos: Path) -> T:
    """``await call``, failing the test if it takes :data:`HANG_S`; the threads blocked
    in ``fifos`` are released first, so that the backend can still close."""
    try:
        return await asyncio.wait_for(call, HANG_S)
    except asyncio.TimeoutError:
        for fifo in fifos:
            release(fifo)
        pytest.fail(f"{what} hung on a FIFO")


def plant_fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def is_fifo(path: Path) -> bool:
    try:
        return stat.S_ISFIFO(path.lstat().st_mode)
    except FileNotFoundError:
        return False


def tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every entry under ``root``: ``(mode, size, mtime, ctime)`` by relative path.
    (Access times are left out: the kernel updates them on reads.)"""
    entries = {}
    for path in [root, *root.rglob("*")]:
        st = path.lstat()
        entries[str(path.relative_to(root))] = (
            st.st_mode,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
    return entries


# -- item 9: entries planted in the folder ----------------------------------------------


@pytest.mark.parametrize("o_direct", [False, True])
def test_a_fifo_under_a_chunk_name_is_a_miss_and_removed(
    root: Path, url: str, o_direct: bool
) -> None:
    """Opening a FIFO for reading waits for a writer: the tier opens chunk files
    non-blocking, so a FIFO is a miss at once (and close() does not wait on a thread
    stuck in open()). It is removed, and the key can be stored again."""
    fifo = plant_fifo(chunk_path(root, key(1)))

    async def scenario() -> None:
        async with make(url, o_direct=o_direct) as backend:
            got = await within(get(backend, [key(1), key(2)]), "get_many", fifo)
            assert got == [None, None]
            assert not is_fifo(fifo)
            assert (await backend.stats()).details["odd_entries_removed"] == 1
            assert await put(backend, {key(1): b"one"}, PutMode.CREATE) == [True]
            assert await get(backend, [key(1)]) == [b"one"]

    run(scenario)


def test_close_never_waits_on_planted_fifos(root: Path, url: str) -> None:
    """FIFOs where a chunk, a shard folder, ``.tmp`` and a temp file belong: every
    operation and close() finish; each FIFO is removed when the tier meets it."""
    two, far = key(0x01 << 120), key(0xAB << 120)  # in shards "01" and "ab"
    fifos = [
        plant_fifo(chunk_path(root, key(1))),
        plant_fifo(root / "01"),
        plant_fifo(chunk_path(root, far)),
    ]
    old = time.time() - 2 * TEMP_GRACE_S

    async def scenario() -> None:
        (root / ".tmp").mkdir()
        temp = plant_fifo(root / ".tmp" / "1-00000000000000aa.tmp")
        os.utime(temp, (old, old), follow_symlinks=False)
        backend = make(url, rescan_interval=1e-6)  # every write rescans
        await within(backend.open(), "open", *fifos)
        try:
            assert not temp.exists()  # a temp name, but no writer's file
            ops = [
                get(backend, [key(1), two, far]),
                backend.contains_many([key(1), two, far]),
                collect(backend.iter_keys()),
                put(backend, {two: b"two"}),
                put(backend, {key(1): b"one"}, PutMode.CREATE),
                get(backend, [key(1), two]),
            ]
            results = [await within(op, "an operation", *fifos) for op in ops]
            assert results[:3] == [[None] * 3, [False] * 3, []]
            assert results[3:] == [[True], [True], [b"one", b"two"]]
            assert (root / "01").is_dir() and not (root / "01").is_symlink()
        finally:
            await within(backend.close(), "close", *fifos)
        assert not any(is_fifo(fifo) for fifo in fifos)

    run(scenario)


def test_a_symlinked_shard_folder_is_never_followed(root: Path, url: str, outside: Path) -> None:
    """A shard folder replaced by a link to a folder outside the tier's: nothing there
    is read, found, deleted or written; a write puts a real shard folder in place."""
    (root / "00").parent.mkdir(parents=True)
    (root / "00").symlink_to(outside, target_is_directory=True)
    for i in (2, 3):
        (outside / key(i)).write_bytes(b"not the tier's")

    async def scenario() -> None:
        async with make(url) as backend:
            assert await get(backend, [key(2)]) == [None]
            assert await backend.contains_many([key(2)]) == [False]
            assert await backend.delete_many([key(3)]) == [False]
            assert await collect(backend.iter_keys()) == []
            assert await put(backend, {key(1): b"one"}) == [True]
            assert await put(backend, {key(4): b"four"}, PutMode.CREATE) == [True]
            assert await get(backend, [key(1), key(4)]) == [b"one", b"four"]

    run(scenario)
    assert sorted(p.name for p in outside.iterdir()) == [key(2), key(3)]
    assert all(p.read_bytes() == b"not the tier's" for p in outside.iterdir())
    shard = root / "00"
    assert shard.is_dir() and not shard.is_symlink()
    assert sorted(p.name for p in shard.iterdir()) == [key(1), key(4)]


def test_a_symlinked_temp_folder_is_never_followed(root: Path, url: str, outside: Path) -> None:
    """``.tmp`` replaced by a link: no temp file is written or removed through it."""
    root.mkdir()
    (root / ".tmp").symlink_to(outside, target_is_directory=True)
    stale = outside / "1-00000000000000aa.tmp"  # named and aged like a dead writer's
    stale.write_bytes(b"not the tier's")
    os.utime(stale, (time.time() - 2 * TEMP_GRACE_S,) * 2)

    async def scenario() -> None:
        async with make(url) as backend:
            assert await put(backend, {key(1): b"one"}) == [True]
            assert await get(backend, [key(1)]) == [b"one"]

    run(scenario)
    assert [p.name for p in outside.iterdir()] == [stale.name]
    assert (root / ".tmp").is_dir() and not (root / ".tmp").is_symlink()


def test_a_link_under_a_chunk_name_is_a_miss_removed(root: Path, url: str, outside: Path) -> None:
    """A link where a chunk belongs is never read through, and is removed (not its
    target): a ``CREATE`` can then store the key."""
    target = outside / "secret"
    target.write_bytes(b"not the tier's")
    link = chunk_path(root, key(1))
    link.parent.mkdir(parents=True)
    link.symlink_to(target)
    link2 = chunk_path(root, key(2))
    link2.symlink_to(target)

    async def scenario() -> None:
        async with make(url) as backend:
            assert await get(backend, [key(1)]) == [None]
            assert not link.is_symlink()
            assert await backend.contains_many([key(2)]) == [False]
            assert not link2.is_symlink()
            link.symlink_to(target)
            assert await put(backend, {key(1): b"one"}, PutMode.CREATE) == [True]
            assert await get(backend, [key(1)]) == [b"one"]

    run(scenario)
    assert target.read_bytes() == b"not the tier's"
    assert chunk_path(root, key(1)).read_bytes() == b"one"


def test_a_folder_under_a_chunk_name_is_a_miss_left_alone(root: Path, url: str) -> None:
    """A folder where a chunk belongs may hold anything: it is a miss and kept, and a
    write of its key is refused (``False``), never an error."""
    folder = chunk_path(root, key(1))
    (folder / "inside").mkdir(parents=True)

    async def scenario() -> None:
        async with make(url) as backend:
            assert await get(backend, [key(1)]) == [None]
            assert await backend.contains_many([key(1)]) == [False]
            assert await put(backend, {key(1): b"one"}) == [False]
            assert await put(backend, {key(1): b"one"}, PutMode.CREATE) == [False]
            assert await backend.delete_many([key(1)]) == [False]
            stats = await backend.stats()
            assert (stats.keys, stats.bytes_used, stats.details["reserved_bytes"]) == (0, 0, 0)

    run(scenario)
    assert (folder / "inside").is_dir()
    assert list((root / ".tmp").iterdir()) == []


# -- item 10: the tier folder deleted or replaced while running -------------------------


def test_a_deleted_folder_is_made_again_by_the_next_write(root: Path, url: str) -> None:
    async def scenario() -> None:
        async with make(url) as backend:
            await put(backend, {key(1): b"one", key(2): b"two"})
            shutil.rmtree(root)
            assert await get(backend, [key(1)]) == [None]  # a miss, not an outage
            assert await backend.contains_many([key(1), key(2)]) == [False, False]
            assert await backend.delete_many([key(2)]) == [False]
            assert await collect(backend.iter_keys()) == []
            stats = await backend.stats()
            assert (stats.keys, stats.bytes_used) == (0, 0)
            assert await put(backend, {key(3): b"three"}) == [True]
            assert await put(backend, {key(4): b"four"}, PutMode.CREATE) == [True]
            assert await get(backend, [key(3), key(4)]) == [b"three", b"four"]
            stats = await backend.stats()
            assert (stats.keys, stats.bytes_used) == (2, 9)

    run(scenario)
    assert chunk_path(root, key(3)).read_bytes() == b"three"
    assert list((root / ".tmp").iterdir()) == []


def test_emptied_folders_are_made_again_by_the_next_write(root: Path, url: str) -> None:
    """``rm -rf <root>/*``: the shard folders and ``.tmp`` go, the root stays."""

    async def scenario() -> None:
        async with make(url) as backend:
            await put(backend, {key(1): b"one"})
            for path in root.iterdir():
                shutil.rmtree(path)
            assert await put(backend, {key(2): b"two"}) == [True]
            assert await get(backend, [key(1), key(2)]) == [None, b"two"]
            stats = await backend.stats()
            assert (stats.keys, stats.bytes_used) == (1, 3)

    run(scenario)


def test_a_folder_made_again_by_another_process_is_followed(root: Path, url: str) -> None:
    """``b`` writes after the folder was deleted and so makes a new one; ``a`` reads
    from the new folder at once, and rescans it."""

    async def scenario() -> None:
        async with make(url, rescan_interval=0) as a, make(url, rescan_interval=0) as b:
            await put(a, {key(1): b"one"})
            shutil.rmtree(root)
            assert await put(b, {key(2): b"two"}) == [True]
            assert await get(a, [key(2), key(1)]) == [b"two", None]
            assert await a.contains_many([key(1), key(2)]) == [False, True]
            assert await put(a, {key(3): b"three"}) == [True]
            assert await get(b, [key(3)]) == [b"three"]
            stats = await a.stats()
            assert (stats.keys, stats.bytes_used) == (2, 8)

    run(scenario)


def test_a_chain_keeps_a_deleted_file_tier(tmp_path: Path) -> None:
    """In a ``KVTier``, deleting the file tier's folder costs misses, never an outage:
    the tier is not skipped and stores again at once. A file where the folder was is
    an outage."""
    folder = tmp_path / "kv"
    config = {
        "chunk_tokens": CHUNK,
        "tiers": [{"url": f"file://{folder}", "name": "file", "capacity": "64MiB"}],
    }
    tokens, kv = prompt(1)
    with KVTier.open(config, model="deleted", layout=FILE_LAYOUT) as cache:
        cache.store(tokens, kv)
        cache.flush()
        shutil.rmtree(folder)
        assert cache.lookup(tokens) == 0
        assert cache.retrieve(tokens)[0] == 0
        cache.store(tokens, kv)
        cache.flush()
        n, got = cache.retrieve(tokens)
        assert n == len(tokens) and torch.equal(got, kv)
        stats = cache.stats().tier("file")
        assert (stats.errors, stats.skipped, stats.available) == (0, 0, True)
        assert stats.stored == 2 * len(tokens) // CHUNK

        shutil.rmtree(folder)
        folder.write_bytes(b"")  # a real outage
        assert cache.retrieve(tokens)[0] == 0
        assert cache.stats().tier("file").available is False


# -- item 7: read-only opens ------------------------------------------------------------


def test_read_only_refuses_a_missing_folder_and_makes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "typo" / "kv"
    backend = make(f"file://{root}", read_only=True)
    with pytest.raises(ConfigError, match=f"folder {root} does not exist") as info:
        run(backend.open)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "typo").exists()
    file = tmp_path / "file"
    file.write_bytes(b"")
    with pytest.raises(ConfigError, match="not a folder"):
        run(make(f"file://{file}", read_only=True).open)


def test_read_only_makes_no_temp_folder(root: Path, url: str) -> None:
    root.mkdir()

    async def scenario() -> None:
        async with make(url, read_only=True, o_direct=True) as backend:
            assert await get(backend, [key(1)]) == [None]
            assert (await backend.stats()).details["read_only"] is True

    run(scenario)
    assert list(root.iterdir()) == []


def test_read_only_reads_and_changes_nothing(root: Path, url: str) -> None:
    """Over a folder holding more than its capacity, a stale temp file and a FIFO under
    a chunk name, a read-only tier reads every chunk and changes no entry: no trim, no
    cleanup, no access times set; writes and deletes are refused."""
    items = {key(i): data(i, 10 * KiB) for i in range(3)}

    async def fill() -> None:
        async with make(url) as backend:
            assert all(await put(backend, items))

    run(fill)
    stale = root / ".tmp" / "1-00000000000000aa.tmp"
    stale.write_bytes(b"partial")
    os.utime(stale, (time.time() - 2 * TEMP_GRACE_S,) * 2)
    fifo = plant_fifo(chunk_path(root, key(7)))
    before = tree(root)

    async def inspect() -> None:
        async with make(url, capacity=15 * KiB, read_only=True) as backend:
            assert isinstance(backend, FileBackend)
            got = await within(get(backend, [*items, key(7)]), "get_many", fifo)
            assert got == [*items.values(), None]
            assert await backend.contains_many([*items, key(7)]) == [True] * 3 + [False]
            assert sorted(await collect(backend.iter_keys())) == sorted(items)
            stats = await backend.stats()
            assert (stats.keys, stats.bytes_used, stats.evictions) == (3, 30 * KiB, 0)
            with pytest.raises(ConfigError, match="read-only"):
                await put(backend, {key(9): b"nine"})
            with pytest.raises(ConfigError, match="read-only"):
                await backend.delete_many([key(0)])

    run(inspect)
    assert tree(root) == before
    assert is_fifo(fifo)


def test_read_only_sees_a_deleted_folder_as_empty(root: Path, url: str) -> None:
    async def scenario() -> None:
        async with make(url) as writer:
            await put(writer, {key(1): b"one"})
        async with make(url, read_only=True) as backend:
            shutil.rmtree(root)
            assert await get(backend, [key(1)]) == [None]
            assert await backend.contains_many([key(1)]) == [False]
            assert (await backend.stats()).keys == 0

    run(scenario)
    assert not root.exists()


def test_a_real_outage_is_still_an_outage(root: Path, url: str) -> None:
    """Where a file replaced the folder it can be neither read nor made again."""

    async def scenario() -> None:
        async with make(url) as backend:
            await put(backend, {key(1): b"one"})
            shutil.rmtree(root)
            root.write_bytes(b"")
            for call in (
                lambda: backend.get_many([key(1)]),
                lambda: put(backend, {key(1): b"one"}),
                lambda: backend.contains_many([key(1)]),
                lambda: backend.delete_many([key(1)]),
            ):
                with pytest.raises(BackendUnavailableError, match="not accessible"):
                    await call()

    run(scenario)


def test_a_reader_follows_folders_another_writer_made_again(root: Path, url: str) -> None:
    """``rm -rf <root>/*`` while a reader that never writes keeps descriptors of the
    old shard folders: the keys a writer stores afterwards are found at once."""

    async def scenario() -> None:
        async with make(url) as writer, make(url, read_only=True) as reader:
            await put(writer, {key(1): b"one"})
            assert await get(reader, [key(1)]) == [b"one"]  # opens shard 00
            for path in root.iterdir():
                shutil.rmtree(path)
            await put(writer, {key(2): b"two"})
            assert await reader.contains_many([key(2)]) == [True]
            assert await get(reader, [key(2), key(1)]) == [b"two", None]
            assert (await reader.stats()).keys == 1

    run(scenario)


def test_a_settled_folder_is_checked_with_one_stat(
    root: Path, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Misses check that the folder is still the tier's with one ``stat`` of the root
    while its entries keep the mtime last checked; once it changes (a shard folder
    deleted and made again by another writer), every kept descriptor is checked."""

    def age(seconds: float) -> None:  # as if the root's entries last changed then
        os.utime(root, (time.time() - seconds,) * 2)

    async def scenario() -> None:
        async with make(url) as writer, make(url, read_only=True) as reader:
            await put(writer, {key(1): b"one"})
            assert await get(reader, [key(1)]) == [b"one"]  # opens shard 00
            age(60)
            assert await reader.contains_many([key(2)]) == [False]  # checks all once
            with monkeypatch.context() as patch:
                calls = count_calls(patch)
                assert await reader.contains_many([key(3), key(4)]) == [False, False]
                assert await get(reader, [key(3)]) == [None]
            assert calls == Counter(stat=4, open=1)  # probes, a read, one check each
            shutil.rmtree(root / "00")
            await put(writer, {key(2): b"two"})
            age(30)
            assert await reader.contains_many([key(0x01 << 120)]) == [False]  # shard 01
            assert await reader.contains_many([key(2)]) == [True]
            assert await get(reader, [key(1), key(2)]) == [None, b"two"]

    run(scenario)
