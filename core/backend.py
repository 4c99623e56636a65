"""The async, batch-first storage backend interface every tier implements.

Contract (checked for every backend by :mod:`kvtier.core.testing`):

* Keys are chunk key strings (:func:`kvtier.core.keys.validate_key`); values are
  encoded blobs as :class:`~kvtier.core.buffers.Buffer`.
* Every batch method takes a sequence and returns a list in the same order; an empty
  batch is a no-op; duplicate keys are allowed.
* A miss is ``None`` (``get_many``) or ``False``, never an exception.
* ``read_into_many`` copies ranges of stored values into the caller's memory; a
  backend without a native range read gets the base's default (whole values read,
  the ranges copied out).
* ``get_many`` returns buffers the caller owns and must release. ``put_many`` does not
  take ownership of its buffers: a backend that keeps one calls ``retain()``.
* Client-library errors are translated: unreachable, timed out or closed ->
  :class:`BackendUnavailableError`; a value that cannot fit -> a ``False`` result;
  any other failure of the store -> :class:`BackendError`. Anything else escaping a
  backend is a bug in it, and the tier chain treats it as one (never as an outage).
* A cancelled ``put_many`` leaves each key either absent or fully written.

The public batch methods live here, once: they check that the backend is open,
validate every key (:class:`ConfigError`, before any I/O), return ``[]`` for an
empty batch and fold duplicate keys, then call the ``_*_unique`` hooks a backend
implements, which see each key once (see :meth:`Backend._put_unique` for which
duplicate is written). Blocking work runs in :attr:`Backend.workers`, a private
:class:`~kvtier.core.blocking.BlockingPool` started with :meth:`Backend._start_workers`.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from pydantic import BaseModel

from kvtier.core.blocking import BlockingPool, Orphan
from kvtier.core.buffers import Buffer, BufferPool, default_pool, release_all
from kvtier.core.errors import BackendUnavailableError, ConfigError
from kvtier.core.keys import validate_key
from kvtier.core.plugins import PluginRegistry, get_registry
from kvtier.core.urls import redact

T = TypeVar("T")
Read = tuple[str, int, memoryview]
"""One read of :meth:`Backend.read_into_many`: ``(key, offset, out)``."""


def copy_range(value: Buffer | bytes | None, offset: int, out: memoryview) -> int | None:
    """Copy ``value``'s bytes from ``offset`` on into ``out``, as many as fit; the count
    copied (0 from ``offset`` at or past the end), ``None`` if ``value`` is ``None``."""
    if value is None:
        return None
    view = value.view if isinstance(value, Buffer) else memoryview(value)
    part = view[offset : offset + out.nbytes]
    out[: part.nbytes] = part
    return part.nbytes


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
    """``PutMode.CREATE`` is honoured atomically (of racing CREATEs of one key, one
    wins) in one round trip; the tier chain then writes with it. Without it, the
    chain writes with ``OVERWRITE``."""
    hands_over_evictions: bool = False
    """Passes evicted blobs to ``demotion_sink``, so a ``write_policy: back`` tier below
    can receive them."""
    process_local: bool = False
    """Blobs stay in this process: no other process or host reads them. They need no
    checksum there, so the tier chain stores them unsealed and seals a blob only when
    it leaves for another tier (:func:`kvtier.core.blob.seal`)."""
    verified_reads: bool = False
    """``get_many`` returns only blobs that were checked when they entered this process
    (an in-process store keeps the very buffers the tier chain verified or encoded; a
    backend that reads from peers verifies each blob itself), so the tier chain does
    not compute their checksum again. Bytes read from storage outside the process are
    never trusted: leave it ``False``."""
    ranged_reads: bool = False
    """``read_into_many`` reads only the asked ranges (a native range read); else the
    base's default reads whole values and copies the ranges out."""


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

    Built by the tier chain as ``cls(url, options, capacity=..., pool=...,
    registry=...)`` where ``options`` is an instance of :attr:`options_model`, then
    opened with ``await backend.open()``. A subclass checks its URL and options and
    sets up its state in :meth:`_configure` (no I/O; the constructor calls it),
    implements the ``_*_unique`` hooks, ``_iter_keys`` and ``_stats``, and may
    override ``_open`` and ``_close``.
    """

    capabilities: Capabilities = Capabilities()
    """What this backend can do. A class attribute; an instance may narrow it once it
    knows more about its store (an S3 store that ignores conditional writes)."""
    options_model: ClassVar[type[BaseModel] | None] = None
    """The options model of the backend's spec; the constructor refuses other options."""

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
        self.safe_url = redact(url)
        """``url`` without credentials: for messages, logs and stats."""
        self.options = options
        self.capacity = capacity
        self.pool = pool if pool is not None else default_pool()
        self.registry = registry if registry is not None else get_registry()
        """Resolves plugin-provided names in options (eviction policies, codecs)."""
        self.eviction_listener: EvictionListener | None = None
        self.demotion_sink: DemotionSink | None = None
        self.workers: BlockingPool | None = None
        """This backend's threads for blocking calls, once :meth:`_start_workers` ran."""
        self._closed = False
        model = self.options_model
        if model is not None and not isinstance(options, model):
            raise ConfigError(
                f"{self.safe_url}: options must be {model.__name__}, got {type(options).__name__}"
            )
        if self.capabilities.bounded and (capacity is None or capacity <= 0):
            raise ConfigError(
                f"tier {self.safe_url!r} needs a positive capacity in bytes, so that it "
                f"cannot grow without bound (got {capacity!r}): set e.g. 'capacity: 2GiB' "
                "on the tier"
            )
        self._configure()

    def _configure(self) -> None:  # noqa: B027 - a no-op default, not abstract
        """Check the URL and options (:class:`ConfigError` for what the backend cannot
        use) and set up state, without I/O. Bounded backends have a positive
        ``capacity`` here."""

    @property
    def location(self) -> object:
        """What identifies the store this backend uses: two tiers of one chain may not
        share it. The URL by default (scheme lower case, no trailing slash); a backend
        whose options also name the store (an S3 endpoint) says so by overriding."""
        scheme, sep, rest = self.url.partition("://")
        return f"{scheme.lower()}{sep}{rest.rstrip('/')}"

    # -- lifetime ----------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, create folders, rebuild indexes (:meth:`_open`). Raises
        ``BackendUnavailableError`` if the store cannot be reached."""
        self._check_open()
        await self._open()

    async def close(self) -> None:
        """Wait for the blocking calls in flight, then release connections and memory
        (:meth:`_close`, once); later calls raise ``BackendUnavailableError``."""
        if self._closed:
            return
        self._closed = True
        workers, self.workers = self.workers, None
        if workers is not None:
            await workers.shutdown()
        await self._close()

    async def _open(self) -> None:  # noqa: B027 - a no-op default, not abstract
        """Backend-specific :meth:`open`; called again after a failed open."""

    async def _close(self) -> None:  # noqa: B027 - a no-op default, not abstract
        """Backend-specific :meth:`close`; runs once, after the workers have stopped (no
        blocking call of this backend is running any more)."""

    def _check_open(self) -> None:
        if self._closed:
            raise BackendUnavailableError(f"{self.safe_url}: backend is closed")

    def _start_workers(self, threads: int) -> BlockingPool:
        """Start (once) the threads :meth:`_blocking` runs calls in; call from ``_open``."""
        if self.workers is None:
            name = f"kvtier-{type(self).__name__}"
            self.workers = BlockingPool(self.safe_url, threads, name=name)
        return self.workers

    async def _blocking(self, call: Callable[[], T], *, orphan: Orphan | None = None) -> T:
        """``call()`` in this backend's workers (see :meth:`BlockingPool.run`)."""
        self._check_open()
        if self.workers is None:
            raise BackendUnavailableError(f"{self.safe_url}: not open; await backend.open() first")
        return await self.workers.run(call, orphan=orphan)

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

    # -- the batch API (once, for every backend) ---------------------------------------

    def _unique(self, keys: Sequence[str]) -> list[str]:
        """``keys`` without repeats, first occurrences first, each validated; raises
        ``BackendUnavailableError`` when closed (checked first)."""
        self._check_open()
        unique = list(dict.fromkeys(keys))
        for key in unique:
            validate_key(key)
        return unique

    async def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        """Blobs for ``keys`` (``None`` for a miss); the caller releases each buffer."""
        unique = self._unique(keys)
        if not unique:
            return []
        first = dict(zip(unique, await self._get_unique(unique), strict=True))
        out: list[Buffer | None] = []
        handed: set[str] = set()
        for key in keys:
            buf = first[key]
            if buf is not None and key in handed:  # a repeat: another reference
                buf = buf.retain()
            handed.add(key)
            out.append(buf)
        return out

    async def read_into_many(self, reads: Sequence[Read]) -> list[int | None]:
        """Read ranges of stored values into the caller's memory: for each
        ``(key, offset, out)``, the value's bytes from ``offset`` on are written into
        ``out`` (as many as fit; fewer where the value ends first) and the number written
        is returned; ``None`` where ``key`` is missing. An ``offset`` at or past the end
        reads 0 bytes. A key may appear in several reads (not folded). Each read sees the
        value as stored when it runs: a value replaced between reads is not detected
        here (callers check what they read: kvtier's blob digests).

        ``out`` is a writable, C-contiguous memoryview of bytes (format ``"B"``, one
        dimension: ``view.cast("B")`` makes one); anything else, or an ``offset`` that is
        not a non-negative int, raises :class:`ConfigError` before any I/O. Bytes of
        ``out`` past the returned count are left as they were. Once the call has
        returned or raised (cancelled included), nothing writes into ``out`` any more.
        """
        self._check_open()
        checked = [self._check_read(i, read) for i, read in enumerate(reads)]
        if not checked:
            return []
        return await self._read_into(checked)

    def _check_read(self, i: int, read: Read) -> Read:
        """``read`` (the ``i``-th of a batch) if its key, offset and ``out`` are usable."""
        try:
            key, offset, out = read
        except (TypeError, ValueError):
            raise ConfigError(
                f"{self.safe_url}: read {i} must be a (key, offset, out) tuple, got {read!r}"
            ) from None
        validate_key(key)
        what = f"{self.safe_url}: read {i} ({key}, offset {offset!r})"
        if type(offset) is not int or offset < 0:
            raise ConfigError(f"{what}: the offset must be a non-negative int")
        if not isinstance(out, memoryview):
            raise ConfigError(f"{what}: out must be a memoryview, got {type(out).__name__}")
        try:
            usable = not out.readonly and out.c_contiguous and out.ndim == 1
            usable = usable and out.format == "B"
        except ValueError:  # a released memoryview
            raise ConfigError(f"{what}: out is a released memoryview") from None
        if not usable:
            raise ConfigError(
                f"{what}: out must be a writable, C-contiguous memoryview of bytes "
                f"(format 'B', one dimension; cast it with .cast('B')), got "
                f"format {out.format!r}, shape {out.shape}, readonly={out.readonly}"
            )
        return key, offset, out

    async def put_many(
        self, items: Sequence[tuple[str, Buffer]], mode: PutMode = PutMode.OVERWRITE
    ) -> list[bool]:
        """Store blobs; ``True`` where stored, ``False`` where skipped (``CREATE`` and the
        key exists) or rejected (too large, store full)."""
        if not self._unique([key for key, _ in items]):
            return []
        chosen: dict[str, int] = {}  # key -> index of the item written
        for i, (key, _) in enumerate(items):
            if mode is PutMode.OVERWRITE or key not in chosen:
                chosen[key] = i  # OVERWRITE: the last value wins; CREATE: the first
        written = [items[i] for i in chosen.values()]
        stored = dict(zip(chosen, await self._put_unique(written, mode), strict=True))
        if mode is PutMode.OVERWRITE:
            return [stored[key] for key, _ in items]
        return [stored[key] and chosen[key] == i for i, (key, _) in enumerate(items)]

    async def contains_many(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is stored."""
        unique = self._unique(keys)
        if not unique:
            return []
        found = dict(zip(unique, await self._contains_unique(unique), strict=True))
        return [found[key] for key in keys]

    async def delete_many(self, keys: Sequence[str]) -> list[bool]:
        """Delete keys; ``True`` where a key existed (for its first occurrence)."""
        unique = self._unique(keys)
        if not unique:
            return []
        deleted = dict(zip(unique, await self._delete_unique(unique), strict=True))
        return [deleted.pop(key, False) for key in keys]

    def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every stored key starting with ``prefix``, each once, in no set order."""
        self._check_open()
        return self._iter_keys(prefix)

    async def stats(self) -> BackendStats:
        """A snapshot of the backend's counters."""
        self._check_open()
        return await self._stats()

    # -- what a backend implements -----------------------------------------------------
    #
    # The hooks get valid keys, each once, in non-empty batches of an open backend, and
    # return one result per key in the same order.

    @abstractmethod
    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        """Blobs for ``keys``, each a reference the caller owns; ``None`` for a miss."""

    async def _read_into(self, reads: list[Read]) -> list[int | None]:
        """Copy each ``(key, offset, out)`` range of a stored value into ``out``; the
        count copied, ``None`` for a missing key (see :meth:`read_into_many`). The
        reads are checked; a key may repeat. A backend with a native range read
        overrides this and sets ``capabilities.ranged_reads``; by default every
        distinct value is read whole with :meth:`_get_unique` and the ranges copied."""
        keys = list(dict.fromkeys(key for key, _, _ in reads))
        blobs = await self._get_unique(keys)
        try:
            found = dict(zip(keys, blobs, strict=True))
            return [copy_range(found[key], offset, out) for key, offset, out in reads]
        finally:
            release_all(blobs)

    @abstractmethod
    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        """Store each blob (retaining any buffer kept past the call); ``False`` where
        ``CREATE`` found the key or the blob was rejected. Of keys repeated in the
        caller's batch, this sees the last value for ``OVERWRITE``, the first for
        ``CREATE``."""

    @abstractmethod
    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        """Whether each key is stored."""

    @abstractmethod
    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        """Delete each key; ``True`` where it existed."""

    @abstractmethod
    def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        """Every stored key starting with ``prefix``, each once (an async generator)."""

    @abstractmethod
    async def _stats(self) -> BackendStats:
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
