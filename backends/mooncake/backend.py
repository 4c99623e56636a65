"""The ``mooncake`` tier's implementation (options and URL: :mod:`kvtier.backends.mooncake`).

How chunks map onto the store:

* Zero copy. The tier's :class:`~kvtier.core.buffers.BufferPool` memory is registered
  with the Mooncake client, every block mapped now and later. ``put_many`` writes from
  the caller's buffers (``batch_upsert_from``) and ``get_many`` reads straight into
  pool buffers (``batch_get_into``). A buffer from outside the pool is copied first.
* Sizes. ``batch_get_into`` needs room for the whole object. The tier remembers the size
  of keys it wrote or read (a bounded map) and asks the master for the others, one
  ``batch_get_replica_desc`` per batch; a key that outgrew its remembered size is asked
  again.
* ``OVERWRITE`` is Mooncake's upsert: a value of the same size is rewritten in place,
  another size is reallocated. Readers see the old or the new value, or a miss while
  it is written; a reader racing an in-place rewrite by a *different* value of the
  same size can read a mix, which the chain's checksum turns into a miss (kvtier
  rewrites a key only with the same chunk). ``CREATE`` reserves keys with a put
  session, which the master refuses for an existing key: atomic between writers.
* Empty blobs. Mooncake stores no zero-length object, so an empty blob is a one-byte
  marker object under ``<key>#empty`` (never a chunk key). A key's own object takes
  precedence over its marker, which only a delete or an empty write removes.
* Deletes force the removal: Mooncake otherwise refuses it for seconds after a read
  (its read lease).
* Errors. An RPC failure (master down or not answering) raises
  :class:`BackendUnavailableError` for the batch; as soon as the client's heartbeat
  has noticed, calls fail at once. Other failures are per key: ``False`` from
  ``put_many`` and a miss from ``get_many``, counted in ``stats().details``.
* Threads. Client calls block; each batch runs as one call sequence in a pool of
  ``threads`` workers, which bounds the calls in flight. A cancelled ``put_many``
  finishes in the background, holding its buffers until then.
* One client per process and settings. Backends with the same master, metadata server,
  host, protocol and sizes share one Mooncake client (its transfer engine and mounted
  segment). Closing the last one closes the client, which takes about 2 s (the library
  joins its polling threads, holding the GIL). After a master restart the client
  mounts its segment again by itself within about 2 s; the master's objects are lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mooncake.store import MooncakeDistributedStore, ReplicateConfig, SoftPinAction

from kvtier.backends.mooncake import P2P_HANDSHAKE, MooncakeOptions, parse_mooncake_url
from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode
from kvtier.core.buffers import Buffer, BufferPool, address_of
from kvtier.core.errors import BackendError, BackendUnavailableError, ConfigError
from kvtier.core.keys import is_valid_key, validate_keys
from kvtier.core.plugins import PluginRegistry

log = logging.getLogger(__name__)
T = TypeVar("T")

# Mooncake's error codes (mooncake-store/include/types.h).
BUFFER_OVERFLOW = -10
NO_AVAILABLE_HANDLE = -200
INVALID_PARAMS = -600
"""Also what ``batch_get_into`` returns when the buffer is smaller than the object."""
REPLICA_IS_NOT_READY = -703
OBJECT_NOT_FOUND = -704
OBJECT_ALREADY_EXISTS = -705
OBJECT_HAS_LEASE = -706
REPLICA_NOT_FOUND = -710
REPLICA_IS_GONE = -712
OBJECT_REPLICA_BUSY = -714
RPC_FAIL = -900
RPC_TIMEOUT = -901
UNREACHABLE = frozenset({RPC_FAIL, RPC_TIMEOUT})
ABSENT = frozenset({OBJECT_NOT_FOUND, REPLICA_IS_NOT_READY, REPLICA_NOT_FOUND, REPLICA_IS_GONE})
"""A read of a key that is not (or not yet, or no longer) stored."""
FULL = frozenset({NO_AVAILABLE_HANDLE, BUFFER_OVERFLOW})
BUSY = frozenset({REPLICA_IS_NOT_READY, OBJECT_HAS_LEASE, OBJECT_REPLICA_BUSY})
"""A write or remove that another operation on the key blocks for a moment."""
HEALTH_MASTER_UNREACHABLE = 2

EMPTY_MARKER = "#empty"
_DEFAULT_PORTS = {"http": 80, "https": 443, "etcd": 2379}
BUSY_RETRIES = 5
BUSY_BACKOFF_S = 0.01
MAX_REMEMBERED_SIZES = 1 << 16


def _marker(key: str) -> str:
    return key + EMPTY_MARKER


def _unreachable(what: str, code: int) -> BackendUnavailableError:
    return BackendUnavailableError(f"mooncake: {what} failed: master unreachable (code {code})")


# -- the process's clients ------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    """What identifies a Mooncake client; backends with equal settings share one."""

    master: str
    metadata_server: str
    local_hostname: str
    protocol: str
    rdma_devices: str
    global_segment_size: int
    local_buffer_size: int


def _probe(address: str, what: str, timeout: float) -> None:
    """Raise :class:`BackendUnavailableError` unless ``address`` (``host:port`` or a URL)
    accepts a connection: Mooncake's ``setup`` would retry an unreachable master for
    90 s, holding the GIL."""
    parts = urlsplit(address if "//" in address else f"//{address}")
    if parts.hostname is None:
        return
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise BackendUnavailableError(
            f"mooncake: cannot reach the {what} at {address}: {exc}"
        ) from None


class _Client:
    """A Mooncake client shared by the backends with the same settings.

    Pool blocks registered by several backends are registered once and counted.
    """

    def __init__(self, settings: _Settings, store: Any) -> None:
        self.settings = settings
        self.store = store
        self.users = 0
        self._regions: dict[int, list[int]] = {}  # address -> [nbytes, registrations]
        self._lock = threading.RLock()  # a GC finalizer may deregister while held

    def register(self, address: int, nbytes: int) -> None:
        with self._lock:
            region = self._regions.get(address)
            if region is not None:
                region[1] += 1
                return
            code = self.store.register_buffer(address, nbytes)
            if code != 0:
                log.warning("mooncake: registering %d bytes failed (code %d)", nbytes, code)
                return
            self._regions[address] = [nbytes, 1]

    def deregister(self, address: int) -> None:
        with self._lock:
            region = self._regions.get(address)
            if region is None:
                return
            region[1] -= 1
            if region[1] == 0:
                del self._regions[address]
                self.store.unregister_buffer(address)

    def address(self, buf: Buffer) -> int | None:
        """The address of ``buf`` if it lies in registered memory (transfers need no
        copy), else ``None``."""
        try:
            address = address_of(buf.block)
        except TypeError:  # read-only memory: not a pool block
            return None
        with self._lock:
            return address if address in self._regions else None

    def healthy(self) -> None:
        """Raise at once if the client's heartbeat finds the master unreachable."""
        if self.store.health_check() == HEALTH_MASTER_UNREACHABLE:
            raise BackendUnavailableError(
                f"mooncake: the master at {self.settings.master} does not answer"
            )


_clients: dict[_Settings, _Client] = {}
_clients_lock = threading.Lock()


def _connect(settings: _Settings, timeout: float) -> Any:
    _probe(settings.master, "master", timeout)
    if settings.metadata_server != P2P_HANDSHAKE:
        _probe(settings.metadata_server, "metadata server", timeout)
    store = MooncakeDistributedStore()
    code = store.setup(
        settings.local_hostname,
        settings.metadata_server,
        settings.global_segment_size,
        settings.local_buffer_size,
        settings.protocol,
        settings.rdma_devices,
        settings.master,
    )
    if code != 0:
        raise BackendUnavailableError(
            f"mooncake: connecting to the master at {settings.master} failed (code {code}); "
            "check metadata_server, local_hostname and protocol"
        )
    return store


def _acquire_client(settings: _Settings, timeout: float) -> _Client:
    with _clients_lock:
        client = _clients.get(settings)
        if client is None:
            client = _Client(settings, _connect(settings, timeout))
            _clients[settings] = client
        client.users += 1
        return client


def _release_client(client: _Client) -> None:
    with _clients_lock:
        client.users -= 1
        if client.users:
            return
        del _clients[client.settings]
    client.store.close()


@dataclass
class _Registrar:
    """Registers a pool's blocks with a client (a :class:`MemoryRegistrar`)."""

    client: _Client

    def register(self, address: int, nbytes: int) -> None:
        self.client.register(address, nbytes)

    def deregister(self, address: int, nbytes: int) -> None:
        self.client.deregister(address)


# -- per-backend bookkeeping ----------------------------------------------------------


class _Sizes:
    """Remembered object sizes (thread safe, bounded: the oldest entries go first)."""

    def __init__(self, limit: int = MAX_REMEMBERED_SIZES) -> None:
        self._sizes: dict[str, int] = {}
        self._limit = limit
        self._lock = threading.Lock()

    def known(self, keys: Sequence[str]) -> dict[str, int]:
        with self._lock:
            return {k: n for k in keys if (n := self._sizes.get(k)) is not None}

    def remember(self, sizes: Mapping[str, int]) -> None:
        with self._lock:
            self._sizes.update(sizes)
            if len(self._sizes) > self._limit:
                for old in list(self._sizes)[: self._limit // 8]:
                    del self._sizes[old]

    def forget(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._sizes.pop(key, None)


@dataclass
class _Counters:
    hits: int = 0
    misses: int = 0
    rejected: int = 0
    key_errors: int = 0
    size_queries: int = 0
    """Batches whose sizes were not all remembered and were asked from the master."""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)

    def as_dict(self) -> dict[str, int]:
        with self._lock:
            return {k: v for k, v in vars(self).items() if not k.startswith("_")}


def _retry_busy(call: Callable[[list[int]], list[int]], count: int) -> list[int]:
    """Codes of ``call(indices)`` for ``range(count)``, calling again (with a short
    backoff) for indices whose code says another operation holds the key."""
    codes = [0] * count
    todo = list(range(count))
    for attempt in range(BUSY_RETRIES + 1):
        for i, code in zip(todo, call(todo), strict=True):
            codes[i] = code
        todo = [i for i in todo if codes[i] in BUSY]
        if not todo or attempt == BUSY_RETRIES:
            break
        time.sleep(BUSY_BACKOFF_S * (attempt + 1))
    return codes


# -- the backend ----------------------------------------------------------------------


class MooncakeBackend(Backend):
    """A Mooncake Store tier (see the module docstring for the semantics)."""

    capabilities = Capabilities(
        persistent=False,
        shared=True,
        bounded=False,
        listing=True,
        create_mode=True,
        hands_over_evictions=False,
    )
    options: MooncakeOptions

    def __init__(
        self,
        url: str,
        options: MooncakeOptions,
        *,
        capacity: int | None = None,
        pool: BufferPool | None = None,
        registry: PluginRegistry | None = None,
    ) -> None:
        super().__init__(url, options, capacity=capacity, pool=pool, registry=registry)
        self._settings = _Settings(
            master=parse_mooncake_url(url),
            metadata_server=options.metadata_server,
            local_hostname=options.local_hostname,
            protocol=options.protocol,
            rdma_devices=options.rdma_devices,
            global_segment_size=options.global_segment_size,
            local_buffer_size=options.local_buffer_size,
        )
        self._config = ReplicateConfig()
        self._config.replica_num = options.replica_num
        if options.soft_pin:
            self._config.soft_pin_action = SoftPinAction.ENABLE
            if options.soft_pin_ttl is not None:
                self._config.soft_pin_ttl_ms = round(options.soft_pin_ttl * 1000)
        self._executor = ThreadPoolExecutor(options.threads, thread_name_prefix="kvtier-mooncake")
        self._client: _Client | None = None
        self._registrar: _Registrar | None = None
        self._marker_blob: Buffer | None = None
        self._sizes = _Sizes()
        self._counters = _Counters()

    # -- lifetime ---------------------------------------------------------------------

    async def open(self) -> None:
        """Connect (or join this process's client with the same settings) and register
        the pool's memory; :class:`BackendUnavailableError` if the master or metadata
        server cannot be reached within ``connect_timeout``."""
        self._check_open()
        if self._client is None:
            await self._run(self._attach)

    def _attach(self) -> None:
        client = _acquire_client(self._settings, self.options.connect_timeout)
        registrar = _Registrar(client)
        try:
            self.pool.add_registrar(registrar)
        except BaseException:
            _release_client(client)
            raise
        marker = self.pool.acquire(1)
        marker.view[0] = 0
        self._client, self._registrar, self._marker_blob = client, registrar, marker

    async def close(self) -> None:
        """Wait for calls in flight, deregister the pool's memory and leave the client
        (closing it if this was its last backend)."""
        if self._closed:
            return
        await super().close()
        await asyncio.to_thread(self._detach)

    def _detach(self) -> None:
        self._executor.shutdown(wait=True)
        client, self._client = self._client, None
        if client is None:
            return
        assert self._registrar is not None and self._marker_blob is not None
        self._marker_blob.release()
        self.pool.remove_registrar(self._registrar)
        _release_client(client)

    # -- running client calls ---------------------------------------------------------

    def _store(self) -> Any:
        """The client's store after a health check; call in a worker thread."""
        if self._client is None:
            raise BackendUnavailableError(f"{self.url}: not connected (open() failed)")
        self._client.healthy()
        return self._client.store

    async def _run(
        self, fn: Callable[[], T], *, abandon: Callable[[Future[T]], None] | None = None
    ) -> T:
        """Run ``fn`` in a worker thread. If the caller is cancelled, ``fn`` still runs
        (or never starts); ``abandon`` then gets its future once done, to free what it holds."""
        self._check_open()
        try:
            future = self._executor.submit(fn)
        except RuntimeError:  # shut down by a concurrent close()
            raise BackendUnavailableError(f"{self.url}: backend is closed") from None
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if abandon is not None:
                future.add_done_callback(abandon)
            raise

    # -- reads --------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        validate_keys(keys)
        self._check_open()
        if not keys:
            return []
        unique = list(dict.fromkeys(keys))
        found = await self._run(lambda: self._get(unique), abandon=_release_found)
        out: list[Buffer | None] = []
        seen: set[str] = set()
        for key in keys:
            blob = found.get(key)
            out.append(blob.retain() if blob is not None and key in seen else blob)
            seen.add(key)
        hits = sum(blob is not None for blob in out)
        self._counters.add(hits=hits, misses=len(out) - hits)
        return out

    def _get(self, keys: list[str]) -> dict[str, Buffer]:
        """The blobs of the stored ``keys`` (unique), each with one reference."""
        store = self._store()
        found: dict[str, Buffer] = {}
        try:
            sizes = self._sizes.known(keys)
            if len(sizes) < len(keys):
                sizes.update(self._query_sizes(store, [k for k in keys if k not in sizes]))
            pending = [k for k in keys if k in sizes]
            for attempt in range(2):
                outgrown = self._read_into(store, pending, sizes, found)
                if not outgrown:
                    break
                if attempt == 0:
                    sizes = self._query_sizes(store, outgrown)
                    pending = [k for k in outgrown if k in sizes]
                else:
                    self._counters.add(key_errors=len(outgrown))
            missing = [k for k in keys if k not in found]
            if missing:
                for key in self._empty(store, missing):
                    found[key] = self.pool.acquire(0)
        except BaseException:
            _release_all(found.values())
            raise
        return found

    def _query_sizes(self, store: Any, keys: list[str]) -> dict[str, int]:
        """Sizes of the stored ``keys`` from the master (absent keys are left out; so
        are all when the master is down, which :meth:`_empty` then detects)."""
        self._counters.add(size_queries=1)
        sizes = {}
        for key, replicas in store.batch_get_replica_desc(keys).items():
            for replica in replicas:
                if replica.is_memory_replica():
                    sizes[key] = int(replica.get_memory_descriptor().buffer_descriptor.size)
                    break
                if replica.is_disk_replica():
                    sizes[key] = int(replica.get_disk_descriptor().object_size)
                    break
        return sizes

    def _read_into(
        self, store: Any, keys: list[str], sizes: dict[str, int], found: dict[str, Buffer]
    ) -> list[str]:
        """Read ``keys`` into pool buffers of their expected ``sizes`` (adding hits to
        ``found``); returns the keys whose object no longer fits."""
        if not keys:
            return []
        bufs = [self.pool.acquire(sizes[k]) for k in keys]
        try:
            codes = store.batch_get_into(
                keys, [address_of(b.block) for b in bufs], [b.capacity for b in bufs]
            )
        except BaseException:
            _release_all(bufs)
            raise
        outgrown, absent, unreachable = [], [], None
        for key, buf, code in zip(keys, bufs, codes, strict=True):
            if code >= 0:
                buf.resize(code)
                found[key] = buf
                continue
            buf.release()
            if code == INVALID_PARAMS:
                outgrown.append(key)
            elif code in UNREACHABLE:
                unreachable = code
            elif code in ABSENT:
                absent.append(key)
            else:
                log.warning("mooncake: reading %s failed (code %d)", key, code)
                self._counters.add(key_errors=1)
        self._sizes.remember({k: found[k].nbytes for k in keys if k in found})
        self._sizes.forget(absent)
        if unreachable is not None:
            raise _unreachable("get", unreachable)
        return outgrown

    def _empty(self, store: Any, keys: list[str]) -> list[str]:
        """Those of the missing ``keys`` that hold an empty blob (their marker exists and
        they do not); raises if the master is unreachable."""
        codes = self._exist(store, [*keys, *map(_marker, keys)])
        n = len(keys)
        return [
            k
            for k, own, marker in zip(keys, codes[:n], codes[n:], strict=True)
            if marker and not own
        ]

    @staticmethod
    def _exist(store: Any, keys: list[str]) -> list[bool]:
        codes = store.batch_is_exist(keys)
        for code in codes:
            if code in UNREACHABLE:
                raise _unreachable("exists", code)
            if code < 0:
                raise BackendError(f"mooncake: checking whether keys exist failed (code {code})")
        return [code == 1 for code in codes]

    async def contains_many(self, keys: Sequence[str]) -> list[bool]:
        validate_keys(keys)
        self._check_open()
        if not keys:
            return []
        return await self._run(lambda: self._contains(list(keys)))

    def _contains(self, keys: list[str]) -> list[bool]:
        codes = self._exist(self._store(), [*keys, *map(_marker, keys)])
        n = len(keys)
        return [own or marker for own, marker in zip(codes[:n], codes[n:], strict=True)]

    # -- writes -------------------------------------------------------------------------

    async def put_many(
        self, items: Sequence[tuple[str, Buffer]], mode: PutMode = PutMode.OVERWRITE
    ) -> list[bool]:
        validate_keys([key for key, _ in items])
        self._check_open()
        if not items:
            return []
        # A repeated key: its last value is written over the others (OVERWRITE), or
        # only its first CREATE is tried.
        order = range(len(items)) if mode is PutMode.OVERWRITE else reversed(range(len(items)))
        chosen = {items[i][0]: i for i in order}
        batch = {key: items[i][1] for key, i in chosen.items()}
        blobs = [buf.retain() for buf in batch.values()]

        def write() -> dict[str, bool]:
            try:
                pairs = list(zip(batch, blobs, strict=True))
                if mode is PutMode.OVERWRITE:
                    return self._overwrite(pairs)
                return self._create(pairs)
            finally:
                _release_all(blobs)

        def abandon(future: Future[dict[str, bool]]) -> None:
            if future.cancelled():  # never ran: drop the references taken for it
                _release_all(blobs)

        stored = await self._run(write, abandon=abandon)
        if mode is PutMode.OVERWRITE:
            return [stored[key] for key, _ in items]
        return [stored[key] and chosen[key] == i for i, (key, _) in enumerate(items)]

    def _overwrite(self, items: list[tuple[str, Buffer]]) -> dict[str, bool]:
        """``OVERWRITE``: upsert each blob; an empty one as its key's marker, after which
        the key's own object is removed."""
        store = self._store()
        assert self._marker_blob is not None
        objects = [(k, b) if b.nbytes else (_marker(k), self._marker_blob) for k, b in items]
        with self._staged(objects) as addresses:
            names = [name for name, _ in objects]
            sizes = [b.nbytes for _, b in objects]
            codes = _retry_busy(
                lambda todo: store.batch_upsert_from(
                    [names[i] for i in todo],
                    [addresses[i] for i in todo],
                    [sizes[i] for i in todo],
                    self._config,
                ),
                len(objects),
            )
        stored = dict(zip((k for k, _ in items), self._written("put", names, codes), strict=True))
        emptied = [k for k, b in items if not b.nbytes and stored[k]]
        if emptied:
            self._remove(store, emptied)
        self._sizes.remember({k: b.nbytes for k, b in items if stored[k] and b.nbytes})
        self._sizes.forget(k for k, b in items if not (stored[k] and b.nbytes))
        return stored

    def _create(self, items: list[tuple[str, Buffer]]) -> dict[str, bool]:
        """``CREATE``: reserve each absent key with a put session (which the master refuses
        for an existing key), transfer, then end the sessions."""
        store = self._store()
        stored = {k: False for k, _ in items}
        present = self._contains([k for k, _ in items])
        todo = [item for item, found in zip(items, present, strict=True) if not found]
        if not todo:
            return stored
        assert self._marker_blob is not None
        objects = [(k, b) if b.nbytes else (_marker(k), self._marker_blob) for k, b in todo]
        names = [name for name, _ in objects]
        sizes = [b.nbytes for _, b in objects]
        with self._staged(objects) as addresses:
            codes = store.batch_put_session_start(names, sizes, self._config)
            go = [i for i, ok in enumerate(self._written("create", names, codes)) if ok]
            if not go:
                return stored
            moved = store.batch_put_from_multi_buffer_ranges(
                [names[i] for i in go],
                [[addresses[i]] for i in go],
                [[sizes[i]] for i in go],
                [[0] for _ in go],
            )
        done = [i for i, n in zip(go, moved, strict=True) if n == sizes[i]]
        failed = [names[i] for i in go if i not in done]
        if failed:
            log.warning("mooncake: transferring %d new keys failed: %s", len(failed), moved)
            self._counters.add(key_errors=len(failed))
            store.batch_put_session_revoke(failed)
        ended = store.batch_put_session_end([names[i] for i in done]) if done else []
        for i, ok in zip(
            done, self._written("create", [names[i] for i in done], ended), strict=True
        ):
            stored[todo[i][0]] = ok
        self._sizes.remember({k: b.nbytes for k, b in todo if stored[k] and b.nbytes})
        return stored

    @contextlib.contextmanager
    def _staged(self, objects: list[tuple[str, Buffer]]) -> Iterator[list[int]]:
        """Addresses of the objects' bytes in registered memory: each buffer's own, or a
        pool copy's where it lies outside (the copies are released on exit)."""
        assert self._client is not None
        copies = []
        addresses = []
        for _, buf in objects:
            address = self._client.address(buf)
            if address is None:
                copy = self.pool.copy_of(buf.view)
                copies.append(copy)
                address = address_of(copy.block)
            addresses.append(address)
        try:
            yield addresses
        finally:
            _release_all(copies)

    def _written(self, what: str, names: Sequence[str], codes: Sequence[int]) -> list[bool]:
        """Whether each object was written; raises if the master was unreachable."""
        for code in codes:
            if code in UNREACHABLE:
                raise _unreachable(what, code)
        for name, code in zip(names, codes, strict=True):
            if code in FULL:
                self._counters.add(rejected=1)
            elif code not in (0, OBJECT_ALREADY_EXISTS):
                log.warning("mooncake: writing %s failed (code %d)", name, code)
                self._counters.add(key_errors=1)
        return [code == 0 for code in codes]

    # -- deletes ------------------------------------------------------------------------

    async def delete_many(self, keys: Sequence[str]) -> list[bool]:
        validate_keys(keys)
        self._check_open()
        if not keys:
            return []
        unique = list(dict.fromkeys(keys))
        removed = await self._run(lambda: self._delete(unique))
        out = []
        for key in keys:
            out.append(removed.pop(key, False))  # a repeated key is removed once
        return out

    def _delete(self, keys: list[str]) -> dict[str, bool]:
        store = self._store()
        self._sizes.forget(keys)
        found = self._remove(store, [*keys, *map(_marker, keys)])
        n = len(keys)
        return {k: own or marker for k, own, marker in zip(keys, found[:n], found[n:], strict=True)}

    def _remove(self, store: Any, names: list[str]) -> list[bool]:
        """Force-remove objects; whether each existed."""
        codes = _retry_busy(
            lambda todo: store.batch_remove([names[i] for i in todo], True), len(names)
        )
        removed = []
        for name, code in zip(names, codes, strict=True):
            if code in UNREACHABLE:
                raise _unreachable("delete", code)
            if code not in (0, OBJECT_NOT_FOUND):
                log.warning("mooncake: removing %s failed (code %d)", name, code)
                self._counters.add(key_errors=1)
            removed.append(code == 0)
        return removed

    # -- listing and stats --------------------------------------------------------------

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every stored chunk key, from the master's key list (needs ``admin_url``)."""
        self._check_open()
        text = await self._run(lambda: self._admin("get_all_keys"))
        seen: set[str] = set()
        for line in text.splitlines():
            key = line.strip().removesuffix(EMPTY_MARKER)
            if key.startswith(prefix) and key not in seen and is_valid_key(key):
                seen.add(key)
                yield key

    async def stats(self) -> BackendStats:
        """This backend's counters; with ``admin_url``, the store's key count, bytes
        used, capacity and evictions (store-wide, all clients) in ``details["store"]``."""
        self._check_open()
        details: dict[str, Any] = {
            "master": self._settings.master,
            "replica_num": self.options.replica_num,
            **self._counters.as_dict(),
        }
        if self.options.admin_url is not None:
            metrics = _parse_metrics(await self._run(lambda: self._admin("metrics")))
            details["store"] = {
                "keys": metrics.get("master_key_count"),
                "bytes_used": metrics.get("master_allocated_bytes"),
                "capacity_bytes": metrics.get("master_total_capacity_bytes"),
                "evicted_keys": metrics.get("master_evicted_key_count"),
            }
        return BackendStats(details=details)

    def _admin(self, path: str) -> str:
        """GET ``admin_url/path`` (blocking)."""
        if self.options.admin_url is None:
            raise ConfigError(
                f"{self.url}: listing keys and store counters need the master's HTTP "
                "address: set the tier option admin_url: http://<master host>:<metrics port>"
            )
        url = f"{self.options.admin_url}/{path}"
        try:
            with urllib.request.urlopen(url, timeout=self.options.connect_timeout) as reply:
                return str(reply.read().decode())
        except (urllib.error.URLError, OSError) as exc:
            raise BackendUnavailableError(f"mooncake: GET {url} failed: {exc}") from exc


def _parse_metrics(text: str) -> dict[str, int]:
    """Unlabelled integer samples of a Prometheus text exposition."""
    metrics = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name and not name.startswith("#") and "{" not in name:
            try:
                metrics[name] = int(float(value))
            except ValueError:
                continue
    return metrics


def _release_all(bufs: Iterable[Buffer]) -> None:
    for buf in bufs:
        buf.release()


def _release_found(future: Future[dict[str, Buffer]]) -> None:
    if not future.cancelled() and future.exception() is None:
        _release_all(future.result().values())
