"""What the conformance tests share: the per-test harness, keys, blobs and assertions.

Every assertion here fails with a message that names what went wrong, so a failing
suite test says why (the meta-tests check those messages).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pytest

from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.keys import ChunkKey

if TYPE_CHECKING:
    from collections.abc import Mapping

    from kvtier.core.testing.base import SuiteBase

T = TypeVar("T")

NAMESPACE = "conformance-0123456789abcdef"
"""Namespace of every key the suite writes."""
MiB = 1 << 20
INVALID_KEYS = ("../x", "a/b", "", "x" * 500, ".hidden")
Call = Callable[[], Awaitable[object]]


@dataclass
class BackendHarness:
    """Builds the backend under test and the keys and blobs a test writes to it."""

    suite: SuiteBase
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


def _view(data: Buffer | bytes) -> memoryview:
    return data.view if isinstance(data, Buffer) else memoryview(data)


def assert_blob(got: Buffer | bytes | None, want: Buffer | bytes, what: str = "blob") -> None:
    """Fail unless ``got`` (a returned buffer or raw stored bytes) is exactly ``want``."""
    assert got is not None, f"{what}: missing (got None)"
    if isinstance(got, Buffer):
        assert got.nbytes == got.view.nbytes, f"{what}: nbytes {got.nbytes} != len(view)"
    actual, expected = _view(got), _view(want)
    assert actual.nbytes == expected.nbytes, (
        f"{what}: got {actual.nbytes} bytes, expected {expected.nbytes}"
    )
    diff = np.flatnonzero(np.frombuffer(actual, np.uint8) != np.frombuffer(expected, np.uint8))
    assert diff.size == 0, f"{what}: {diff.size} bytes differ, the first at offset {diff[0]}"


def same_bytes(got: Buffer | None, want: Buffer | None) -> bool:
    """Whether ``got`` and ``want`` are both ``None`` or hold the same bytes."""
    if got is None or want is None:
        return got is want
    return got.nbytes == want.nbytes and bytes(got.view) == bytes(want.view)


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


async def expect_no_error(what: str, call: Callable[[], Awaitable[T]]) -> T:
    """``await call()``; an exception fails the test with ``what`` in the message."""
    try:
        return await call()
    except Exception as exc:
        pytest.fail(f"{what} raised {exc!r}")


def keyed_calls(backend: Backend, key: str, buf: Buffer) -> dict[str, Call]:
    """Each batch method called with ``key`` (and ``buf``), by name."""
    return {
        "get_many": lambda: backend.get_many([key]),
        "put_many": lambda: backend.put_many([(key, buf)]),
        "put_many(CREATE)": lambda: backend.put_many([(key, buf)], PutMode.CREATE),
        "contains_many": lambda: backend.contains_many([key]),
        "delete_many": lambda: backend.delete_many([key]),
        "read_into_many": lambda: backend.read_into_many([(key, 0, scratch(16))]),
    }


def scratch(nbytes: int) -> memoryview:
    """Writable memory for ``read_into_many`` to read into."""
    return memoryview(bytearray(nbytes))


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
