"""A pool of reusable, page-aligned byte buffers handed out as zero-copy views.

Allocating fresh memory costs a page fault per 4 KiB on first touch, which on these
machines makes ``bytes(...)`` or ``tensor.clone()`` about 10x slower than copying
into memory that was touched before. Every blob kvtier encodes, stores or reads
therefore lives in a :class:`Buffer` leased from a :class:`BufferPool`.

A :class:`Buffer` is reference counted: a backend that keeps a buffer (the ``cpu``
tier keeps the very buffer it was given, no copy) calls :meth:`Buffer.retain`, and
the memory returns to the pool when the last holder calls :meth:`Buffer.release`.
"""

from __future__ import annotations

import ctypes
import mmap
import threading
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Protocol, TypeAlias, TypeVar

BytesLike: TypeAlias = bytes | bytearray | memoryview | mmap.mmap
"""Anything exposing the buffer protocol as contiguous bytes."""

PAGE = mmap.PAGESIZE
MIN_CLASS = 1 << 12
HUGE_PAGE = 2 << 20
_refs_lock = threading.Lock()


def _size_class(nbytes: int) -> int:
    """Round ``nbytes`` up to a size class: a page, then eight classes per power of two.

    Eight steps per doubling waste at most 12.5% (a 32 MiB chunk plus its header
    takes 36 MiB, not 64).
    """
    if nbytes <= MIN_CLASS:
        return MIN_CLASS
    step = 1 << max(12, (nbytes - 1).bit_length() - 4)
    return -(-nbytes // step) * step


_Held = TypeVar("_Held", bound="Releasable")


class Releasable:
    """Something that holds pooled memory until :meth:`release`; as a context manager
    it is released on exit."""

    __slots__ = ()

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self: _Held) -> _Held:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Buffer(Releasable):
    """A leased byte region: ``view`` is a writable memoryview of exactly ``nbytes``.

    The lease starts with one reference. ``retain`` adds one, ``release`` drops one;
    at zero the memory goes back to its pool and ``view`` must no longer be used.
    Use it as a context manager to release on exit.
    """

    __slots__ = ("_block", "_pool", "_refs", "nbytes", "view")

    def __init__(self, block: memoryview, nbytes: int, pool: BufferPool | None) -> None:
        self._block = block
        self._pool = pool
        self._refs = 1
        self.nbytes = nbytes
        self.view = block[:nbytes]

    @classmethod
    def wrap(cls, data: BytesLike) -> Buffer:
        """Borrow ``data`` (bytes, bytearray, memoryview, numpy array) without copying.

        The result is not pooled: releasing it only drops the reference.
        """
        view = memoryview(data).cast("B")
        return cls(view, view.nbytes, None)

    @property
    def capacity(self) -> int:
        """Bytes of the underlying block (``>= nbytes``; the pool's size class)."""
        return self._block.nbytes

    @property
    def block(self) -> memoryview:
        """The whole underlying block, for I/O that needs aligned, padded lengths."""
        return self._block

    def resize(self, nbytes: int) -> None:
        """Set ``nbytes`` (and ``view``) to any length up to :attr:`capacity`."""
        if not 0 <= nbytes <= self._block.nbytes:
            raise ValueError(f"size {nbytes} outside [0, {self._block.nbytes}]")
        self.nbytes = nbytes
        self.view = self._block[:nbytes]

    @property
    def refcount(self) -> int:
        return self._refs

    def retain(self) -> Buffer:
        """Add a reference and return ``self``; pair every call with :meth:`release`."""
        with _refs_lock:
            if self._refs <= 0:
                raise RuntimeError("retain() on a released Buffer")
            self._refs += 1
        return self

    def release(self) -> None:
        """Drop a reference; the last one hands the memory back to the pool."""
        with _refs_lock:
            if self._refs <= 0:
                raise RuntimeError("release() on a Buffer that was already released")
            self._refs -= 1
            last = self._refs == 0
        if last and self._pool is not None:
            self._pool._give_back(self._block)

    def __len__(self) -> int:
        return self.nbytes

    def __bytes__(self) -> bytes:
        return bytes(self.view)

    def __repr__(self) -> str:
        return f"Buffer(nbytes={self.nbytes}, refs={self._refs})"


def release_all(buffers: Iterable[Buffer | None]) -> None:
    """Release every buffer of ``buffers`` that is not ``None`` (a batch's misses)."""
    for buf in buffers:
        if buf is not None:
            buf.release()


def address_of(view: memoryview) -> int:
    """The address of the first byte of a writable, contiguous ``view``."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


class MemoryRegistrar(Protocol):
    """Told about every memory block a pool maps, e.g. to register it with an RDMA or
    transfer engine so that transfers land in pool buffers with no copy."""

    def register(self, address: int, nbytes: int) -> None:
        """``[address, address + nbytes)`` is mapped and may be handed out from now on."""

    def deregister(self, address: int, nbytes: int) -> None:
        """The block will be unmapped right after this returns; stop using it."""


class BufferPool:
    """Page-aligned buffers in size classes, reused after release.

    ``max_idle_bytes`` bounds the memory kept on free lists; buffers released beyond
    it are dropped (unmapped). Thread safe.
    """

    def __init__(self, max_idle_bytes: int = 1 << 30) -> None:
        self.max_idle_bytes = max_idle_bytes
        self._free: dict[int, list[memoryview]] = {}
        self._idle_bytes = 0
        # Reentrant: a garbage collection inside a locked section may unmap a block,
        # and its finalizer takes the lock.
        self._lock = threading.RLock()
        self._blocks: dict[int, int] = {}
        """Address -> size of every block this pool has mapped and not yet unmapped."""
        self._registrars: list[MemoryRegistrar] = []
        self.allocations = 0
        self.reuses = 0

    def add_registrar(self, registrar: MemoryRegistrar) -> None:
        """Register every block mapped now and later with ``registrar``, and deregister
        each before it is unmapped, until :meth:`remove_registrar`."""
        with self._lock:
            blocks = list(self._blocks.items())
            self._registrars.append(registrar)
        for address, nbytes in blocks:
            registrar.register(address, nbytes)

    def remove_registrar(self, registrar: MemoryRegistrar) -> None:
        """Deregister every live block from ``registrar`` and stop telling it about more."""
        with self._lock:
            self._registrars.remove(registrar)
            blocks = list(self._blocks.items())
        for address, nbytes in blocks:
            registrar.deregister(address, nbytes)

    def _map(self, size: int) -> memoryview:
        memory = mmap.mmap(-1, size)
        if size >= HUGE_PAGE and hasattr(mmap, "MADV_HUGEPAGE"):
            # Transparent huge pages where the kernel allows them (madvise mode):
            # 512x fewer first-touch faults and TLB misses on copies.
            memory.madvise(mmap.MADV_HUGEPAGE)
        block = memoryview(memory)
        address = address_of(block)
        with self._lock:
            self._blocks[address] = size
            registrars = list(self._registrars)
        for registrar in registrars:
            registrar.register(address, size)
        # Runs when the last view of the mapping goes, before munmap; not at exit.
        weakref.finalize(memory, self._unmapped, address, size).atexit = False
        return block

    def _unmapped(self, address: int, size: int) -> None:
        with self._lock:
            self._blocks.pop(address, None)
            registrars = list(self._registrars)
        for registrar in registrars:
            registrar.deregister(address, size)

    def acquire(self, nbytes: int) -> Buffer:
        """Lease a buffer of exactly ``nbytes`` (contents undefined), page aligned."""
        if nbytes < 0:
            raise ValueError(f"buffer size must be >= 0, got {nbytes}")
        size = _size_class(nbytes)
        with self._lock:
            free = self._free.get(size)
            if free:
                block = free.pop()
                self._idle_bytes -= size
                self.reuses += 1
                return Buffer(block, nbytes, self)
            self.allocations += 1
        # The memoryview keeps the anonymous mapping alive; dropping it unmaps.
        return Buffer(self._map(size), nbytes, self)

    def copy_of(self, data: BytesLike) -> Buffer:
        """Lease a buffer holding a copy of ``data``."""
        src = memoryview(data).cast("B")
        buf = self.acquire(src.nbytes)
        buf.view[:] = src
        return buf

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def _give_back(self, block: memoryview) -> None:
        size = block.nbytes
        with self._lock:
            if self._idle_bytes + size <= self.max_idle_bytes:
                self._free.setdefault(size, []).append(block)
                self._idle_bytes += size

    def clear(self) -> None:
        """Drop every idle buffer, unmapping its memory."""
        with self._lock:
            dropped, self._free = self._free, {}
            self._idle_bytes = 0
        dropped.clear()  # unmaps outside the lock: the finalizers take it


_default_pool: BufferPool | None = None


def default_pool() -> BufferPool:
    """The process-wide pool shared by kvtier's tiers and codecs."""
    global _default_pool
    if _default_pool is None:
        _default_pool = BufferPool()
    return _default_pool
