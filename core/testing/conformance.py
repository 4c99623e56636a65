"""The backend conformance suite: the tests every kvtier storage backend must pass.

Modelled on zarr's ``StoreTests``: a backend's test module subclasses
:class:`BackendConformance`, says how to reach the backend, and pytest collects every
test of the suite for it. Tests are synchronous and drive the backend with
:func:`asyncio.run` (one event loop per test, the backend opened and closed inside
it), so the suite needs no asyncio plugin. Keys live in the ``NAMESPACE`` namespace
with random digests, so runs against a shared store never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

import numpy as np
import pytest

from kvtier.core.backend import Backend, BackendStats, PutMode
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.errors import BackendUnavailableError, ConfigError
from kvtier.core.factory import build_backend
from kvtier.core.keys import ChunkKey

T = TypeVar("T")

NAMESPACE = "conformance-0123456789abcdef"
"""Namespace of every key the suite writes."""
MiB = 1 << 20
INVALID_KEYS = ("../x", "a/b", "", "x" * 500, ".hidden")
Call = Callable[[], Awaitable[object]]


@dataclass
class BackendHarness:
    """Builds the backend under test and the keys and blobs a test writes to it."""

    suite: BackendConformance
    url: str
    capacity: int | None
    options: Mapping[str, Any]
    pool: BufferPool = field(default_factory=BufferPool)
    tag: bytes = field(default_factory=lambda: os.urandom(4))
    """First digest bytes of this test's keys: ``prefix`` selects exactly them."""
    _scratch: list[Buffer] = field(default_factory=list, init=False, repr=False)

    @property
    def prefix(self) -> str:
        """The string every key from :meth:`key` starts with."""
        return f"{NAMESPACE}.{self.tag.hex()}"

    def key(self, tag: bytes | None = None) -> str:
        """A fresh valid key: digest ``tag`` (default :attr:`tag`) + 12 random bytes."""
        return str(ChunkKey(NAMESPACE, (self.tag if tag is None else tag) + os.urandom(12)))

    def blob(self, nbytes: int) -> Buffer:
        """A pool buffer of ``nbytes`` random bytes."""
        return self.pool.copy_of(os.urandom(nbytes))

    def items(self, sizes: Sequence[int]) -> list[tuple[str, Buffer]]:
        """Fresh ``(key, blob)`` pairs of the given sizes."""
        return [(self.key(), self.blob(n)) for n in sizes]

    def clobber_freed(self, nbytes: int, count: int = 8) -> None:
        """Lease ``count`` buffers of ``nbytes``'s size class and fill them with 0xA5.

        A block a backend handed back to the pool while someone still used it gets
        overwritten, so a later byte comparison exposes the ownership bug.
        """
        for _ in range(count):
            buf = self.pool.acquire(nbytes)
            buf.view[:] = b"\xa5" * nbytes
            self._scratch.append(buf)

    async def open(self) -> Backend:
        """A new backend for this test's URL, capacity and options, opened."""
        backend = self.suite.create_backend(
            self.url, capacity=self.capacity, options=dict(self.options), pool=self.pool
        )
        await backend.open()
        return backend

    def run(self, body: Callable[[Backend], Awaitable[T]]) -> T:
        """Open a backend, await ``body(backend)``, close it; all in one event loop."""

        async def main() -> T:
            backend = await self.open()
            try:
                return await body(backend)
            finally:
                await backend.close()

        return asyncio.run(main())


def assert_blob(got: Buffer | None, want: Buffer | bytes, what: str = "blob") -> None:
    """Fail unless ``got`` holds exactly the bytes of ``want``."""
    assert got is not None, f"{what}: missing (got None)"
    expected = want.view if isinstance(want, Buffer) else memoryview(want)
    assert got.nbytes == got.view.nbytes, f"{what}: nbytes {got.nbytes} != len(view)"
    assert got.nbytes == expected.nbytes, (
        f"{what}: got {got.nbytes} bytes, expected {expected.nbytes}"
    )
    diff = np.flatnonzero(np.frombuffer(got.view, np.uint8) != np.frombuffer(expected, np.uint8))
    assert diff.size == 0, f"{what}: {diff.size} bytes differ, the first at offset {diff[0]}"


async def collect(keys: AsyncIterator[str]) -> list[str]:
    """Every item of an ``iter_keys`` iterator."""
    return [key async for key in keys]


async def expect_error(error: type[Exception], what: str, call: Call) -> None:
    """Fail unless awaiting ``call()`` raises ``error``."""
    try:
        await call()
    except error:
        return
    except Exception as exc:
        pytest.fail(f"{what} raised {exc!r}, expected {error.__name__}")
    pytest.fail(f"{what} did not raise {error.__name__}")


def keyed_calls(backend: Backend, key: str, buf: Buffer) -> dict[str, Call]:
    """Each batch method called with ``key`` (and ``buf``), by name."""
    return {
        "get_many": lambda: backend.get_many([key]),
        "put_many": lambda: backend.put_many([(key, buf)]),
        "put_many(CREATE)": lambda: backend.put_many([(key, buf)], PutMode.CREATE),
        "contains_many": lambda: backend.contains_many([key]),
        "delete_many": lambda: backend.delete_many([key]),
    }


def require(backend: Backend, capability: str) -> None:
    """Skip the test unless ``backend.capabilities.<capability>`` is true."""
    if not getattr(backend.capabilities, capability):
        pytest.skip(f"{type(backend).__name__} capabilities: {capability}=False")


def require_capacity(backend: Backend) -> int:
    """The capacity of a bounded backend; skip the test for unbounded ones."""
    require(backend, "bounded")
    if backend.capacity is None:
        pytest.skip("bounded backend opened without a capacity")
    return backend.capacity


class BackendConformance:
    """Conformance tests for a kvtier storage backend; subclass it in a test module.

    Usage for a backend author::

        from kvtier.core.testing import BackendConformance

        class TestMyBackend(BackendConformance):
            url = "mybackend://127.0.0.1:1234/x"  # or override the `backend_url` fixture
            capacity = 64 << 20                   # for bounded backends
            options = {"eviction": "lfu"}
            # optional: override `stop_server(self, url)` to test an unreachable server

    Fixtures ``backend_url``, ``backend_capacity`` and ``backend_options`` default to the
    class attributes; override them to use ``tmp_path`` or a server fixture. The backend
    is built with :meth:`create_backend` (by default
    :func:`kvtier.core.factory.build_backend`, so through the plugin registry). Tests
    that need a capability the backend's ``capabilities`` lack are skipped. Bounded
    backends need a capacity of at least 16 MiB so that the general tests never evict;
    the 64 MiB round trip (marked ``slow``) is skipped below 64 MiB.
    """

    url: ClassVar[str | None] = None
    capacity: ClassVar[int | None] = None
    options: ClassVar[Mapping[str, Any]] = {}

    # -- hooks and fixtures a subclass may override ------------------------------------

    def create_backend(
        self, url: str, *, capacity: int | None, options: Mapping[str, Any], pool: BufferPool
    ) -> Backend:
        """Build the (unopened) backend under test."""
        return build_backend(url, capacity=capacity, options=options, pool=pool)

    def stop_server(self, url: str) -> None:
        """Make the store at ``url`` unreachable (e.g. terminate its server process).

        Override it to enable ``test_stopped_server_is_unavailable``; the server it
        stops must be that test's own (a function-scoped server fixture).
        """
        raise NotImplementedError

    @pytest.fixture
    def backend_url(self) -> str:
        """URL of the backend under test; defaults to the ``url`` class attribute."""
        if self.url is None:
            pytest.fail(f"{type(self).__name__}: set `url = ...` or override `backend_url`")
        return self.url

    @pytest.fixture
    def backend_capacity(self) -> int | None:
        """Byte capacity passed to the backend; defaults to ``capacity``."""
        return self.capacity

    @pytest.fixture
    def backend_options(self) -> Mapping[str, Any]:
        """Backend options (validated by the spec's model); defaults to ``options``."""
        return dict(self.options)

    @pytest.fixture
    def backend_harness(
        self, backend_url: str, backend_capacity: int | None, backend_options: Mapping[str, Any]
    ) -> BackendHarness:
        """The test's harness: builds the backend, keys and blobs."""
        return BackendHarness(self, backend_url, backend_capacity, backend_options)

    # -- round trips and batch semantics -----------------------------------------------

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
            assert await backend.put_many([(key, buf)]) == [True]
            assert await backend.contains_many([key]) == [True]
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
            got = await backend.get_many(keys)
            assert len(got) == len(keys)
            for (key, want), blob in zip(order, got, strict=True):
                if want is None:
                    assert blob is None, f"{key}: never stored but get_many returned a blob"
                else:
                    assert_blob(blob, want, key)
            assert await backend.contains_many(keys) == [want is not None for _, want in order]
            assert await backend.delete_many(keys) == [want is not None for _, want in order]

        h.run(body)

    def test_duplicate_keys_in_one_batch(self, backend_harness: BackendHarness) -> None:
        """A key may appear several times in a batch; the result is one whole value."""
        h = backend_harness
        key = h.key()
        first, second = h.blob(5000), h.blob(6000)

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, first), (key, second)]) == [True, True]
            got = await backend.get_many([key, key])
            winner = first if got[0] is not None and got[0].nbytes == first.nbytes else second
            for blob in got:
                assert_blob(blob, winner, "a key written twice in one batch")
            assert await backend.contains_many([key, key]) == [True, True]
            deleted = await backend.delete_many([key, key])
            assert len(deleted) == 2 and deleted[0] is True
            assert await backend.contains_many([key]) == [False]

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
                assert await backend.get_many([]) == []
                assert await backend.put_many([]) == []
                assert await backend.put_many([], PutMode.CREATE) == []
                assert await backend.contains_many([]) == []
                assert await backend.delete_many([]) == []
            assert await backend.contains_many([key]) == [True]

        h.run(body)

    def test_mixed_hits_and_misses(self, backend_harness: BackendHarness) -> None:
        """Hits and misses in one batch: blobs where stored, ``None``/``False`` elsewhere."""
        h = backend_harness
        (k1, b1), (k2, b2) = h.items([1000, 2000])
        miss = h.key()

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(k1, b1), (k2, b2)]) == [True, True]
            got = await backend.get_many([k1, miss, k2, miss])
            assert got[1] is None and got[3] is None
            assert_blob(got[0], b1, "first hit")
            assert_blob(got[2], b2, "second hit")
            assert await backend.contains_many([miss, k1, miss, k2]) == [False, True, False, True]

        h.run(body)

    def test_miss_is_not_an_error(self, backend_harness: BackendHarness) -> None:
        """A missing key is ``None`` or ``False`` from every method, never an exception."""
        h = backend_harness
        key, buf = h.key(), h.blob(10)

        async def body(backend: Backend) -> None:
            assert await backend.get_many([key]) == [None]
            assert await backend.contains_many([key]) == [False]
            assert await backend.delete_many([key]) == [False]
            assert await backend.put_many([(key, buf)]) == [True]
            assert await backend.delete_many([key]) == [True]
            assert await backend.delete_many([key]) == [False]
            assert await backend.get_many([key]) == [None]

        h.run(body)

    # -- put modes and buffer ownership ------------------------------------------------

    def test_create_keeps_existing_value(self, backend_harness: BackendHarness) -> None:
        """``CREATE`` stores an absent key and never replaces an existing one."""
        h = backend_harness
        key, old, new = h.key(), h.blob(3000), h.blob(4000)

        async def body(backend: Backend) -> None:
            require(backend, "create_mode")
            assert await backend.put_many([(key, old)], PutMode.CREATE) == [True]
            assert await backend.put_many([(key, new)], PutMode.CREATE) == [False]
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

    def test_put_does_not_take_ownership(self, backend_harness: BackendHarness) -> None:
        """The caller may release a buffer once ``put_many`` returns; the value stays."""
        h = backend_harness
        key, buf = h.key(), h.blob(3 * 4096 + 5)
        want = bytes(buf.view)

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, buf)]) == [True]
            assert buf.refcount >= 1, "put_many released the caller's reference"
            buf.release()
            h.clobber_freed(len(want))
            [got] = await backend.get_many([key])
            assert_blob(got, want, "value after the caller released its buffer")

        h.run(body)

    def test_returned_buffers_belong_to_caller(self, backend_harness: BackendHarness) -> None:
        """Each buffer ``get_many`` returns carries its own reference for the caller."""
        h = backend_harness
        key, buf = h.key(), h.blob(20_000)
        want = bytes(buf.view)

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, buf)]) == [True]
            first, second = await backend.get_many([key, key])
            assert first is not None and second is not None
            first.release()
            buf.release()
            h.clobber_freed(len(want))
            assert_blob(second, want, "a returned buffer after another was released")
            [third] = await backend.get_many([key])
            assert_blob(third, want, "a later read")

        h.run(body)

    @pytest.mark.parametrize("change", ["overwrite", "delete"])
    def test_returned_buffer_survives_change(
        self, backend_harness: BackendHarness, change: str
    ) -> None:
        """A buffer read earlier keeps its bytes when the key is overwritten or deleted."""
        h = backend_harness
        key, buf, new = h.key(), h.blob(50_000), h.blob(50_000)
        want = bytes(buf.view)

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, buf)]) == [True]
            [got] = await backend.get_many([key])
            buf.release()
            if change == "overwrite":
                assert await backend.put_many([(key, new)]) == [True]
            else:
                assert await backend.delete_many([key]) == [True]
            h.clobber_freed(len(want))
            assert_blob(got, want, f"a buffer read before the {change}")
            [after] = await backend.get_many([key])
            if change == "overwrite":
                assert_blob(after, new, "the new value")
            else:
                assert after is None

        h.run(body)

    def test_close_releases_buffers(self, backend_harness: BackendHarness) -> None:
        """After ``close()`` the backend holds no reference to any buffer it was given."""
        h = backend_harness
        items = h.items([10, 5000, 70_000])

        async def body(backend: Backend) -> None:
            assert await backend.put_many(items) == [True] * 3
            for got in await backend.get_many([key for key, _ in items]):
                assert got is not None
                got.release()
            await backend.close()
            refs = [buf.refcount for _, buf in items]
            assert refs == [1, 1, 1], f"buffer references after close() (caller's = 1): {refs}"

        h.run(body)

    def test_persistence(self, backend_harness: BackendHarness) -> None:
        """A persistent backend serves its data again after close and reopen."""
        h = backend_harness
        items = h.items([0, 1, 5000, 300_000])

        async def body(backend: Backend) -> None:
            require(backend, "persistent")
            assert await backend.put_many(items) == [True] * len(items)
            await backend.close()
            reopened = await h.open()
            try:
                got = await reopened.get_many([key for key, _ in items])
                for (key, buf), blob in zip(items, got, strict=True):
                    assert_blob(blob, buf, f"{key} after reopening")
                if reopened.capabilities.listing:
                    listed = await collect(reopened.iter_keys(h.prefix))
                    assert sorted(listed) == sorted(key for key, _ in items)
            finally:
                await reopened.close()

        h.run(body)

    # -- concurrency and cancellation --------------------------------------------------

    def test_concurrent_puts_on_overlapping_keys(self, backend_harness: BackendHarness) -> None:
        """Concurrent writers of the same keys leave each key with one whole value.

        Readers running alongside see, for each key, nothing or one whole value.
        """
        h = backend_harness
        keys = [h.key() for _ in range(8)]
        writers = 12
        # Writer w writes 16 KiB * (w + 1) + i bytes to key i: the size names the writer.
        values = [[h.blob(16_384 * (w + 1) + i) for i in range(len(keys))] for w in range(writers)]
        by_size = [{row[i].nbytes: row[i] for row in values} for i in range(len(keys))]

        def check(i: int, got: Buffer | None, what: str) -> None:
            assert got is not None, f"{what}: key {i} missing"
            want = by_size[i].get(got.nbytes)
            assert want is not None, f"{what}: key {i} has {got.nbytes} bytes, no writer's size"
            assert_blob(got, want, f"{what}: key {i}")

        async def body(backend: Backend) -> None:
            async def write(w: int) -> None:
                order = random.sample(range(len(keys)), len(keys))
                result = await backend.put_many([(keys[i], values[w][i]) for i in order])
                assert result == [True] * len(keys)

            async def read() -> None:
                for _ in range(5):
                    for i, got in enumerate(await backend.get_many(keys)):
                        if got is not None:
                            check(i, got, "concurrent read")
                    await asyncio.sleep(0)

            await asyncio.gather(*(write(w) for w in range(writers)), *(read() for _ in range(4)))
            for i, got in enumerate(await backend.get_many(keys)):
                check(i, got, "after the writers")

        h.run(body)

    def test_cancelled_put_leaves_keys_absent_or_complete(
        self, backend_harness: BackendHarness
    ) -> None:
        """Cancelling ``put_many`` at any point leaves each key absent or whole."""
        h = backend_harness
        size = 256 * 1024 if h.capacity is None else min(256 * 1024, h.capacity // 64)
        blobs = [h.blob(size + i) for i in range(16)]

        async def body(backend: Backend) -> None:
            for steps in (0, 1, 2, 5, 20):
                items = [(h.key(), blob) for blob in blobs]
                task = asyncio.create_task(backend.put_many(items))
                for _ in range(steps):
                    await asyncio.sleep(0)
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                got = await backend.get_many([key for key, _ in items])
                for (key, want), blob in zip(items, got, strict=True):
                    if blob is not None:
                        assert_blob(blob, want, f"{key} after cancelling at step {steps}")
            key, buf = h.key(), h.blob(4097)
            assert await backend.put_many([(key, buf)]) == [True]
            [after] = await backend.get_many([key])
            assert_blob(after, buf, "a write after the cancellations")

        h.run(body)

    # -- capacity and eviction ---------------------------------------------------------

    def test_eviction_keeps_within_capacity(self, backend_harness: BackendHarness) -> None:
        """Writing 2.5x the capacity evicts, reports each eviction, and stays bounded."""
        h = backend_harness
        evicted: list[tuple[str, int]] = []

        async def body(backend: Backend) -> None:
            capacity = require_capacity(backend)
            size = capacity // 8
            blob = h.blob(size)
            backend.eviction_listener = evicted.extend
            before = await backend.stats()
            written = []
            for _ in range(20):
                key = h.key()
                assert await backend.put_many([(key, blob)]) == [True]
                written.append(key)
                assert await backend.contains_many([key]) == [True], "latest write missing"
                used = (await backend.stats()).bytes_used
                assert used is None or used <= capacity, f"{used} bytes used > {capacity}"
            after = await backend.stats()
            assert evicted, "2.5x the capacity was written but the eviction listener never ran"
            assert after.evictions - before.evictions == len(evicted)
            ours = {key for key, _ in evicted} & set(written)
            assert ours, "no key of this test was evicted"
            for key, nbytes in evicted:
                if key in ours:
                    assert nbytes == size, f"eviction of {key} reported {nbytes} bytes"
            present = dict(zip(written, await backend.contains_many(written), strict=True))
            assert not any(present[key] for key in ours), "an evicted key is still present"
            assert sum(present.values()) <= capacity // size
            [got] = await backend.get_many([written[-1]])
            assert_blob(got, blob, "the most recent write")

        h.run(body)

    def test_oversize_blob_rejected(self, backend_harness: BackendHarness) -> None:
        """A blob larger than the capacity is refused with ``False``, evicting nothing."""
        h = backend_harness
        (k1, b1), (k2, b2) = h.items([1000, 2000])
        big_key = h.key()

        async def body(backend: Backend) -> None:
            capacity = require_capacity(backend)
            big = h.pool.acquire(capacity + 1)  # contents do not matter
            assert await backend.put_many([(k1, b1)]) == [True]
            assert await backend.put_many([(big_key, big)]) == [False]
            result = await backend.put_many([(big_key, big), (k2, b2)], PutMode.CREATE)
            assert result == [False, True]
            assert await backend.contains_many([big_key, k1, k2]) == [False, True, True]

        h.run(body)

    # -- listing, contains, delete, stats ----------------------------------------------

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
            assert {key for key, _ in [*ours, *others]} <= set(everything)
            assert sorted(await collect(backend.iter_keys(h.prefix))) == sorted(k for k, _ in ours)
            other_prefix = f"{NAMESPACE}.{other_tag.hex()}"
            listed = await collect(backend.iter_keys(other_prefix))
            assert sorted(listed) == sorted(k for k, _ in others)
            assert await collect(backend.iter_keys(ours[0][0])) == [ours[0][0]]
            assert await backend.delete_many([ours[0][0]]) == [True]
            listed = await collect(backend.iter_keys(h.prefix))
            assert sorted(listed) == sorted(k for k, _ in ours[1:])

        h.run(body)

    def test_contains_and_delete(self, backend_harness: BackendHarness) -> None:
        """``contains_many`` and ``delete_many`` track exactly what is stored."""
        h = backend_harness
        (k1, b1), (k2, b2), (k3, b3) = h.items([100, 200, 300])
        miss = h.key()

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(k1, b1), (k2, b2), (k3, b3)]) == [True] * 3
            assert await backend.contains_many([k1, k2, k3, miss]) == [True, True, True, False]
            assert await backend.delete_many([k2, miss]) == [True, False]
            assert await backend.contains_many([k1, k2, k3, miss]) == [True, False, True, False]
            got = await backend.get_many([k1, k2, k3])
            assert got[1] is None
            assert_blob(got[0], b1, "k1")
            assert_blob(got[2], b3, "k3")
            assert await backend.delete_many([k1, k2, k3]) == [True, False, True]
            assert await backend.contains_many([k1, k2, k3]) == [False, False, False]

        h.run(body)

    def test_stats(self, backend_harness: BackendHarness) -> None:
        """``stats()`` counts stored keys and bytes and returns to them after deletes."""
        h = backend_harness
        items = h.items([100, 5000, 70_000])
        total = sum(buf.nbytes for _, buf in items)

        def check_sane(stats: BackendStats, backend: Backend) -> None:
            assert isinstance(stats, BackendStats)
            assert stats.keys is None or stats.keys >= 0
            assert stats.bytes_used is None or stats.bytes_used >= 0
            assert isinstance(stats.evictions, int) and stats.evictions >= 0
            assert isinstance(stats.details, dict)
            if backend.capabilities.bounded and stats.capacity_bytes is not None:
                assert stats.capacity_bytes == backend.capacity

        async def body(backend: Backend) -> None:
            before = await backend.stats()
            check_sane(before, backend)
            assert await backend.put_many(items) == [True] * len(items)
            full = await backend.stats()
            check_sane(full, backend)
            if before.keys is not None and full.keys is not None:
                assert full.keys - before.keys == len(items)
            if before.bytes_used is not None and full.bytes_used is not None:
                assert full.bytes_used - before.bytes_used >= total
            assert await backend.delete_many([key for key, _ in items]) == [True] * len(items)
            after = await backend.stats()
            check_sane(after, backend)
            assert (after.keys, after.bytes_used) == (before.keys, before.bytes_used)

        h.run(body)

    # -- errors ------------------------------------------------------------------------

    @pytest.mark.parametrize(
        "bad_key", INVALID_KEYS, ids=["dotdot", "slash", "empty", "too-long", "hidden"]
    )
    def test_invalid_key_rejected(self, backend_harness: BackendHarness, bad_key: str) -> None:
        """Every method raises ``ConfigError`` for an invalid key, alone or in a batch."""
        h = backend_harness
        good, buf = h.key(), h.blob(100)

        async def body(backend: Backend) -> None:
            for name, call in keyed_calls(backend, bad_key, buf).items():
                await expect_error(ConfigError, f"{name} with key {bad_key[:20]!r}", call)
            mixed = {
                "get_many": lambda: backend.get_many([good, bad_key]),
                "put_many": lambda: backend.put_many([(good, buf), (bad_key, buf)]),
                "contains_many": lambda: backend.contains_many([good, bad_key]),
                "delete_many": lambda: backend.delete_many([good, bad_key]),
            }
            for name, call in mixed.items():
                await expect_error(ConfigError, f"{name} with a valid and an invalid key", call)
            assert await backend.put_many([(good, buf)]) == [True]
            [got] = await backend.get_many([good])
            assert_blob(got, buf, "a valid key after the rejected calls")

        h.run(body)

    def test_closed_backend_is_unavailable(self, backend_harness: BackendHarness) -> None:
        """After ``close()`` (which may be repeated) every method raises
        ``BackendUnavailableError``."""
        h = backend_harness
        key, buf = h.key(), h.blob(100)

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, buf)]) == [True]
            await backend.close()
            await backend.close()
            calls = keyed_calls(backend, key, buf)
            calls["iter_keys"] = lambda: collect(backend.iter_keys())
            calls["stats"] = backend.stats
            for name, call in calls.items():
                await expect_error(BackendUnavailableError, f"{name} after close()", call)

        h.run(body)

    def test_stopped_server_is_unavailable(self, backend_harness: BackendHarness) -> None:
        """With its server stopped, every batch method raises ``BackendUnavailableError``."""
        if type(self).stop_server is BackendConformance.stop_server:
            pytest.skip("the test class does not override stop_server(url)")
        h = backend_harness
        key, buf = h.key(), h.blob(100)

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, buf)]) == [True]
            self.stop_server(h.url)
            for name, call in keyed_calls(backend, key, buf).items():
                await expect_error(BackendUnavailableError, f"{name} with the server down", call)

        h.run(body)
