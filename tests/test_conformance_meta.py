"""Tests of the conformance suite itself: its teeth, its coverage of the built-in
backends, and the live plugin.

Teeth: each entry of ``CATCHES`` is a backend with one deliberate bug and the suite
test that must fail against it, with a distinctive part of the failure message, so
each test is shown to fail for the reason it exists. The broken backends subclass the
``cpu`` tier (``MemoryBackend``) and break its ``_*_unique``-style hooks; the few
bugs only the ``Backend`` base could have (key validation, closed checks, empty and
repeated keys) break a public method instead. ``SharedMemory`` adds a persistent,
shared reference store (several instances on one URL) for the tests that need one.
"""

from __future__ import annotations

import ast
import asyncio
import importlib
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from kvtier.backends.memory import MemoryBackend, MemoryOptions
from kvtier.core.backend import Backend, BackendStats, PutMode, Read
from kvtier.core.buffers import Buffer, BufferPool, release_all
from kvtier.core.errors import BackendUnavailableError, ConfigError
from kvtier.core.plugins import BUILTIN_PLUGINS
from kvtier.core.testing import BackendConformance
from kvtier.core.testing.plugin import SUITE_MODULES, parse_option

pytest_plugins = ["pytester"]

TESTS = Path(__file__).parent
SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://")
PLUGIN = ("-p", "kvtier.core.testing.plugin")
Broken = TypeVar("Broken", bound=MemoryBackend)


# -- reference backends ----------------------------------------------------------------


def stored_blobs(backend: Backend) -> dict[str, Buffer]:
    """The key -> blob mapping of the RAM store behind ``backend``: the meta-tests' only
    look inside ``MemoryBackend`` (repoint it when that store moves)."""
    home = backend._home() if isinstance(backend, SharedMemory) else backend
    assert isinstance(home, MemoryBackend)
    return home.store.blobs


HOMES: dict[str, MemoryBackend] = {}
"""The stores behind ``SharedMemory`` instances, by URL."""
STOPPED: set[str] = set()
"""URLs whose store ``SharedSuite.stop_server`` made unreachable."""


class SharedMemory(MemoryBackend):
    """A client of a RAM store that outlives it and that every instance of its URL
    shares: persistent and shared, as a remote store is. Writes copy, as a remote
    store's do."""

    capabilities = replace(
        MemoryBackend.capabilities,
        persistent=True,
        shared=True,
        bounded=False,
        hands_over_evictions=False,
        verified_reads=False,
    )

    def _home(self) -> MemoryBackend:
        if self.url in STOPPED:
            raise BackendUnavailableError(f"{self.url}: the store is down")
        if self.url not in HOMES:
            HOMES[self.url] = MemoryBackend(self.url, MemoryOptions(), capacity=1 << 40)
        return HOMES[self.url]

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        return await self._home()._get_unique(keys)

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        copies = [(key, self.pool.copy_of(buf.view)) for key, buf in items]
        try:
            return await self._home()._put_unique(copies, mode)
        finally:
            release_all(buf for _, buf in copies)

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        return await self._home()._contains_unique(keys)

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        return await self._home()._delete_unique(keys)

    def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        return self._home()._iter_keys(prefix)

    async def _stats(self) -> BackendStats:
        return await self._home()._stats()

    async def _close(self) -> None:
        """The store outlives its clients."""


class MemorySuite(BackendConformance):
    """The suite against ``backend_cls``, a ``MemoryBackend``, with raw hooks."""

    url = "cpu://meta"
    capacity = 16 << 20
    backend_cls: type[MemoryBackend] = MemoryBackend

    def create_backend(
        self, url: str, *, capacity: int | None, options: Any, pool: BufferPool
    ) -> Backend:
        return self.backend_cls(url, MemoryOptions(**options), capacity=capacity, pool=pool)

    def raw_write(self, backend: Backend, key: str, data: bytes) -> None:
        blobs = stored_blobs(backend)
        old = blobs.pop(key, None)
        blobs[key] = backend.pool.copy_of(data)
        if old is not None:
            old.release()

    def raw_read(self, backend: Backend, key: str) -> bytes | None:
        buf = stored_blobs(backend).get(key)
        return None if buf is None else bytes(buf.view)


class SharedSuite(MemorySuite):
    """The suite against a ``SharedMemory`` class; each test gets a store of its own."""

    backend_cls = SharedMemory

    @pytest.fixture
    def backend_url(self) -> str:
        return f"cpu://meta-{os.urandom(6).hex()}"

    def stop_server(self, url: str) -> None:
        STOPPED.add(url)


@dataclass(frozen=True)
class Catch:
    """``test`` fails against ``backend`` with ``message`` (a regex) in its report."""

    backend: type[MemoryBackend]
    test: str
    message: str


CATCHES: list[Catch] = []
"""Every broken backend, the suite test that must fail against it, and why."""


def catches(test: str, message: str) -> Callable[[type[Broken]], type[Broken]]:
    """Class decorator: the suite's ``test`` fails against this backend with ``message``."""

    def mark(cls: type[Broken]) -> type[Broken]:
        CATCHES.append(Catch(cls, test, message))
        return cls

    return mark


# -- broken backends: the batch API ----------------------------------------------------


@catches("test_round_trip", r"-byte blob: 1 bytes differ")
class WrongBytes(MemoryBackend):
    """Reads flip the last bit of every non-empty blob."""

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        out = await super()._get_unique(keys)
        for i, buf in enumerate(out):
            if buf is not None and buf.nbytes:
                wrong = self.pool.copy_of(buf.view)
                wrong.view[-1] ^= 1
                buf.release()
                out[i] = wrong
        return out


@catches("test_batch_results_in_input_order", r"get_many results not in input order")
class Reversed(MemoryBackend):
    """Returns the blobs of a batch in reverse order."""

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        return (await super()._get_unique(keys))[::-1]


@catches("test_duplicate_keys_in_one_batch", r"contains_many of one key twice returned \[True\]$")
class FoldsRepeats(MemoryBackend):
    """A base bug: ``contains_many`` answers each distinct key once, dropping repeats."""

    async def contains_many(self, keys: Sequence[str]) -> list[bool]:
        return await super().contains_many(list(dict.fromkeys(keys)))


@catches(
    "test_duplicate_create_in_one_batch",
    r"the stored CREATE value: got 6000 bytes, expected 5000",
)
class CreateKeepsLast(MemoryBackend):
    """A base bug: of a key repeated in a ``CREATE`` batch, the last value is written but
    the first reported stored."""

    async def put_many(
        self, items: Sequence[tuple[str, Buffer]], mode: PutMode = PutMode.OVERWRITE
    ) -> list[bool]:
        if mode is PutMode.CREATE:
            return await super().put_many(items[::-1], mode)
        return await super().put_many(items, mode)


@catches("test_empty_batches", r"get_many of an empty batch returned \[None\]")
class EmptyBatchMiss(MemoryBackend):
    """A base bug: ``get_many([])`` returns one miss."""

    async def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        return await super().get_many(keys) if keys else [None]


@catches("test_mixed_hits_and_misses", r"the hit after a miss: missing")
class StopsAtMiss(MemoryBackend):
    """Reads stop at the first miss of a batch: every later key is a miss too."""

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        out = await super()._get_unique(keys)
        if None in out:
            first = out.index(None)
            release_all(out[first:])
            out[first:] = [None] * (len(out) - first)
        return out


@catches("test_miss_is_not_an_error", r"get_many of a never stored key raised KeyError")
class RaisesOnMiss(MemoryBackend):
    """A miss raises ``KeyError``."""

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        out = await super()._get_unique(keys)
        if None in out:
            release_all(out)
            raise KeyError("miss")
        return out


@catches("test_create_keeps_existing_value", r"CREATE of an existing key returned \[True\]")
class CreateOverwrites(MemoryBackend):
    """``CREATE`` replaces existing values."""

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        return await super()._put_unique(items, PutMode.OVERWRITE)


@catches(
    "test_overwrite_replaces_value",
    r"value after overwriting with 100000 bytes: got 8192 bytes",
)
class OverwriteKeepsOld(MemoryBackend):
    """``OVERWRITE`` of an existing key keeps the old value and reports success."""

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        existed = await self._contains_unique([key for key, _ in items])
        stored = await super()._put_unique(items, PutMode.CREATE)
        if mode is PutMode.CREATE:
            return stored
        return [new or old for new, old in zip(stored, existed, strict=True)]


@catches("test_contains_and_delete", r"delete_many\(\[stored, missing\]\) returned \[True, True\]")
class DeleteAlwaysTrue(MemoryBackend):
    """``delete_many`` reports every key as deleted, present or not."""

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        await super()._delete_unique(keys)
        return [True] * len(keys)


@catches("test_iter_keys", r"iter_keys\(prefix\) listed \d+ keys, not the prefix's 5")
class IgnoresPrefix(MemoryBackend):
    """``iter_keys(prefix)`` lists every key."""

    def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        return super()._iter_keys("")


@catches("test_stats", r"stats after deleting what was stored")
class StatsNeverShrink(MemoryBackend):
    """``stats()`` reports the most keys and bytes the backend ever held."""

    peak = (0, 0)

    async def _stats(self) -> BackendStats:
        stats = await super()._stats()
        self.peak = max(self.peak, (stats.keys or 0, stats.bytes_used or 0))
        stats.keys, stats.bytes_used = self.peak
        return stats


# -- broken backends: ranged reads ------------------------------------------------------


@catches(
    "test_read_ranges", r"read_into_many of the middle of a 20011-byte value: \d+ bytes differ"
)
class RangesFromStart(MemoryBackend):
    """Ranged reads ignore their offset: every range is read from the value's start."""

    async def _read_into(self, reads: list[Read]) -> list[int | None]:
        return await super()._read_into([(key, 0, out) for key, _, out in reads])


@catches(
    "test_read_into_rejects_bad_arguments",
    r"read_into_many with a negative offset did not raise ConfigError",
)
class UncheckedReads(MemoryBackend):
    """A base bug: ``read_into_many`` checks only that the backend is open."""

    async def read_into_many(self, reads: Sequence[Read]) -> list[int | None]:
        self._check_open()
        return await self._read_into(list(reads)) if reads else []


# -- broken backends: buffer ownership, lifetime, errors ---------------------------------


@catches(
    "test_put_does_not_take_ownership",
    r"get_many after the caller released the buffer it put",
)
class NoRetainOnPut(MemoryBackend):
    """Keeps the caller's buffer without a reference of its own."""

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        stored = await super()._put_unique(items, mode)
        for (_, buf), kept in zip(items, stored, strict=True):
            if kept:
                buf.release()
        return stored


@catches(
    "test_returned_buffers_belong_to_caller",
    r"get_many after the caller released every buffer it had",
)
class NoRetainOnGet(MemoryBackend):
    """Hands out its own buffers without adding a reference for the caller."""

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        out = await super()._get_unique(keys)
        release_all(out)
        return out


@catches(
    "test_returned_buffer_survives_change",
    r"a buffer read before the (overwrite|delete): \d+ bytes differ",
)
class ScrubsInPlace(MemoryBackend):
    """Zeroes a blob in place when its key is overwritten or deleted, under its readers."""

    async def _scrub(self, keys: list[str]) -> None:
        for buf in await super()._get_unique(keys):
            if buf is not None:
                buf.view[:] = bytes(buf.nbytes)
                buf.release()

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        if mode is PutMode.OVERWRITE:
            await self._scrub([key for key, _ in items])
        return await super()._put_unique(items, mode)

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        await self._scrub(keys)
        return await super()._delete_unique(keys)


@catches(
    "test_close_releases_buffers",
    r"buffer references after close\(\) \(caller's = 1\): \[2, 2, 2\]",
)
class LeaksOnClose(MemoryBackend):
    """``close()`` keeps every stored buffer."""

    async def _close(self) -> None:
        pass


@catches("test_persistence", r"after reopening: missing")
class ForgetsOnClose(SharedMemory):
    """A persistent store that loses its data when a client closes."""

    async def _close(self) -> None:
        await self._home()._close()


@catches("test_invalid_key_rejected", r"contains_many with .* did not raise ConfigError")
class SwallowsBadKeys(MemoryBackend):
    """A base bug: ``contains_many`` answers ``False`` for invalid keys."""

    async def contains_many(self, keys: Sequence[str]) -> list[bool]:
        try:
            return await super().contains_many(keys)
        except ConfigError:
            return [False] * len(keys)


@catches(
    "test_closed_backend_is_unavailable",
    r"iter_keys after close\(\) did not raise BackendUnavailableError",
)
class ListsWhenClosed(MemoryBackend):
    """A base bug: ``iter_keys`` works after ``close()``."""

    def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        return self._iter_keys(prefix)


@catches(
    "test_stopped_server_is_unavailable",
    r"with the server down raised ConnectionRefusedError",
)
class UntranslatedOutage(SharedMemory):
    """Lets the client's connection error escape instead of ``BackendUnavailableError``."""

    def _home(self) -> MemoryBackend:
        if self.url in STOPPED:
            raise ConnectionRefusedError(111, "Connection refused")
        return super()._home()


# -- broken backends: capacity and concurrency -----------------------------------------


@catches("test_eviction_keeps_within_capacity", r"the eviction listener never ran")
class SilentEviction(MemoryBackend):
    """Never reports evictions (nor hands evicted blobs over)."""

    def _evicted(
        self, items: Sequence[tuple[str, int]], blobs: Sequence[Buffer] | None = None
    ) -> None:
        pass


@catches(
    "test_oversize_blob_rejected",
    r"contains_many\(\[oversize, earlier, later\]\) after oversize puts: \[False, False, True\]",
)
class OversizeEvictsAll(MemoryBackend):
    """Makes room for a blob over capacity by evicting everything, then refuses it."""

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        assert self.capacity is not None
        if any(buf.nbytes > self.capacity for _, buf in items):
            everything = [key async for key in self._iter_keys("")]
            if everything:
                await self._delete_unique(everything)
        return await super()._put_unique(items, mode)


@catches(
    "test_demotion_hands_over_evicted_blobs",
    r"reached demotion_sink with 2 references, not 1",
)
class DemotionKeepsReference(MemoryBackend):
    """Hands evicted blobs to the demotion sink but keeps a reference to each."""

    def _evicted(
        self, items: Sequence[tuple[str, int]], blobs: Sequence[Buffer] | None = None
    ) -> None:
        super()._evicted(items, [blob.retain() for blob in blobs or ()])


@catches("test_demotion_hands_over_evicted_blobs", r"evicted blobs never reached demotion_sink")
class DemotesNothing(MemoryBackend):
    """Reports evictions but drops the evicted blobs instead of handing them over."""

    def _evicted(
        self, items: Sequence[tuple[str, int]], blobs: Sequence[Buffer] | None = None
    ) -> None:
        release_all(blobs or ())
        super()._evicted(items)


@catches("test_concurrent_puts_on_overlapping_keys", r"concurrent read: key \d: \d+ bytes differ")
class TornWrites(MemoryBackend):
    """Publishes each blob before its bytes are copied, then copies them in two halves."""

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        results = []
        for key, buf in items:
            copy = self.pool.copy_of(bytes(buf.nbytes))
            results += await super()._put_unique([(key, copy)], mode)
            half = buf.nbytes // 2
            copy.view[:half] = buf.view[:half]
            await asyncio.sleep(0)
            copy.view[half:] = buf.view[half:]
            copy.release()
        return results


@catches(
    "test_cancelled_put_leaves_keys_absent_or_complete",
    r"after cancelling at step \d+: got 0 bytes",
)
class ReservesThenFills(MemoryBackend):
    """Reserves each key with an empty blob, yields, then stores the real values: a
    cancellation in between leaves the empty blobs."""

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        empty = self.pool.acquire(0)
        try:
            reserved = await super()._put_unique([(key, empty) for key, _ in items], mode)
        finally:
            empty.release()
        await asyncio.sleep(0)
        chosen = [item for item, ok in zip(items, reserved, strict=True) if ok]
        stored = iter(await super()._put_unique(chosen, PutMode.OVERWRITE) if chosen else [])
        return [ok and next(stored) for ok in reserved]


@catches(
    "test_concurrent_create_has_one_winner",
    r"one instance: 16 of 16 concurrent CREATEs of one key returned True",
)
class CheckThenCreate(MemoryBackend):
    """``CREATE`` checks for the key, yields, then overwrites: not atomic."""

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        if mode is PutMode.OVERWRITE:
            return await super()._put_unique(items, mode)
        existed = await self._contains_unique([key for key, _ in items])
        await asyncio.sleep(0)
        fresh = [item for item, found in zip(items, existed, strict=True) if not found]
        stored = iter(await super()._put_unique(fresh, PutMode.OVERWRITE) if fresh else [])
        return [not found and next(stored) for found in existed]


@catches(
    "test_concurrent_create_has_one_winner",
    r"two instances: [2-9]\d* of 16 concurrent CREATEs of one key returned True",
)
class LocksPerInstance(CheckThenCreate, SharedMemory):
    """``CREATE`` is check-then-write under a lock of this instance only."""

    lock: asyncio.Lock | None = None

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        self.lock = self.lock or asyncio.Lock()
        async with self.lock:
            return await super()._put_unique(items, mode)


# -- broken backends: what the store holds ---------------------------------------------


class Mangles(MemoryBackend):
    """Stores ``mangle(bytes)`` and unmangles on reads: every round trip passes."""

    @staticmethod
    def mangle(data: bytes) -> bytes:
        return data[::-1]

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        mangled = [(key, self.pool.copy_of(self.mangle(bytes(buf.view)))) for key, buf in items]
        try:
            return await super()._put_unique(mangled, mode)
        finally:
            release_all(buf for _, buf in mangled)

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        out = await super()._get_unique(keys)
        for i, buf in enumerate(out):
            if buf is not None:
                out[i] = self.pool.copy_of(self.mangle(bytes(buf.view)))
                buf.release()
        return out


@catches("test_put_writes_exact_bytes", r"raw_read of a 4097-byte put_many: \d+ bytes differ")
class StoresReversed(Mangles):
    """Stores every blob's bytes reversed."""


@catches("test_reads_see_raw_writes", r"get_many of a 1-byte raw write: 1 bytes differ")
class StoresXored(Mangles):
    """Stores every blob's bytes XOR 0x5A."""

    @staticmethod
    def mangle(data: bytes) -> bytes:
        return (np.frombuffer(data, np.uint8) ^ 0x5A).tobytes()


class OwnIndex(MemoryBackend):
    """Remembers the keys it wrote itself; the subclasses trust that index."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.written: set[str] = set()

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        stored = await super()._put_unique(items, mode)
        self.written.update(key for (key, _), ok in zip(items, stored, strict=True) if ok)
        return stored

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        self.written.difference_update(keys)
        return await super()._delete_unique(keys)


@catches(
    "test_reads_see_raw_writes",
    r"contains_many of a miss and raw-written keys returned \[False, False",
)
class ContainsFromOwnIndex(OwnIndex):
    """``contains_many`` answers from the keys this instance wrote."""

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        return [key in self.written for key in keys]


@catches("test_reads_see_raw_writes", r"iter_keys listed 0 of 5 raw-written keys")
class ListsFromOwnIndex(OwnIndex):
    """``iter_keys`` lists the keys this instance wrote."""

    async def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        for key in sorted(self.written):
            if key.startswith(prefix):
                yield key


@catches("test_create_refuses_raw_written_key", r"CREATE of a raw-written key returned \[True\]")
class CreatesFromOwnIndex(OwnIndex):
    """``CREATE`` refuses only keys this instance wrote, and overwrites the rest."""

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        if mode is PutMode.OVERWRITE:
            return await super()._put_unique(items, mode)
        fresh = [key not in self.written for key, _ in items]
        chosen = [item for item, new in zip(items, fresh, strict=True) if new]
        stored = iter(await super()._put_unique(chosen, PutMode.OVERWRITE) if chosen else [])
        return [new and next(stored) for new in fresh]


@catches(
    "test_shared_instances_see_each_other",
    r"CREATE of a key another instance created returned \[True\]",
)
class SharedCreatesFromOwnIndex(CreatesFromOwnIndex, SharedMemory):
    """``CREATE`` ignores what other instances of the shared store wrote."""


@catches(
    "test_delete_removes_from_store",
    r"a raw-written key is still in the store after delete_many",
)
class Tombstones(MemoryBackend):
    """Deletes by hiding keys from its own reads; the bytes stay in the store."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hidden: set[str] = set()

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        out = await super()._get_unique(keys)
        release_all(buf for key, buf in zip(keys, out, strict=True) if key in self.hidden)
        return [None if key in self.hidden else buf for key, buf in zip(keys, out, strict=True)]

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        revived = [key for key, _ in items if key in self.hidden]
        if revived:  # what the store still holds for them was "deleted"
            self.hidden.difference_update(revived)
            await super()._delete_unique(revived)
        return await super()._put_unique(items, mode)

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        found = await super()._contains_unique(keys)
        return [ok and key not in self.hidden for key, ok in zip(keys, found, strict=True)]

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        existed = await self._contains_unique(keys)
        self.hidden.update(keys)
        return existed


@catches("test_shared_instances_see_each_other", r"another instance's write: missing")
class CachesMisses(SharedMemory):
    """Remembers misses: another instance's later write stays invisible."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.misses: set[str] = set()

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        asked = [key for key in keys if key not in self.misses]
        found = dict(zip(asked, await super()._get_unique(asked) if asked else [], strict=True))
        self.misses.update(key for key, buf in found.items() if buf is None)
        return [found.get(key) for key in keys]

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        self.misses.difference_update(key for key, _ in items)
        return await super()._put_unique(items, mode)


@catches(
    "test_shared_instances_see_each_other",
    r"get_many returned a key another instance deleted",
)
class CachesHits(SharedMemory):
    """Serves again what it read once: another instance's delete stays invisible."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cache: dict[str, Buffer] = {}

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        asked = [key for key in keys if key not in self.cache]
        for key, buf in zip(asked, await super()._get_unique(asked) if asked else [], strict=True):
            if buf is not None:
                self.cache[key] = buf
        return [self.cache[key].retain() if key in self.cache else None for key in keys]

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        release_all(self.cache.pop(key, None) for key, _ in items)
        return await super()._put_unique(items, mode)

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        release_all(self.cache.pop(key, None) for key in keys)
        return await super()._delete_unique(keys)

    async def _close(self) -> None:
        release_all(self.cache.values())


# -- the meta-tests -------------------------------------------------------------------


REFERENCES = (MemoryBackend, SharedMemory)


def suite_tests() -> set[str]:
    """The names of the suite's tests."""
    return {name for name in dir(BackendConformance) if name.startswith("test")}


def name_of(nodeid: str) -> str:
    """``'f.py::TestX::test_y[a]'`` -> ``'test_y'``."""
    return nodeid.rpartition("::")[2].partition("[")[0]


def suite_module(pytester: pytest.Pytester, backends: Iterable[type[MemoryBackend]]) -> Path:
    """A test module with the suite's class ``Test<Backend>`` for each backend."""
    lines = ["import sys", f"meta = sys.modules[{__name__!r}]"]
    for cls in backends:
        suite = "SharedSuite" if issubclass(cls, SharedMemory) else "MemorySuite"
        lines += ["", "", f"class Test{cls.__name__}(meta.{suite}):"]
        lines.append(f"    backend_cls = meta.{cls.__name__}")
    return pytester.makepyfile(test_suite="\n".join(lines) + "\n")


@pytest.fixture(autouse=True)
def only_kvtier_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner pytest runs load no installed plugin but kvtier's (passed as ``PLUGIN``)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


def test_every_suite_test_has_a_broken_backend() -> None:
    """A new suite test comes with a backend it catches (add one to ``CATCHES``)."""
    caught = {catch.test for catch in CATCHES}
    assert not suite_tests() - caught, (
        f"suite tests without a broken backend: {suite_tests() - caught}"
    )
    assert not caught - suite_tests(), (
        f"CATCHES names tests the suite lacks: {caught - suite_tests()}"
    )


def test_reference_backends_pass_every_test(pytester: pytest.Pytester) -> None:
    """The reference backends fail nothing, and between them run every suite test."""
    module = suite_module(pytester, REFERENCES)
    result = pytester.inline_run(module.name, *PLUGIN, "--strict-markers", "-m", "not slow")
    passed, _, failed = result.listoutcomes()
    assert not failed, {report.nodeid: report.longreprtext[-600:] for report in failed}
    skipped_by_both = suite_tests() - {name_of(report.nodeid) for report in passed}
    assert not skipped_by_both, f"no reference backend runs {skipped_by_both}"


@pytest.mark.parametrize(
    "catch", CATCHES, ids=[f"{c.backend.__name__}-{c.test.removeprefix('test_')}" for c in CATCHES]
)
def test_suite_catches_broken_backend(pytester: pytest.Pytester, catch: Catch) -> None:
    """``catch.test`` fails against ``catch.backend``, in its body, with its message."""
    module = suite_module(pytester, [catch.backend])
    target = f"{module.name}::Test{catch.backend.__name__}::{catch.test}"
    result = pytester.inline_run(target, *PLUGIN, "-m", "not slow")
    passed, skipped, failed = result.listoutcomes()
    assert failed, (
        f"{catch.test} passed against {catch.backend.__name__}, a backend built to fail it "
        f"({len(passed)} passed, {len(skipped)} skipped)"
    )
    for report in failed:
        assert report.when == "call", f"{report.nodeid} failed in {report.when}"
        assert re.search(catch.message, report.longreprtext, re.MULTILINE), (
            f"{report.nodeid} failed for another reason than /{catch.message}/:\n"
            + report.longreprtext[-1500:]
        )


def test_suite_modules_rewrite_asserts() -> None:
    """Every module of the suite is registered for pytest's assert rewriting."""
    package = Path(importlib.import_module("kvtier.core.testing").__file__ or "").parent
    modules = {path.stem for path in package.glob("*.py")} - {"__init__", "plugin", "live"}
    assert modules == set(SUITE_MODULES.split())


def _conformance_classes(tree: ast.Module) -> list[ast.ClassDef]:
    """Classes deriving, directly or through classes of the same module, from the suite."""
    found: dict[str, ast.ClassDef] = {}
    classes = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    changed = True
    while changed:
        changed = False
        for node in classes:
            bases = {ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases}
            if node.name not in found and bases & {"BackendConformance", *found}:
                found[node.name] = node
                changed = True
    return list(found.values())


def _schemes(node: ast.ClassDef) -> set[str]:
    """URL schemes of the string literals (f-strings included) in a class body."""
    return {
        match[1]
        for sub in ast.walk(node)
        if isinstance(sub, ast.Constant)
        and isinstance(sub.value, str)
        and (match := SCHEME_RE.match(sub.value))
    }


def test_every_builtin_backend_has_a_conformance_subclass() -> None:
    """Each built-in backend is covered by a ``BackendConformance`` subclass in tests/:
    one in ``tests/test_<module>_backend.py``, or one whose body names its URL scheme."""
    by_file = {
        path.name: _conformance_classes(ast.parse(path.read_text()))
        for path in sorted(TESTS.glob("test_*.py"))
    }
    schemes = {s for classes in by_file.values() for node in classes for s in _schemes(node)}
    missing = []
    for plugin, module_name in BUILTIN_PLUGINS.items():
        hook = getattr(importlib.import_module(module_name), "kvtier_backends", None)
        for spec in hook() if hook is not None else ():
            files = {
                f"test_{module_name.rsplit('.', 1)[-1]}_backend.py",
                f"test_{spec.name}_backend.py",
            }
            if not (set(spec.schemes) & schemes or any(by_file.get(f) for f in files)):
                missing.append(
                    f"{spec.name} ({module_name}, plugin {plugin!r}): add "
                    f"'class Test...(BackendConformance)' to tests/{min(files)}"
                )
    assert not missing, "built-in backends without a conformance suite:\n" + "\n".join(missing)


def test_live_suite_skips_without_url(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*PLUGIN, "--pyargs", "kvtier.core.testing.live", "-rs")
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped", 0) >= 30 and not {"passed", "failed", "errors"} & set(outcomes)
    result.stdout.fnmatch_lines(["*no live backend given: pass --kvtier-backend-url URL*"])


def test_live_suite_runs_against_url(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        *PLUGIN, "--pyargs", "kvtier.core.testing.live", "--strict-markers",
        "--kvtier-backend-url=cpu://live", "--kvtier-backend-capacity=32MiB",
        "--kvtier-backend-option=eviction=lfu", "-m", "not slow",
    )  # fmt: skip
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 30 and "failed" not in outcomes, outcomes


def test_live_options_are_validated(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        *PLUGIN, "--pyargs", "kvtier.core.testing.live", "--kvtier-backend-url=cpu://",
        "--kvtier-backend-capacity=64 parsecs",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--kvtier-backend-capacity*"])


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("eviction=lfu", ("eviction", "lfu")), ("fsync=true", ("fsync", True)),
     ("n=8", ("n", 8)), ("path=/a=b", ("path", "/a=b")), ("empty=", ("empty", None))],
)  # fmt: skip
def test_parse_option(text: str, parsed: tuple[str, object]) -> None:
    assert parse_option(text) == parsed


@pytest.mark.parametrize("text", ["eviction", "=lfu", "x=[1"])
def test_parse_option_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--kvtier-backend-option"):
        parse_option(text)
