"""BlockingPool: calls run off the loop, finish even when their caller is cancelled,
and hand what they return to ``orphan``."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvtier.core.blocking import BlockingPool
from kvtier.core.errors import BackendUnavailableError


def test_a_call_runs_in_a_worker_thread() -> None:
    async def main() -> str:
        pool = BlockingPool("test://", 1)
        try:
            return await pool.run(lambda: threading.current_thread().name)
        finally:
            await pool.shutdown()

    assert asyncio.run(main()).startswith("kvtier-io")


def test_cancelled_calls_still_run_and_hand_their_results_to_orphan() -> None:
    """One call blocks the only thread; a second waits in the queue. Both callers are
    cancelled: both calls still run, and orphan receives both results."""
    release = threading.Event()
    orphaned: list[str] = []

    async def main() -> None:
        pool = BlockingPool("test://", 1)
        running = asyncio.create_task(
            pool.run(lambda: (release.wait(), "running")[1], orphan=orphaned.append)
        )
        queued = asyncio.create_task(pool.run(lambda: "queued", orphan=orphaned.append))
        await asyncio.sleep(0)
        running.cancel()
        queued.cancel()
        for task in (running, queued):
            with pytest.raises(asyncio.CancelledError):
                await task
        release.set()
        await pool.shutdown()  # waits for both calls

    asyncio.run(main())
    assert sorted(orphaned) == ["queued", "running"]


def test_run_all_hands_the_others_results_to_orphan_on_a_failure() -> None:
    orphaned: list[int] = []

    def fail() -> int:
        raise ValueError("boom")

    async def main() -> None:
        pool = BlockingPool("test://", 2)
        try:
            with pytest.raises(ValueError, match="boom"):
                await pool.run_all([lambda: 1, fail, lambda: 3], orphan=orphaned.append)
            assert await pool.run_all([]) == []
        finally:
            await pool.shutdown()

    asyncio.run(main())
    assert sorted(orphaned) == [1, 3]


def test_a_shut_down_pool_is_unavailable() -> None:
    async def main() -> None:
        pool = BlockingPool("test://x", 1)
        await pool.shutdown()
        await pool.shutdown()  # idempotent
        with pytest.raises(BackendUnavailableError, match="test://x"):
            await pool.run(lambda: None)

    asyncio.run(main())
