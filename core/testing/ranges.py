"""Conformance tests of ranged reads: ``read_into_many`` copies byte ranges of stored
values into the caller's memory, natively or through the base's default."""

from __future__ import annotations

from array import array
from functools import partial
from typing import Any

from kvtier.core.backend import Backend, Read
from kvtier.core.errors import ConfigError
from kvtier.core.testing.base import SuiteBase
from kvtier.core.testing.harness import BackendHarness, assert_blob, expect_error, scratch

RANGE_SIZES = (20_011, 100_000)
"""Values read in ranges: a few KiB, and one over 64 KiB (redis splits those in the
suite's tests, and receives them into pool buffers)."""
FILL = 0x5A
"""What ``out`` holds before a read: bytes past the returned count must keep it."""


def ranges(key: str, size: int) -> list[tuple[str, str, int, int]]:
    """``(what, key, offset, length)`` reads of a ``size``-byte value under ``key``."""
    what = f"{size}-byte value"
    return [
        (f"the start of a {what}", key, 0, 4096),
        (f"the middle of a {what}", key, size // 2 - 77, 1000),
        (f"the end of a {what}", key, size - 300, 300),
        (f"a range spanning the end of a {what}", key, size - 100, 1000),
        (f"a range at the end of a {what}", key, size, 10),
        (f"a range past the end of a {what}", key, size + 5000, 10),
        (f"the whole {what}", key, 0, size),
        (f"more than the whole {what}", key, 0, size + 50),
        (f"an empty range of a {what}", key, 5, 0),
    ]


async def check_reads(
    backend: Backend, cases: list[tuple[str, str, int, int]], values: dict[str, bytes]
) -> None:
    """Read ``cases`` in one batch; each must hold its part of ``values`` (``None``
    where the key is not in ``values``) and leave the rest of its ``out`` alone."""
    outs = [bytearray([FILL]) * length for _, _, _, length in cases]
    reads: list[Read] = [
        (key, offset, memoryview(out)) for (_, key, offset, _), out in zip(cases, outs, strict=True)
    ]
    got = await backend.read_into_many(reads)
    assert len(got) == len(reads), f"read_into_many of {len(reads)} reads gave {len(got)} results"
    for (what, key, offset, length), out, count in zip(cases, outs, got, strict=True):
        value = values.get(key)
        if value is None:
            assert count is None, f"read_into_many of {what} returned {count}, not None"
            assert out == bytearray([FILL]) * length, f"read_into_many of {what} wrote into out"
            continue
        want = value[offset : offset + length]
        assert count == len(want), f"read_into_many of {what} returned {count}, not {len(want)}"
        assert_blob(bytes(out[:count]), want, f"read_into_many of {what}")
        assert out[count:] == bytearray([FILL]) * (length - count), (
            f"read_into_many of {what} wrote past the {count} bytes it returned"
        )


class RangeTests(SuiteBase):
    """``read_into_many``: what it copies, and what it refuses."""

    def test_read_ranges(self, backend_harness: BackendHarness) -> None:
        """Ranges at the start, middle and end of values, spanning and past the end,
        whole values, several of one key and misses, in one batch; then again after one
        value was replaced by a shorter one and another deleted."""
        h = backend_harness
        items = h.items(RANGE_SIZES)
        (small, small_buf), (large, large_buf) = items
        shorter, miss = h.blob(3000), h.key()

        async def body(backend: Backend) -> None:
            assert await backend.put_many(items) == [True] * len(items)
            values = {key: bytes(buf.view) for key, buf in items}
            cases = [*ranges(small, small_buf.nbytes), *ranges(large, large_buf.nbytes)]
            cases[3:3] = [("a missing key", miss, 0, 100)]
            cases.append(("an empty range of a missing key", miss, 0, 0))
            await check_reads(backend, cases, values)
            assert await backend.put_many([(small, shorter)]) == [True]
            assert await backend.delete_many([large]) == [True]
            values = {small: bytes(shorter.view)}
            cases = [
                ("the start of a value overwritten with 3000 bytes", small, 0, 4096),
                ("a deleted value", large, 0, 4096),
                ("the end of a value overwritten with 3000 bytes", small, 2900, 1000),
            ]
            await check_reads(backend, cases, values)

        h.run(body)

    def test_read_into_rejects_bad_arguments(self, backend_harness: BackendHarness) -> None:
        """A bad offset or ``out`` is ``ConfigError`` before any I/O; nothing is deleted."""
        h = backend_harness
        key, buf = h.key(), h.blob(5000)
        released = scratch(100)
        released.release()
        bad: dict[str, tuple[Any, Any]] = {
            "a negative offset": (-1, scratch(100)),
            "a float offset": (1.0, scratch(100)),
            "a bool offset": (True, scratch(100)),
            "a str offset": ("0", scratch(100)),
            "a read-only out": (0, memoryview(bytes(100))),
            "a bytearray out": (0, bytearray(100)),
            "a non-contiguous out": (0, scratch(200)[::2]),
            "an out of 4-byte items": (0, memoryview(array("I", [0] * 25))),
            "a 2-d out": (0, scratch(100).cast("B", (10, 10))),
            "a released out": (0, released),
        }

        async def body(backend: Backend) -> None:
            assert await backend.put_many([(key, buf)]) == [True]
            first = scratch(100)
            for what, (offset, out) in bad.items():
                reads: list[Any] = [(key, 0, first), (key, offset, out)]
                call = f"read_into_many with {what}"
                await expect_error(ConfigError, call, partial(backend.read_into_many, reads))
                assert first == bytes(100), f"{call} wrote into the read before it"
            pair: list[Any] = [(key, 0)]
            call = "read_into_many of a (key, offset) pair"
            await expect_error(ConfigError, call, lambda: backend.read_into_many(pair))
            [got] = await backend.get_many([key])
            assert_blob(got, buf, "the value after the refused reads")
            assert await backend.read_into_many([(key, 0, first)]) == [100]

        h.run(body)
