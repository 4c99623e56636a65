"""The CPUs kvtier's own threads run on.

A new thread starts bound to the CPUs of the thread that starts it. Engines bind their
compute threads to cores: vLLM's CPU backend binds OpenMP's threads, its main thread
included, and that main thread busy-waits between steps. Threads kvtier started from
it would share its one core: on a 2-core host a NIXL agent's UCX thread started there
stayed runnable and unscheduled for 15 s while two engines' main threads spun, so the
agent never accepted its peers' connections. kvtier therefore starts its threads (the
I/O loop, codec and backend pools and what they start, the event publisher, the vLLM
connector's loaders and lookup server) on the CPUs of the config's ``thread_cpus``:

* ``process`` (the default): every CPU this process may use, whatever its threads are
  bound to: those of the process that started it and those of the calling thread;
* ``inherit``: those of the thread that opens the ``KVTier``;
* a list of CPU numbers: those of them this process may use (vLLM's reserved cores,
  say). None of them usable is a :class:`~kvtier.core.errors.ConfigError`.

Binding is Linux's ``sched_setaffinity``; elsewhere threads stay where they start.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import PlainValidator

from kvtier.core.errors import ConfigError

log = logging.getLogger(__name__)

_CPU_LIST = re.compile(r"\d+(-\d+)?(,\d+(-\d+)?)*")


def _thread_cpus(value: Any) -> str | list[int]:
    """``process``, ``inherit``, or CPU numbers: a list or Linux's list text (``0-3,8``)."""
    if value in ("process", "inherit"):
        return str(value)
    if isinstance(value, str) and _CPU_LIST.fullmatch(value.replace(" ", "")):
        spans = [part.split("-") for part in value.replace(" ", "").split(",")]
        value = [cpu for span in spans for cpu in range(int(span[0]), int(span[-1]) + 1)]
    if (
        isinstance(value, list)
        and value
        and all(isinstance(cpu, int) and not isinstance(cpu, bool) and cpu >= 0 for cpu in value)
    ):
        return sorted(set(value))
    raise ValueError(
        "thread_cpus must be 'process', 'inherit', or CPU numbers: a list such as [0, 1] "
        "or text such as '0-3,8'"
    )


ThreadCpus: TypeAlias = Annotated[
    Literal["process", "inherit"] | list[int], PlainValidator(_thread_cpus)
]
"""The config's ``thread_cpus``."""
Cpus: TypeAlias = frozenset[int] | None
"""CPUs to bind threads to; ``None``: leave them where they start."""

_SUPPORTED = hasattr(os, "sched_setaffinity")


def cpu_list(cpus: Iterable[int]) -> str:
    """``cpus`` as ranges, as Linux writes them: ``0-3,8``."""
    ranges: list[list[int]] = []
    for cpu in sorted(cpus):
        if ranges and cpu == ranges[-1][1] + 1:
            ranges[-1][1] = cpu
        else:
            ranges.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in ranges)


def process_cpus() -> frozenset[int]:
    """Every CPU this process may run on: those of its parent and of the calling thread
    (a thread bound to fewer CPUs, as engines bind theirs, does not narrow it)."""
    cpus = set(os.sched_getaffinity(0))
    with suppress(OSError):  # the parent is gone, or another user's
        cpus |= os.sched_getaffinity(os.getppid())
    return frozenset(cpus)


def resolve_cpus(setting: ThreadCpus) -> Cpus:
    """The CPUs ``thread_cpus`` names here; ``None`` for ``inherit`` or where threads
    cannot be bound."""
    if setting == "inherit" or not _SUPPORTED:
        return None
    allowed = process_cpus()
    if setting == "process":
        return allowed
    usable = allowed.intersection(setting)
    if not usable:
        raise ConfigError(
            f"thread_cpus {setting}: this process may only run on CPUs {cpu_list(allowed)}; "
            f"name some of those, or use 'process' (every one of them)"
        )
    return frozenset(usable)


def thread_cpus() -> Cpus:
    """The calling thread's CPUs; ``None`` where threads cannot be bound."""
    return frozenset(os.sched_getaffinity(0)) if _SUPPORTED else None


def bind_thread(cpus: Cpus) -> None:
    """Bind the calling thread to ``cpus`` (nothing if ``None``). A failure is logged:
    the thread then runs where it started."""
    if cpus is None or not _SUPPORTED:
        return
    try:
        os.sched_setaffinity(0, cpus)
    except OSError as exc:
        log.warning("kvtier could not bind a thread to CPUs %s: %s", cpu_list(cpus), exc)


def bound_executor(threads: int, name: str, cpus: Cpus) -> ThreadPoolExecutor:
    """A pool of ``threads`` threads named ``name`` that bind themselves to ``cpus`` as
    they start, whichever thread's ``submit`` starts them."""
    return ThreadPoolExecutor(
        threads, thread_name_prefix=name, initializer=bind_thread, initargs=(cpus,)
    )


@contextmanager
def starting_on(cpus: Cpus) -> Iterator[None]:
    """Threads started inside the block run on ``cpus``: the calling thread is bound to
    them for the block, then bound back to its own CPUs."""
    own = thread_cpus()
    bind_thread(cpus)
    try:
        yield
    finally:
        if cpus is not None:
            bind_thread(own)
