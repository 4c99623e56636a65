"""Concurrency of the s3 tier above its :class:`~kvtier.core.blocking.BlockingPool`:
the per-key steps of a batch as tasks (:func:`each`), and the blocking calls of one
key's transfer grouped so that what they use is cleaned up once all of them ended
(:class:`Operation`)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from concurrent.futures import Future
from functools import partial
from typing import Any, TypeVar

from kvtier.core.blocking import BlockingPool

A = TypeVar("A")
T = TypeVar("T")


class Operation:
    """The blocking calls one transfer makes (one key's ranged reads, or its upload).

    A call cannot be stopped once it runs, so when the transfer fails or is cancelled,
    what its calls use (a buffer they fill or send from, a response body, an open
    upload) is cleaned up by :meth:`after` once every one of them has ended; calls not
    started yet are dropped.
    """

    def __init__(self, workers: BlockingPool) -> None:
        self._workers = workers
        self._futures: list[Future[Any]] = []

    async def run_all(self, calls: Sequence[Callable[[], T]]) -> list[T]:
        """Results of ``calls`` run in parallel, in order; on the first failure (or
        cancellation) the calls not started are dropped and the failure is raised at
        once, without waiting for those still running."""
        waiting = []
        for call in calls:
            future = self._workers.submit(call)
            self._futures.append(future)
            waiting.append(asyncio.wrap_future(future))
        try:
            return list(await asyncio.gather(*waiting))
        except BaseException:
            for wrapper in waiting:
                wrapper.cancel()  # also drops its call if no thread has taken it yet
            raise

    async def run(self, call: Callable[[], T]) -> T:
        """The result of ``call()``, as :meth:`run_all` runs it."""
        [result] = await self.run_all([call])
        return result

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


async def each(
    items: Sequence[A],
    step: Callable[[A], Coroutine[Any, Any, T]],
    *,
    drop: Callable[[T], None] | None = None,
) -> list[T]:
    """``step(item)`` for every item, run as concurrent tasks; results in order.

    The first failure cancels the other steps and is raised once they have ended
    (promptly: a cancelled step leaves its blocking calls to :meth:`Operation.after`).
    Results nobody receives (after a failure, or when the caller is cancelled) go to
    ``drop``, e.g. to release the buffers they hold.
    """
    tasks = [asyncio.ensure_future(step(item)) for item in items]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            task.cancel()  # a no-op for those done
        await asyncio.wait(tasks)
    except asyncio.CancelledError:
        for task in tasks:
            task.cancel()
            task.add_done_callback(partial(_unwanted, drop))
        raise
    failures = [e for t in tasks if not t.cancelled() and (e := t.exception()) is not None]
    if failures:
        for task in tasks:
            _unwanted(drop, task)
        raise failures[0]
    return [task.result() for task in tasks]


def _unwanted(drop: Callable[[T], None] | None, task: asyncio.Future[T]) -> None:
    """Hand a result nobody receives to ``drop``; mark an exception as retrieved."""
    if not task.cancelled() and task.exception() is None and drop is not None:
        drop(task.result())
