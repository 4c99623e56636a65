"""Conformance tests of concurrent and cancelled calls."""

from __future__ import annotations

import asyncio
import contextlib
import random

from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import Buffer
from kvtier.core.testing.base import SuiteBase
from kvtier.core.testing.harness import BackendHarness, assert_blob, require

CREATORS = 16
"""Tasks that ``CREATE`` one key at once in ``test_concurrent_create_has_one_winner``."""


class ConcurrencyTests(SuiteBase):
    """Concurrent writers, readers and creators, and cancellation, leave whole values."""

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
                assert result == [True] * len(keys), f"a concurrent put_many returned {result}"

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

    def test_concurrent_create_has_one_winner(self, backend_harness: BackendHarness) -> None:
        """Many tasks ``CREATE`` one key at once: exactly one gets ``True``, and the stored
        value is that writer's. With ``shared``, also across two instances of the store."""
        h = backend_harness

        async def contend(backends: list[Backend], where: str) -> None:
            key = h.key()
            # Over 64 KiB (redis splits such values); the size names the writer.
            values = [h.blob(100_000 + w) for w in range(CREATORS)]
            results = await asyncio.gather(
                *(
                    backends[w % len(backends)].put_many([(key, value)], PutMode.CREATE)
                    for w, value in enumerate(values)
                )
            )
            winners = [w for w, result in enumerate(results) if result == [True]]
            assert len(winners) == 1, (
                f"{where}: {len(winners)} of {CREATORS} concurrent CREATEs of one key "
                f"returned True: {[r for result in results for r in result]}"
            )
            for backend in backends:
                [got] = await backend.get_many([key])
                assert_blob(got, values[winners[0]], f"{where}: the value after the CREATE race")

        async def body(backend: Backend) -> None:
            require(backend, "create_mode")
            await contend([backend], "one instance")
            if backend.capabilities.shared:
                other = await h.open()
                try:
                    await contend([backend, other], "two instances")
                finally:
                    await other.close()

        h.run(body)
