"""The async, batch-first storage backend interface every tier implements.

Contract (checked for every backend by :mod:`kvtier.core.testing`):

* Keys are chunk key strings (:func:`kvtier.core.keys.validate_key`); values are
  encoded blobs as :class:`~kvtier.core.buffers.Buffer`.
* Every batch method takes a sequence and returns a list in the same order; an empty
  batch is a no-op; duplicate keys are allowed.
* A miss is ``None`` (``get_many``) or ``False``, never an exception.
* ``get_many`` returns buffers the caller owns and must release. ``put_many`` does not
  take ownership of its buffers: a backend that keeps one calls ``retain()``.
* Client-library errors are translated: unreachable or closed ->
  :class:`BackendUnavailableError`; a value that cannot fit -> :class:`CapacityError`
  or a ``False`` result; anything else -> :class:`BackendError`.
* A cancelled ``put_many`` leaves each key either absent or fully written.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar

from pydantic import BaseModel

from kvtier.core.buffers import Buffer, BufferPool, default_pool
from kvtier.core.errors import BackendUnavailableError
from kvtier.core.plugins import PluginRegistry, get_registry


class PutMode(str, enum.Enum):
    """``CREATE`` stores a key only if absent; ``OVERWRITE`` replaces it."""

    CREATE = "create"
    OVERWRITE = "overwrite"


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; the conformance suite skips tests for what it cannot."""

    persistent: bool = False
    """Data survives ``close()`` and reopening the same URL."""
    shared: bool = False
    """Several processes can use the same store at once."""
    bounded: bool = False
    """Enforces a byte capacity by evicting (needs ``capacity``)."""
    listing: bool = True
    """``iter_keys`` is supported."""
    create_mode: bool = True
    """``PutMode.CREATE`` is honoured atomically."""
    hands_over_evictions: bool = False
    """Passes evicted blobs to ``demotion_sink``, so a ``write_policy: back`` tier below
    can receive them."""


@dataclass
class BackendStats:
    """A snapshot of a backend's state; ``None`` where the backend cannot tell cheaply."""

    keys: int | None = None
    bytes_used: int | None = None
    capacity_bytes: int | None = None
    evictions: int = 0
    details: dict[str, Any] = field(default_factory=dict)


EvictionListener = Callable[[Sequence[tuple[str, int]]], None]
"""Called with ``(key, nbytes)`` of chunks a bounded backend evicted."""
DemotionSink = Callable[[Sequence[tuple[str, Buffer]]], None]
"""Takes ownership of evicted blobs (one reference each) to write them to a lower tier."""


class Backend(ABC):
    """Base class of storage backends.

    Subclasses are built by the tier chain as ``cls(url, options, capacity=...,
    pool=..., registry=...)`` where ``options`` is an instance of the spec's options model, then
    opened with ``await backend.open()``.
    """

    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(
        self,
        url: str,
        options: BaseModel,
        *,
        capacity: int | None = None,
        pool: BufferPool | None = None,
        registry: PluginRegistry | None = None,
    ) -> None:
        self.url = url
        self.options = options
        self.capacity = capacity
        self.pool = pool if pool is not None else default_pool()
        self.registry = registry if registry is not None else get_registry()
        """Resolves plugin-provided names in options (eviction policies, codecs)."""
        self.eviction_listener: EvictionListener | None = None
        self.demotion_sink: DemotionSink | None = None
        self._closed = False

    async def open(self) -> None:  # noqa: B027 - a no-op default, not abstract
        """Connect, create folders, rebuild indexes. Raise ``BackendUnavailableError``
        if the store cannot be reached."""

    async def close(self) -> None:
        """Release connections and memory; later calls raise ``BackendUnavailableError``."""
        self._closed = True

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailableError(f"{self.url}: backend is closed")

    def _evicted(
        self, items: Sequence[tuple[str, int]], blobs: Sequence[Buffer] | None = None
    ) -> None:
        """Report evicted chunks. A backend with ``hands_over_evictions`` also passes
        their blobs, one reference each, which this method takes over."""
        if items and self.eviction_listener is not None:
            self.eviction_listener(items)
        if not blobs:
            return
        if self.demotion_sink is not None:
            self.demotion_sink([(key, blob) for (key, _), blob in zip(items, blobs, strict=True)])
        else:
            for blob in blobs:
                blob.release()

    @abstractmethod
    async def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        """Blobs for ``keys`` (``None`` for a miss); the caller releases each buffer."""

    @abstractmethod
    async def put_many(
        self, items: Sequence[tuple[str, Buffer]], mode: PutMode = PutMode.OVERWRITE
    ) -> list[bool]:
        """Store blobs; ``True`` where stored, ``False`` where skipped (``CREATE`` and the
        key exists) or rejected (too large, store full)."""

    @abstractmethod
    async def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored."""

    @abstractmethod
    async def delete_many(self, keys: Sequence[str]) -> list[bool]:
        """Delete keys; ``True`` where a key existed."""

    @abstractmethod
    def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every stored key starting with ``prefix``, each once, in no set order."""

    @abstractmethod
    async def stats(self) -> BackendStats:
        """A snapshot of the backend's counters."""

    async def __aenter__(self) -> Backend:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
