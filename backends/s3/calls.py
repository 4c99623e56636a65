"""Blocking calls of one operation, run on a bounded thread pool for the event loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from kvtier.core.errors import BackendUnavailableError

T = TypeVar("T")


class Calls:
    """The thread-pool calls one operation makes (one key's reads or upload).

    An operation that fails or is cancelled cannot stop a call already running, so
    whatever those calls use (a buffer they fill or send, an open upload) is cleaned
    up by :meth:`after` once every call has ended; calls not started yet are dropped.
    ``owner`` names the tier in errors.
    """

    def __init__(self, executor: ThreadPoolExecutor, owner: str) -> None:
        self._executor = executor
        self._owner = owner
        self._futures: list[Future[Any]] = []

    def _submit(self, call: Callable[[], T]) -> Future[T]:
        try:
            future = self._executor.submit(call)
        except RuntimeError:  # shut down by a concurrent close()
            raise BackendUnavailableError(f"{self._owner}: backend is closed") from None
        self._futures.append(future)
        return future

    async def run(self, call: Callable[[], T], orphan: Callable[[T], None] | None = None) -> T:
        """The result of ``call()``. If the caller is cancelled, ``orphan`` receives the
        result should the call still return one."""
        future = self._submit(call)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if orphan is not None:
                future.add_done_callback(lambda f: _hand_over(f, orphan))
            raise

    async def run_all(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Results of ``calls`` run in parallel; on the first failure the rest are
        abandoned (see :meth:`after`) and the failure is raised."""
        waiting = [asyncio.wrap_future(self._submit(call)) for call in calls]
        try:
            return list(await asyncio.gather(*waiting))
        except BaseException:
            for future in waiting:
                future.cancel()
            raise

    def after(self, cleanup: Callable[[], None]) -> None:
        """Run ``cleanup()`` once every call has ended: now if they have, else in the
        thread that finishes the last one."""
        pending = [f for f in self._futures if not f.done()]
        if not pending:
            cleanup()
            return
        remaining = len(pending)
        lock = threading.Lock()

        def ended(_: Future[Any]) -> None:
            nonlocal remaining
            with lock:
                remaining -= 1
                last = remaining == 0
            if last:
                cleanup()

        for future in pending:
            future.add_done_callback(ended)


def _hand_over(future: Future[T], orphan: Callable[[T], None]) -> None:
    if not future.cancelled() and future.exception() is None:
        orphan(future.result())


async def gather_all(
    awaitables: Sequence[Awaitable[T]], drop: Callable[[T], None] | None = None
) -> list[T]:
    """Results of ``awaitables``, run concurrently. If one fails the others still
    finish, then the first failure is raised; results nobody receives (after a
    failure, or when the caller is cancelled) are handed to ``drop``."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    if not tasks:
        return []
    try:
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
            task.add_done_callback(lambda t: _drop_result(t, drop))
        raise
    failures = [e for e in (t.exception() for t in tasks) if e is not None]
    if failures:
        for task in tasks:
            _drop_result(task, drop)
        raise failures[0]
    return [task.result() for task in tasks]


def _drop_result(task: asyncio.Future[T], drop: Callable[[T], None] | None) -> None:
    """Hand an unwanted result to ``drop``; retrieve an unwanted exception."""
    if not task.cancelled() and task.exception() is None and drop is not None:
        drop(task.result())
