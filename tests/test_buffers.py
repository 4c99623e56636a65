"""The buffer pool: reuse, reference counting, sizes."""

import gc

import pytest

from kvtier.core.buffers import Buffer, BufferPool, address_of


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


class RecordingRegistrar:
    def __init__(self) -> None:
        self.live: dict[int, int] = {}
        self.calls: list[tuple[str, int, int]] = []

    def register(self, address: int, nbytes: int) -> None:
        assert address not in self.live, "registered twice"
        self.live[address] = nbytes
        self.calls.append(("register", address, nbytes))

    def deregister(self, address: int, nbytes: int) -> None:
        assert self.live.pop(address) == nbytes, "deregistered a block it was not told of"
        self.calls.append(("deregister", address, nbytes))


def test_registrar_sees_existing_and_new_blocks() -> None:
    pool = BufferPool()
    before = pool.acquire(10_000)
    registrar = RecordingRegistrar()
    pool.add_registrar(registrar)
    after = pool.acquire(1 << 20)
    for buf in (before, after):
        address = address_of(buf.block)
        assert registrar.live[address] == buf.capacity
    assert len(registrar.live) == 2


def test_registrar_deregisters_before_unmap_and_on_removal() -> None:
    pool = BufferPool(max_idle_bytes=0)  # a released buffer is unmapped at once
    registrar = RecordingRegistrar()
    pool.add_registrar(registrar)
    kept, dropped = pool.acquire(4096), pool.acquire(8192)
    dropped_address = address_of(dropped.block)
    dropped.release()
    del dropped
    gc.collect()
    assert ("deregister", dropped_address, 8192) in registrar.calls
    assert list(registrar.live) == [address_of(kept.block)]
    pool.remove_registrar(registrar)
    assert registrar.live == {}
    pool.acquire(4096)  # after removal: not told
    assert registrar.live == {}
