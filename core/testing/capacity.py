"""Conformance tests of bounded backends: eviction, oversize blobs and demotion."""

from __future__ import annotations

import os

from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import Buffer
from kvtier.core.testing.base import SuiteBase
from kvtier.core.testing.harness import BackendHarness, assert_blob, require, require_capacity


class CapacityTests(SuiteBase):
    """Bounded backends stay within capacity and account for what they evict."""

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
            assert after.evictions - before.evictions == len(evicted), (
                f"stats counted {after.evictions - before.evictions} evictions, "
                f"the listener heard of {len(evicted)}"
            )
            ours = {key for key, _ in evicted} & set(written)
            assert ours, "no key of this test was evicted"
            for key, nbytes in evicted:
                if key in ours:
                    assert nbytes == size, f"eviction of {key} reported {nbytes} bytes"
            present = dict(zip(written, await backend.contains_many(written), strict=True))
            assert not any(present[key] for key in ours), "an evicted key is still present"
            assert sum(present.values()) <= capacity // size, "more keys present than fit"
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
            refused = await backend.put_many([(big_key, big)])
            assert refused == [False], f"put_many of a blob over capacity returned {refused}"
            result = await backend.put_many([(big_key, big), (k2, b2)], PutMode.CREATE)
            assert result == [False, True], f"CREATE of [oversize, small] returned {result}"
            found = await backend.contains_many([big_key, k1, k2])
            assert found == [False, True, True], (
                f"contains_many([oversize, earlier, later]) after oversize puts: {found}"
            )

        h.run(body)

    def test_demotion_hands_over_evicted_blobs(self, backend_harness: BackendHarness) -> None:
        """Evicted blobs reach ``demotion_sink`` with their exact bytes, once each, with
        one reference each (the sink's), and the backend keeps none of them."""
        h = backend_harness

        async def body(backend: Backend) -> None:
            require(backend, "hands_over_evictions")
            capacity = require_capacity(backend)
            size = capacity // 8
            base = os.urandom(size)

            def blob(i: int) -> bytes:  # distinct values that share most of their bytes
                return i.to_bytes(8, "little") + base[8:]

            evicted: list[tuple[str, int]] = []
            sunk: list[tuple[str, Buffer]] = []
            backend.eviction_listener = evicted.extend
            backend.demotion_sink = sunk.extend
            written: dict[str, int] = {}
            demoted: set[str] = set()
            for i in range(12):  # 1.5x the capacity: four evictions or more
                key = h.key()
                buf = h.pool.copy_of(blob(i))
                assert await backend.put_many([(key, buf)]) == [True]
                buf.release()  # the backend keeps its own reference or copy
                written[key] = i
                for victim, got in sunk:
                    refs = got.refcount
                    assert refs == 1, f"a blob reached demotion_sink with {refs} references, not 1"
                    if victim in written:  # a shared store may evict others' keys too
                        assert victim not in demoted, f"{victim} reached demotion_sink twice"
                        demoted.add(victim)
                        assert_blob(got, blob(written[victim]), f"demoted blob {victim}")
                    got.release()
                sunk.clear()
            ours = {key for key, _ in evicted} & set(written)
            assert ours, "1.5x the capacity was written but nothing was evicted"
            assert demoted == ours, (
                f"{len(ours - demoted)} evicted blobs never reached demotion_sink, "
                f"{len(demoted - ours)} demoted blobs were not reported evicted"
            )
            present = await backend.contains_many(sorted(demoted))
            assert not any(present), "a demoted key is still present in the backend"

        h.run(body)
