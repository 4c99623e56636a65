"""Conformance tests that look at the store from outside the backend under test.

Through the test class's ``raw_write``/``raw_read`` hooks, writes are checked without
the backend's read path and reads without its write path (as zarr's store tests do),
so a backend whose bugs cancel out on a round trip (bytes mangled on the way in and
unmangled on the way out, an index of its own that shadows the store) fails. Through
a second instance of the same URL, a ``shared`` store must show each instance what
the other did.
"""

from __future__ import annotations

import os

from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import release_all
from kvtier.core.testing.base import SuiteBase
from kvtier.core.testing.harness import (
    BackendHarness,
    MiB,
    assert_blob,
    collect,
    require,
)

RAW_SIZES = (0, 1, 4097, 100_000, MiB + 3)
"""Value sizes written and read out of band (100 000 > the 64 KiB redis split size)."""
NO_RAW = ": no out-of-band access to the store (a live store under test has none)"


class OutOfBandTests(SuiteBase):
    """What the store holds, seen through the raw hooks and through a second instance."""

    def test_put_writes_exact_bytes(self, backend_harness: BackendHarness) -> None:
        """What ``put_many`` (``OVERWRITE``, ``CREATE``, a resize) stores is, byte for byte,
        what ``raw_read`` finds in the store."""
        self.require_hooks("raw_read", why=NO_RAW)
        h = backend_harness
        items = h.items(RAW_SIZES)
        created, fresh, smaller, never = h.key(), h.blob(3000), h.blob(50), h.key()

        async def body(backend: Backend) -> None:
            assert await backend.put_many(items) == [True] * len(items)
            for key, buf in items:
                raw = self.raw_read(backend, key)
                assert_blob(raw, buf, f"raw_read of a {buf.nbytes}-byte put_many")
            if backend.capabilities.create_mode:
                assert await backend.put_many([(created, fresh)], PutMode.CREATE) == [True]
                assert_blob(self.raw_read(backend, created), fresh, "raw_read of a CREATE")
            key, _ = items[2]
            assert await backend.put_many([(key, smaller)]) == [True]
            assert_blob(self.raw_read(backend, key), smaller, "raw_read after a smaller overwrite")
            assert self.raw_read(backend, never) is None, "raw_read found a key never written"

        h.run(body)

    def test_reads_see_raw_writes(self, backend_harness: BackendHarness) -> None:
        """``get_many``, ``contains_many`` and ``iter_keys`` report what ``raw_write`` put
        in the store after the backend opened."""
        self.require_hooks("raw_write", why=NO_RAW)
        h = backend_harness
        data = {h.key(): os.urandom(n) for n in RAW_SIZES}
        miss = h.key()

        async def body(backend: Backend) -> None:
            for key, value in data.items():
                self.raw_write(backend, key, value)
            for _ in range(2):
                got = await backend.get_many([*data, miss])
                for value, blob in zip(data.values(), got[:-1], strict=True):
                    assert_blob(blob, value, f"get_many of a {len(value)}-byte raw write")
                assert got[-1] is None, "get_many returned a blob for a key never written"
                release_all(got)
            found = await backend.contains_many([miss, *data])
            assert found == [False] + [True] * len(data), (
                f"contains_many of a miss and raw-written keys returned {found}"
            )
            if backend.capabilities.listing:
                listed = await collect(backend.iter_keys(h.prefix))
                assert sorted(listed) == sorted(data), (
                    f"iter_keys listed {len(set(listed) & set(data))} of {len(data)} "
                    f"raw-written keys and {len(set(listed) - set(data))} others"
                )

        h.run(body)

    def test_delete_removes_from_store(self, backend_harness: BackendHarness) -> None:
        """``delete_many`` removes raw-written and put keys from the store itself."""
        self.require_hooks("raw_write", "raw_read", why=NO_RAW)
        h = backend_harness
        raw_key, put_key, miss = h.key(), h.key(), h.key()
        buf = h.blob(70_000)

        async def body(backend: Backend) -> None:
            data = os.urandom(5000)
            self.raw_write(backend, raw_key, data)
            assert self.raw_read(backend, raw_key) == data, (
                "the test class's raw_read does not return what its raw_write stored"
            )
            assert await backend.put_many([(put_key, buf)]) == [True]
            deleted = await backend.delete_many([raw_key, miss, put_key])
            assert deleted == [True, False, True], (
                f"delete_many([raw-written, missing, put]) returned {deleted}"
            )
            for what, key in (("a raw-written", raw_key), ("a put", put_key)):
                assert self.raw_read(backend, key) is None, (
                    f"{what} key is still in the store after delete_many"
                )

        h.run(body)

    def test_create_refuses_raw_written_key(self, backend_harness: BackendHarness) -> None:
        """``CREATE`` of a key that ``raw_write`` stored returns ``False`` and leaves the
        stored bytes alone."""
        self.require_hooks("raw_write", "raw_read", why=NO_RAW)
        h = backend_harness
        key, old = h.key(), os.urandom(100_000)
        new = h.blob(3000)

        async def body(backend: Backend) -> None:
            require(backend, "create_mode")
            self.raw_write(backend, key, old)
            refused = await backend.put_many([(key, new)], PutMode.CREATE)
            assert refused == [False], f"CREATE of a raw-written key returned {refused}"
            assert_blob(self.raw_read(backend, key), old, "raw_read after a refused CREATE")

        h.run(body)

    def test_shared_instances_see_each_other(self, backend_harness: BackendHarness) -> None:
        """Two instances on one URL see each other's writes, deletes and ``CREATE``s, each
        right after the other's call returns."""
        h = backend_harness
        (key, value), (created, first) = h.items([5000, 100_000])
        second = h.blob(3000)

        async def body(a: Backend) -> None:
            require(a, "shared")
            b = await h.open()
            try:
                # b looks first: a cached miss would hide a's write.
                assert await b.get_many([key]) == [None]
                assert await b.contains_many([key]) == [False]
                assert await a.put_many([(key, value)]) == [True]
                [got] = await b.get_many([key])
                assert_blob(got, value, "another instance's write")
                found = await b.contains_many([key])
                assert found == [True], f"contains_many of another instance's write: {found}"
                if b.capabilities.listing:
                    listed = await collect(b.iter_keys(h.prefix))
                    assert listed == [key], f"iter_keys listed {listed}, not another's write"
                # b has read the key: a cached hit would outlive a's delete.
                assert await a.delete_many([key]) == [True]
                [gone] = await b.get_many([key])
                assert gone is None, "get_many returned a key another instance deleted"
                found = await b.contains_many([key])
                assert found == [False], f"contains_many of a key another deleted: {found}"
                if b.capabilities.create_mode:
                    assert await a.put_many([(created, first)], PutMode.CREATE) == [True]
                    refused = await b.put_many([(created, second)], PutMode.CREATE)
                    assert refused == [False], (
                        f"CREATE of a key another instance created returned {refused}"
                    )
                    for where, backend in (("this", a), ("the other", b)):
                        [got] = await backend.get_many([created])
                        assert_blob(got, first, f"{where} instance, after a refused CREATE")
            finally:
                await b.close()

        h.run(body)
