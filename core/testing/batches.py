"""Conformance tests of the batch API: round trips, order, duplicates, misses, modes,
listing and stats, all through the backend under test."""

from __future__ import annotations

import os
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from kvtier.core.backend import Backend, BackendStats, PutMode
from kvtier.core.buffers import release_all
from kvtier.core.testing.base import SuiteBase
from kvtier.core.testing.harness import (
    NAMESPACE,
    BackendHarness,
    MiB,
    assert_blob,
    collect,
    expect_no_error,
    require,
    same_bytes,
    scratch,
)


class BatchTests(SuiteBase):
    """What each batch method returns, checked through the backend itself."""

    @pytest.mark.parametrize(
        "size",
        [
            pytest.param(0, id="0B"),
            pytest.param(1, id="1B"),
            pytest.param(4095, id="4095B"),
            pytest.param(4096, id="4096B"),
            pytest.param(4097, id="4097B"),
            pytest.param(MiB + 3, id="1MiB+3"),
            pytest.param(64 * MiB, id="64MiB", marks=pytest.mark.slow),
        ],
    )
    def test_round_trip(self, backend_harness: BackendHarness, size: int) -> None:
        """A stored blob reads back byte for byte, and twice."""
        h = backend_harness
        if h.capacity is not None and size > h.capacity:
            pytest.skip(f"a {size}-byte blob exceeds the capacity of {h.capacity} bytes")
        key, buf = h.key(), h.blob(size)

        async def body(backend: Backend) -> None:
            stored = await backend.put_many([(key, buf)])
            assert stored == [True], f"put_many of a {size}-byte blob returned {stored}"
            found = await backend.contains_many([key])
            assert found == [True], f"contains_many after put_many returned {found}"
            for _ in range(2):
                [got] = await backend.get_many([key])
                assert_blob(got, buf, f"{size}-byte blob")

        h.run(body)

    def test_batch_results_in_input_order(self, backend_harness: BackendHarness) -> None:
        """Each result belongs to the key at the same position, whatever the order."""
        h = backend_harness
        items = h.items([7, 4096, 100_000, 1, 0, 33_333])
        missing = [h.key() for _ in range(3)]

        async def body(backend: Backend) -> None:
            assert await backend.put_many(items) == [True] * len(items)
            order = [*items, *[(key, None) for key in missing]]
            random.shuffle(order)
            keys = [key for key, _ in order]
            present = [want is not None for _, want in order]
            got = await backend.get_many(keys)
            assert len(got) == len(keys), f"get_many of {len(keys)} keys gave {len(got)} results"
            pairs = enumerate(zip(got, order, strict=True))
            wrong = [i for i, (blob, (_, want)) in pairs if not same_bytes(blob, want)]
            release_all(got)
            assert not wrong, f"get_many results not in input order: wrong at positions {wrong}"
            found = await backend.contains_many(keys)
            assert found == present, f"contains_many results not in input order: {found}"
            deleted = await backend.delete_many(keys)
            assert deleted == present, f"delete_many results not in input order: {deleted}"

        h.run(body)

    def test_duplicate_keys_in_one_batch(self, backend_harness: BackendHarness) -> None:
        """A key may appear several times in a batch; the result is one whole value."""
        h = backend_harness
        key = h.key()
        first, second = h.blob(5000), h.blob(6000)

        async def body(backend: Backend) -> None:
            stored = await backend.put_many([(key, first), (key, second)])
            assert stored == [True, True], f"put_many of one key twice returned {stored}"
            got = await backend.get_many([key, key])
            winner = first if got[0] is not None and got[0].nbytes == first.nbytes else second
            for blob in got:
                assert_blob(blob, winner, "a key written twice in one batch")
            found = await backend.contains_many([key, key])
            assert found == [True, True], f"contains_many of one key twice returned {found}"
            deleted = await backend.delete_many([key, key])
            assert len(deleted) == 2 and deleted[0] is True, (
                f"delete_many of one key twice returned {deleted}"
            )
            assert await backend.contains_many([key]) == [False], "the key survived delete_many"

        h.run(body)

    def test_duplicate_create_in_one_batch(self, backend_harness: BackendHarness) -> None:
        """``CREATE`` twice for one absent key in a batch stores exactly one of them."""
        h = backend_harness
        key = h.key()
        values = [h.blob(5000), h.blob(6000)]

        async def body(backend: Backend) -> None:
            require(backend, "create_mode")
            stored = await backend.put_many([(key, v) for v in values], PutMode.CREATE)
            assert stored.count(True) == 1, f"CREATE of one key twice returned {stored}"
            [got] = await backend.get_many([key])
            assert_blob(got, values[stored.index(True)], "the stored CREATE value")

        h.run(body)

    def test_empty_batches(self, backend_harness: BackendHarness) -> None:
        """Every batch method accepts an empty batch and returns an empty list."""
        h = backend_harness
        key, buf = h.key(), h.blob(100)

        async def body(backend: Backend) -> None:
            for populated in (False, True):
                if populated:
                    assert await backend.put_many([(key, buf)]) == [True]
                calls: dict[str, Callable[[], Awaitable[list[Any]]]] = {
                    "get_many": lambda: backend.get_many([]),
                    "put_many": lambda: backend.put_many([]),
                    "put_many(CREATE)": lambda: backend.put_many([], PutMode.CREATE),
                    "contains_many": lambda: backend.contains_many([]),
                    "delete_many": lambda: backend.delete_many([]),
                    "read_into_many": lambda: backend.read_into_many([]),
                }
                for name, call in calls.items():
                    got = await call()
                    assert got == [], f"{name} of an empty batch returned {got!r}"
            assert await backend.contains_many([key]) == [True], "empty batches lost a key"

        h.run(body)

    def test_mixed_hits_and_misses(self, backend_harness: BackendHarness) -> None:
        """Hits and misses in one batch: blobs where stored, ``None``/``False`` elsewhere."""
        h = backend_harness
        (k1, b1), (k2, b2) = h.items([1000, 2000])
        miss = h.key()

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(k1, b1), (k2, b2)]) == [True, True]
            got = await backend.get_many([k1, miss, k2, miss])
            assert got[1] is None and got[3] is None, "get_many returned a blob for a miss"
            assert_blob(got[0], b1, "the hit before a miss")
            assert_blob(got[2], b2, "the hit after a miss")
            found = await backend.contains_many([miss, k1, miss, k2])
            assert found == [False, True, False, True], f"contains_many of hits and misses: {found}"

        h.run(body)

    def test_miss_is_not_an_error(self, backend_harness: BackendHarness) -> None:
        """A missing key is ``None`` or ``False`` from every method, never an exception."""
        h = backend_harness
        key, buf = h.key(), h.blob(10)

        async def body(backend: Backend) -> None:
            for round_ in ("never stored", "deleted"):
                if round_ == "deleted":
                    assert await backend.put_many([(key, buf)]) == [True]
                    assert await backend.delete_many([key]) == [True]
                calls: dict[str, tuple[Callable[[], Awaitable[list[Any]]], object]] = {
                    "get_many": (lambda: backend.get_many([key]), None),
                    "contains_many": (lambda: backend.contains_many([key]), False),
                    "delete_many": (lambda: backend.delete_many([key]), False),
                    "read_into_many": (
                        lambda: backend.read_into_many([(key, 0, scratch(16))]),
                        None,
                    ),
                }
                for name, (call, miss) in calls.items():
                    what = f"{name} of a {round_} key"
                    got = await expect_no_error(what, call)
                    assert got == [miss], f"{what} returned {got}, not [{miss}]"

        h.run(body)

    def test_create_keeps_existing_value(self, backend_harness: BackendHarness) -> None:
        """``CREATE`` stores an absent key and never replaces an existing one."""
        h = backend_harness
        key, old, new = h.key(), h.blob(3000), h.blob(4000)

        async def body(backend: Backend) -> None:
            require(backend, "create_mode")
            created = await backend.put_many([(key, old)], PutMode.CREATE)
            assert created == [True], f"CREATE of an absent key returned {created}"
            refused = await backend.put_many([(key, new)], PutMode.CREATE)
            assert refused == [False], f"CREATE of an existing key returned {refused}"
            [got] = await backend.get_many([key])
            assert_blob(got, old, "value after a refused CREATE")

        h.run(body)

    def test_overwrite_replaces_value(self, backend_harness: BackendHarness) -> None:
        """``OVERWRITE`` replaces a value, whether the new one is larger or smaller."""
        h = backend_harness
        key = h.key()

        async def body(backend: Backend) -> None:
            for size in (8192, 100_000, 10, 0, 5000):
                buf = h.blob(size)
                assert await backend.put_many([(key, buf)], PutMode.OVERWRITE) == [True]
                [got] = await backend.get_many([key])
                assert_blob(got, buf, f"value after overwriting with {size} bytes")

        h.run(body)

    def test_contains_and_delete(self, backend_harness: BackendHarness) -> None:
        """``contains_many`` and ``delete_many`` track exactly what is stored."""
        h = backend_harness
        (k1, b1), (k2, b2), (k3, b3) = h.items([100, 200, 300])
        miss = h.key()

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(k1, b1), (k2, b2), (k3, b3)]) == [True] * 3
            found = await backend.contains_many([k1, k2, k3, miss])
            assert found == [True, True, True, False], f"contains_many after put_many: {found}"
            deleted = await backend.delete_many([k2, miss])
            assert deleted == [True, False], f"delete_many([stored, missing]) returned {deleted}"
            found = await backend.contains_many([k1, k2, k3, miss])
            assert found == [True, False, True, False], f"contains_many after a delete: {found}"
            got = await backend.get_many([k1, k2, k3])
            assert got[1] is None, "get_many returned a deleted key"
            assert_blob(got[0], b1, "k1")
            assert_blob(got[2], b3, "k3")
            deleted = await backend.delete_many([k1, k2, k3])
            assert deleted == [True, False, True], f"delete_many of all three returned {deleted}"
            found = await backend.contains_many([k1, k2, k3])
            assert found == [False] * 3, f"contains_many after deleting everything: {found}"

        h.run(body)

    def test_iter_keys(self, backend_harness: BackendHarness) -> None:
        """``iter_keys`` yields every stored key once; ``prefix`` selects exactly its keys."""
        h = backend_harness
        ours = h.items([10] * 5)
        other_tag = os.urandom(4)
        others = [(h.key(other_tag), h.blob(10)) for _ in range(3)]

        async def body(backend: Backend) -> None:
            require(backend, "listing")
            assert await backend.put_many([*ours, *others]) == [True] * 8
            everything = await collect(backend.iter_keys())
            assert len(everything) == len(set(everything)), "iter_keys yielded a key twice"
            missing = {key for key, _ in [*ours, *others]} - set(everything)
            assert not missing, f"iter_keys() missed {len(missing)} stored keys"
            for prefix, want in ((h.prefix, ours), (f"{NAMESPACE}.{other_tag.hex()}", others)):
                listed = await collect(backend.iter_keys(prefix))
                assert sorted(listed) == sorted(k for k, _ in want), (
                    f"iter_keys(prefix) listed {len(listed)} keys, not the prefix's {len(want)}"
                )
            whole = await collect(backend.iter_keys(ours[0][0]))
            assert whole == [ours[0][0]], f"iter_keys(a whole key) listed {len(whole)} keys"
            assert await backend.delete_many([ours[0][0]]) == [True]
            listed = await collect(backend.iter_keys(h.prefix))
            assert sorted(listed) == sorted(k for k, _ in ours[1:]), (
                f"iter_keys after a delete listed {len(listed)} keys, not 4"
            )

        h.run(body)

    def test_stats(self, backend_harness: BackendHarness) -> None:
        """``stats()`` counts stored keys and bytes and returns to them after deletes."""
        h = backend_harness
        items = h.items([100, 5000, 70_000])
        total = sum(buf.nbytes for _, buf in items)

        def check_sane(stats: BackendStats, backend: Backend) -> None:
            assert isinstance(stats, BackendStats), f"stats() returned {type(stats).__name__}"
            assert stats.keys is None or stats.keys >= 0, f"stats: {stats.keys} keys"
            assert stats.bytes_used is None or stats.bytes_used >= 0, (
                f"stats: {stats.bytes_used} bytes used"
            )
            assert isinstance(stats.evictions, int) and stats.evictions >= 0, (
                f"stats: {stats.evictions!r} evictions"
            )
            assert isinstance(stats.details, dict), "stats: details is not a dict"
            if backend.capabilities.bounded and stats.capacity_bytes is not None:
                assert stats.capacity_bytes == backend.capacity, (
                    f"stats: capacity_bytes {stats.capacity_bytes} != {backend.capacity}"
                )

        async def body(backend: Backend) -> None:
            before = await backend.stats()
            check_sane(before, backend)
            assert await backend.put_many(items) == [True] * len(items)
            full = await backend.stats()
            check_sane(full, backend)
            if before.keys is not None and full.keys is not None:
                assert full.keys - before.keys == len(items), (
                    f"stats: storing 3 keys added {full.keys - before.keys} keys"
                )
            if before.bytes_used is not None and full.bytes_used is not None:
                assert full.bytes_used - before.bytes_used >= total, (
                    f"stats: storing {total} bytes added {full.bytes_used - before.bytes_used}"
                )
            assert await backend.delete_many([key for key, _ in items]) == [True] * len(items)
            after = await backend.stats()
            check_sane(after, backend)
            assert (after.keys, after.bytes_used) == (before.keys, before.bytes_used), (
                f"stats after deleting what was stored: (keys, bytes_used) went from "
                f"{(before.keys, before.bytes_used)} to {(after.keys, after.bytes_used)}"
            )

        h.run(body)
