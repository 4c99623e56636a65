"""Worker threads for a backend's blocking calls, so that the event loop never blocks.

File syscalls and client libraries without asyncio (boto3, Mooncake, NIXL) run in a
:class:`BlockingPool` private to one backend. A thread cannot be interrupted: when
the task awaiting a call is cancelled, the call still runs to its end, and whatever
it returns (buffers it filled, say) goes to an ``orphan`` callback instead of being
lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from kvtier.core.errors import BackendUnavailableError
from kvtier.core.threads import bound_executor, thread_cpus

T = TypeVar("T")
Orphan = Callable[[Any], None]
"""Receives the result of a call nobody awaits any more (to release what it holds)."""


def _hand_over(future: Future[Any], orphan: Orphan) -> None:
    if not future.cancelled() and future.exception() is None:
        orphan(future.result())


class BlockingPool:
    """``threads`` worker threads named after ``owner`` (a tier URL, for errors).

    Bounds the blocking calls one backend has in flight. The threads run on the CPUs
    of the thread that created the pool, whichever thread's call starts them
    (:mod:`kvtier.core.threads`). After :meth:`shutdown` every call raises
    :class:`BackendUnavailableError`.
    """

    def __init__(self, owner: str, threads: int, *, name: str = "kvtier-io") -> None:
        if threads < 1:
            raise ValueError(f"a BlockingPool needs at least one thread, got {threads}")
        self.owner = owner
        self.threads = threads
        self._executor: ThreadPoolExecutor | None = bound_executor(threads, name, thread_cpus())

    def submit(self, call: Callable[[], T]) -> Future[T]:
        """Start ``call()`` in a worker thread; for callers that track futures themselves."""
        if self._executor is None:
            raise BackendUnavailableError(f"{self.owner}: backend is closed")
        try:
            return self._executor.submit(call)
        except RuntimeError:  # shut down by a concurrent shutdown()
            raise BackendUnavailableError(f"{self.owner}: backend is closed") from None

    async def run(self, call: Callable[[], T], *, orphan: Orphan | None = None) -> T:
        """The result of ``call()`` run in a worker thread. If the awaiting task is
        cancelled, the call still finishes and ``orphan`` receives its result."""
        future = self.submit(call)
        try:
            # Shielded: cancelling the awaiting task must not cancel a call still queued.
            return await asyncio.shield(asyncio.wrap_future(future))
        except asyncio.CancelledError:
            if orphan is not None:
                future.add_done_callback(lambda f: _hand_over(f, orphan))
            raise

    async def run_all(
        self, calls: Sequence[Callable[[], T]], *, orphan: Orphan | None = None
    ) -> list[T]:
        """Results of ``calls`` run in parallel, in order. If one fails, the others
        still finish, their results go to ``orphan`` and the first failure is raised;
        likewise every result when the awaiting task is cancelled."""
        if not calls:
            return []
        futures: list[Future[T]] = []
        try:
            for call in calls:
                futures.append(self.submit(call))
        except BackendUnavailableError:  # shut down meanwhile: the ones started run on
            if orphan is not None:
                for future in futures:
                    future.add_done_callback(lambda f: _hand_over(f, orphan))
            raise
        waiting = [asyncio.wrap_future(f) for f in futures]
        try:
            await asyncio.wait(waiting)
        except asyncio.CancelledError:
            if orphan is not None:
                for future in futures:
                    future.add_done_callback(lambda f: _hand_over(f, orphan))
            raise
        failures = [e for e in (w.exception() for w in waiting) if e is not None]
        if failures:
            if orphan is not None:
                for future in futures:
                    _hand_over(future, orphan)
            raise failures[0]
        return [w.result() for w in waiting]

    async def shutdown(self) -> None:
        """Refuse new calls and wait (without blocking the loop) for running ones."""
        executor, self._executor = self._executor, None
        if executor is not None:
            await asyncio.get_running_loop().run_in_executor(None, executor.shutdown)
