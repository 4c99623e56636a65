"""The buffer pool: reuse, reference counting, sizes."""

import pytest

from kvtier.core.buffers import Buffer, BufferPool


def test_released_buffers_are_reused():
    pool = BufferPool()
    first = pool.acquire(100_000)
    block = first.block
    first.release()
    second = pool.acquire(99_000)  # same size class
    assert second.block is block
    assert (pool.allocations, pool.reuses) == (1, 1)


def test_size_classes_waste_at_most_an_eighth():
    pool = BufferPool()
    for n in (1, 4097, 1 << 20, (32 << 20) + 200, 1_500_000):
        buf = pool.acquire(n)
        assert buf.nbytes == n == len(buf.view)
        assert n <= buf.capacity <= max(4096, n * 1.125 + 4096)


def test_refcount_keeps_memory_until_last_release():
    pool = BufferPool()
    buf = pool.acquire(10)
    buf.view[:] = b"0123456789"
    buf.retain()
    buf.release()
    assert pool.idle_bytes == 0 and bytes(buf) == b"0123456789"
    buf.release()
    assert pool.idle_bytes == buf.capacity
    with pytest.raises(RuntimeError):
        buf.release()
    with pytest.raises(RuntimeError):
        buf.retain()


def test_idle_memory_is_bounded():
    pool = BufferPool(max_idle_bytes=8192)
    bufs = [pool.acquire(4096) for _ in range(4)]
    for b in bufs:
        b.release()
    assert pool.idle_bytes == 8192


def test_wrap_borrows_without_copy():
    data = bytearray(b"abc")
    buf = Buffer.wrap(data)
    data[0] = ord("x")
    assert bytes(buf) == b"xbc"
    buf.release()


def test_resize_and_copy_of():
    pool = BufferPool()
    buf = pool.copy_of(b"hello world")
    buf.resize(5)
    assert bytes(buf) == b"hello"
    with pytest.raises(ValueError):
        buf.resize(buf.capacity + 1)
