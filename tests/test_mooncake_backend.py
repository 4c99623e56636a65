"""The ``mooncake`` tier against a real Mooncake Store (master + metadata server on
127.0.0.1): the conformance suite (with raw reads and writes through a Mooncake
client), zero copy into pool memory, sizes, tiny blobs, one master call per batch,
per-key failures, options (without the native client), and faults through the engine
(master stopped and restarted, master frozen)."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import pytest
import torch
from servers.mooncake import MooncakeStore, require_client

from kvtier.backends.mooncake import MooncakeOptions, parse_mooncake_url
from kvtier.core import BufferPool, KVLayout, KVTier, PutMode
from kvtier.core.backend import Backend
from kvtier.core.buffers import Buffer, address_of
from kvtier.core.errors import BackendUnavailableError, ConfigError, MissingExtraError
from kvtier.core.factory import build_backend
from kvtier.core.hookspecs import hookimpl
from kvtier.core.plugins import PluginRegistry
from kvtier.core.specs import EventKind, TierEvent
from kvtier.core.testing import BackendConformance
from kvtier.core.testing.conformance import NAMESPACE, collect
from kvtier.core.validation import validate_model

T = TypeVar("T")
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16


def run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(body())


def key() -> str:
    return f"{NAMESPACE}.{os.urandom(16).hex()}"


def native(backend: Backend) -> Any:
    """The Mooncake client (``MooncakeDistributedStore``) an open backend uses."""
    return backend._client.store  # type: ignore[attr-defined]


def opened(store: MooncakeStore, pool: BufferPool | None = None, **options: Any) -> Backend:
    backend = build_backend(store.url, options=store.options(**options), pool=pool)
    run(backend.open)
    return backend


@pytest.fixture(scope="module")
def keep_client(mooncake_session: MooncakeStore) -> Iterator[None]:
    """Hold one backend open for the module: backends with the same settings share its
    Mooncake client, so the tests skip the client's 2 s close."""
    mooncake_session.start()
    backend = opened(mooncake_session)
    yield
    run(backend.close)


@pytest.fixture
def store(mooncake_server: MooncakeStore, keep_client: None) -> MooncakeStore:
    return mooncake_server


@pytest.fixture
def backend(store: MooncakeStore) -> Iterator[Backend]:
    backend = opened(store, pool=BufferPool())
    yield backend
    run(backend.close)


# -- the conformance suite --------------------------------------------------------------


class TestMooncakeConformance(BackendConformance):
    """The shared suite; ``test_stopped_server_is_unavailable`` runs on its own store."""

    dedicated: MooncakeStore | None = None

    @pytest.fixture
    def target(
        self,
        request: pytest.FixtureRequest,
        store: MooncakeStore,
        mooncake_factory: Callable[[], MooncakeStore],
    ) -> MooncakeStore:
        if request.node.originalname == "test_stopped_server_is_unavailable":
            self.dedicated = mooncake_factory()
            return self.dedicated
        return store

    @pytest.fixture
    def backend_url(self, target: MooncakeStore) -> str:
        return target.url

    @pytest.fixture
    def backend_options(self, target: MooncakeStore) -> Mapping[str, Any]:
        return target.options()

    def stop_server(self, url: str) -> None:
        assert self.dedicated is not None and self.dedicated.url == url
        self.dedicated.stop()

    def raw_write(self, backend: Backend, key: str, data: bytes) -> None:
        raw_write(backend, key, data)

    def raw_read(self, backend: Backend, key: str) -> bytes | None:
        return raw_read(backend, key)


# -- the store's layout, read and written with the Mooncake client ---------------------
#
# A blob of two bytes or more is the object named by its key; a blob of 0 or 1 byte is
# a one-byte object (a zero byte for an empty blob) plus a one-byte marker object,
# "<key>#empty" or "<key>#byte", saying which, written before the object (the other
# marker is removed after it).

MARKERS = {0: "#empty", 1: "#byte"}


def raw_write(backend: Backend, key: str, data: bytes) -> None:
    """Store ``data`` under ``key`` in the store's layout, with the client's own calls."""
    client = native(backend)
    tiny = len(data) <= 1
    if tiny:
        put(backend, key + MARKERS[len(data)], b"\0")
    put(backend, key, data or b"\0")
    if tiny:
        client.remove(key + MARKERS[1 - len(data)], True)


def raw_read(backend: Backend, key: str) -> bytes | None:
    """The blob stored under ``key`` in the store's layout, or ``None``."""
    client = native(backend)
    size = client.get_size(key)
    if size < 0:
        return None
    with backend.pool.acquire(size) as buf:
        got = client.get_into(key, address_of(buf.block), size)
        assert got == size, f"get_into({key!r}) returned {got}"
        data = bytes(buf.view)
    if size > 1:
        return data
    empty, byte = (client.is_exist(key + MARKERS[n]) == 1 for n in (0, 1))
    if empty == byte:  # no marker (or both): not a blob
        return None
    return b"" if empty else data


def put(backend: Backend, name: str, data: bytes) -> None:
    """Upsert the object ``name`` from a registered copy of ``data``."""
    with backend.pool.copy_of(data) as buf:
        code = native(backend).upsert_from(name, address_of(buf.block), len(data))
        assert code == 0, f"upsert_from({name!r}) returned {code}"


# -- zero copy, sizes, empty blobs, per-key results ------------------------------------


def test_reads_land_in_registered_pool_memory(store: MooncakeStore) -> None:
    pool = BufferPool()
    early = pool.acquire(8192)  # mapped before open(): registered by open()
    backend = opened(store, pool=pool)
    client = backend._client  # type: ignore[attr-defined]
    try:
        assert client.address(early) is not None
        k, blob = key(), pool.copy_of(b"\x5a" * 70_000)
        assert run(lambda: backend.put_many([(k, blob)])) == [True]
        [got] = run(lambda: backend.get_many([k]))
        assert got is not None and bytes(got.view) == bytes(blob.view)
        assert client.address(got) is not None, "get_many read into memory Mooncake does not know"
        address = address_of(got.block)
        got.release()
        again = pool.acquire(70_000)
        assert address_of(again.block) == address, "the blob was not read into a pool buffer"
        again.release()
    finally:
        run(backend.close)
    assert client.address(early) is None, "close() left the pool's memory registered"
    early.release()


def test_a_put_cancelled_before_it_ran_lets_go_of_its_buffers(store: MooncakeStore) -> None:
    backend = opened(store, threads=1)
    gate = threading.Event()
    k, blob = key(), backend.pool.copy_of(b"q" * 10_000)

    async def body() -> None:
        assert backend.workers is not None
        busy = backend.workers.submit(gate.wait)  # the only worker thread
        put = asyncio.ensure_future(backend.put_many([(k, blob)]))
        while blob.refcount == 1:  # until put_many lent the blob to its queued call
            await asyncio.sleep(0)
        put.cancel()
        with pytest.raises(asyncio.CancelledError):
            await put
        assert blob.refcount == 1, "a put cancelled in the queue kept a reference"
        gate.set()
        await asyncio.wrap_future(busy)
        assert await backend.contains_many([k]) == [False], "a cancelled put still ran"

    try:
        run(body)
    finally:
        gate.set()
        run(backend.close)


def test_buffers_outside_the_pool_are_stored(backend: Backend) -> None:
    k = key()
    outside = Buffer.wrap(bytes(range(256)) * 40)  # read-only, not registered
    assert run(lambda: backend.put_many([(k, outside)])) == [True]
    [got] = run(lambda: backend.get_many([k]))
    assert got is not None and bytes(got.view) == bytes(outside.view)
    assert run(lambda: backend.put_many([(k, outside)], PutMode.CREATE)) == [False]


@pytest.mark.parametrize("new_size", [100, 300_000], ids=["shrunk", "grown"])
def test_reader_with_a_stale_size_gets_the_new_value(store: MooncakeStore, new_size: int) -> None:
    """A second backend remembers a key's old size; the key then changes size."""
    reader, writer = opened(store), opened(store)
    try:
        k = key()
        old, new = reader.pool.copy_of(b"o" * 20_000), writer.pool.copy_of(b"n" * new_size)
        assert run(lambda: reader.put_many([(k, old)])) == [True]
        assert run(lambda: writer.put_many([(k, new)])) == [True]
        [got] = run(lambda: reader.get_many([k]))
        assert got is not None and bytes(got.view) == bytes(new.view)
        asked = run(reader.stats).details["size_queries"]
        assert asked == (1 if new_size > 20_000 else 0), "the outgrown size was not asked"
    finally:
        run(reader.close)
        run(writer.close)


def test_a_new_backend_reads_what_another_wrote(store: MooncakeStore) -> None:
    writer, reader = opened(store), opened(store)
    try:
        items = [(key(), writer.pool.copy_of(bytes([i]) * (10_000 + i))) for i in range(3)]
        items += [(key(), writer.pool.acquire(0)), (key(), writer.pool.copy_of(b"1"))]
        assert run(lambda: writer.put_many(items)) == [True] * 5
        miss = key()
        got = run(lambda: reader.get_many([miss, *(k for k, _ in items)]))
        assert got[0] is None
        for (_, want), blob in zip(items, got[1:], strict=True):
            assert blob is not None and bytes(blob.view) == bytes(want.view)
        queries = run(reader.stats).details["size_queries"]
        assert queries == 1, "the sizes of a batch are asked at most once"
    finally:
        run(reader.close)
        run(writer.close)


class Calls:
    """The Mooncake client calls of one backend, recorded (a proxy for the real client)."""

    def __init__(self, client: Any) -> None:
        self._client = client
        self.names: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not name.startswith("batch_"):
            return attr

        def call(*args: Any) -> Any:
            self.names.append(name)
            return attr(*args)

        return call


@pytest.fixture
def calls(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Records the batch calls ``backend`` makes from now on."""
    client = backend._client  # type: ignore[attr-defined]
    recorder = Calls(client.store)
    monkeypatch.setattr(client, "store", recorder)
    return recorder


def test_one_master_call_per_batch(backend: Backend, calls: Calls) -> None:
    """CREATE reserves, moves and ends without asking whether keys exist; a batch of
    equal-sized chunks read cold, hits and misses, is one read."""
    written = [(key(), backend.pool.copy_of(os.urandom(50_000))) for _ in range(4)]
    cold = [(key(), backend.pool.copy_of(os.urandom(50_000))) for _ in range(3)]
    misses = [key(), key()]

    async def body() -> None:
        assert await backend.put_many(written, PutMode.CREATE) == [True] * 4
        assert calls.names == [
            "batch_put_session_start",
            "batch_put_from_multi_buffer_ranges",
            "batch_put_session_end",
        ]
        assert await backend.put_many(written, PutMode.CREATE) == [False] * 4
        assert calls.names[3:] == ["batch_put_session_start"], "a refused CREATE moved data"
        for k, blob in cold:  # written by another client: sizes this backend never saw
            put(backend, k, bytes(blob.view))
        del calls.names[:]
        got = await backend.get_many([*(k for k, _ in cold), *misses])
        assert calls.names == ["batch_get_into"]
        for (_, want), blob in zip(cold, got[: len(cold)], strict=True):
            assert blob is not None and bytes(blob.view) == bytes(want.view)
        assert got[len(cold) :] == [None, None]
        assert await backend.put_many(written) == [True] * 4
        assert calls.names[1:] == ["batch_upsert_from"]

    run(body)
    assert run(backend.stats).details["size_queries"] == 0


def test_a_much_smaller_blob_than_guessed_gets_a_fitting_buffer(
    backend: Backend, calls: Calls
) -> None:
    big, small = key(), key()
    put(backend, big, b"b" * 300_000)
    put(backend, small, b"s" * 5000)

    async def body() -> None:
        [got] = await backend.get_many([big])  # learns the size 300_000
        assert got is not None and got.nbytes == 300_000
        del calls.names[:]
        [got] = await backend.get_many([small])  # read into a 300_000-byte guess
        assert got is not None and bytes(got.view) == b"s" * 5000
        assert got.capacity < 2 * 8192, f"a 5000-byte blob holds {got.capacity} bytes"

    run(body)
    assert calls.names == ["batch_get_into"]


def test_a_larger_blob_than_guessed_is_asked_its_size(backend: Backend) -> None:
    small, big, bigger = key(), key(), key()
    put(backend, small, b"s" * 5000)
    put(backend, big, b"b" * 300_000)
    put(backend, bigger, b"B" * 400_000)

    async def body() -> None:
        [got] = await backend.get_many([small])  # the first read asks, then guesses
        assert got is not None and got.nbytes == 5000
        got = await backend.get_many([small, big, key()])
        assert [b.nbytes if b else None for b in got] == [5000, 300_000, None]
        assert (await backend.stats()).details["size_queries"] == 2
        got = await backend.get_many([bigger, key()])
        assert [b.nbytes if b else None for b in got] == [400_000, None]
        assert (await backend.stats()).details["size_queries"] == 3

    run(body)


def test_tiny_blobs_replace_and_are_replaced(store: MooncakeStore, backend: Backend) -> None:
    """Empty and one-byte blobs, over each other and over larger ones, as this backend
    and a fresh one read them."""
    k = key()
    full, empty, zero, one = (backend.pool.copy_of(v) for v in (b"f" * 5000, b"", b"\0", b"1"))

    async def read(reader: Backend) -> bytes | None:
        [got] = await reader.get_many([k])
        return None if got is None else bytes(got.view)

    async def body(other: Backend) -> None:
        for value in (full, empty, one, empty, zero, full, zero, one, empty):
            assert await backend.put_many([(k, value)]) == [True]
            for reader in (backend, other):
                assert await read(reader) == bytes(value.view)
            assert raw_read(backend, k) == bytes(value.view)
            assert await backend.put_many([(k, full)], PutMode.CREATE) == [False]
        assert [key async for key in backend.iter_keys(k)] == [k]
        assert await backend.delete_many([k]) == [True]
        assert await backend.contains_many([k]) == [False]
        assert await backend.get_many([k]) == [None]
        for value in (empty, one):
            assert await backend.put_many([(k, value)], PutMode.CREATE) == [True]
            assert await read(other) == bytes(value.view)
            assert await backend.put_many([(k, zero)], PutMode.CREATE) == [False]
            assert await backend.delete_many([k]) == [True]

    other = opened(store)
    try:
        run(lambda: body(other))
    finally:
        run(other.close)


@pytest.mark.parametrize(
    ("markers", "expected"),
    [((), None), (("#empty",), b""), (("#byte",), b"\x07"), (("#empty", "#byte"), None)],
    ids=["none", "empty", "byte", "both"],
)
def test_a_one_byte_object_is_read_by_its_marker(
    backend: Backend, markers: tuple[str, ...], expected: bytes | None
) -> None:
    """A one-byte object is an empty or one-byte blob as its only marker says, else a
    miss: with both markers a write in progress, left alone; with none malformed (a
    marker evicted), and removed."""
    k = key()
    put(backend, k, b"\x07")
    for marker in markers:
        put(backend, k + marker, b"\0")
    [got] = run(lambda: backend.get_many([k]))
    assert (None if got is None else bytes(got.view)) == expected
    if got is not None:
        got.release()
    assert (native(backend).is_exist(k) == 1) == bool(markers)


def test_a_blob_larger_than_the_store_fails_alone(
    mooncake_factory: Callable[[], MooncakeStore],
) -> None:
    """On its own store: the failed allocation makes the master evict keys, maybe the
    small one as soon as it is written, so only the big one's absence is checked."""
    store = mooncake_factory()
    backend = opened(store, global_segment_size="64MiB")
    big = backend.pool.acquire(100 << 20)  # never fits; contents do not matter
    k1, k2, small = key(), key(), backend.pool.copy_of(b"s" * 1000)

    async def body() -> None:
        assert await backend.put_many([(k1, big), (k2, small)]) == [False, True]
        assert await backend.contains_many([k1]) == [False]
        assert await backend.get_many([k1]) == [None]
        assert (await backend.stats()).details["rejected"] == 1

    try:
        run(body)
    finally:
        run(backend.close)


def test_stats_count_store_wide_keys(backend: Backend) -> None:
    async def body() -> None:
        before = (await backend.stats()).details["store"]
        items = [(key(), backend.pool.copy_of(b"x" * 4096)) for _ in range(3)]
        assert await backend.put_many(items) == [True] * 3
        after = (await backend.stats()).details["store"]
        evicted = after["evicted_keys"] - before["evicted_keys"]  # by the master, meanwhile
        assert after["keys"] - before["keys"] + evicted == 3
        assert after["bytes_used"] >= 3 * 4096
        assert after["capacity_bytes"] >= 256 << 20
        assert await backend.delete_many([k for k, _ in items]) == [True] * 3

    run(body)


def test_listing_needs_admin_url(store: MooncakeStore) -> None:
    backend = opened(store, admin_url=None)
    try:
        with pytest.raises(ConfigError, match="admin_url"):
            run(lambda: collect(backend.iter_keys()))
        assert "store" not in run(backend.stats).details
    finally:
        run(backend.close)


# -- configuration ---------------------------------------------------------------------


@pytest.fixture
def without_native_client(monkeypatch: pytest.MonkeyPatch) -> None:
    """As on a machine where Mooncake's client cannot load (no extra, or no libibverbs):
    importing ``mooncake`` fails, and the tier's modules are imported afresh."""
    for name in list(sys.modules):
        if name.startswith(("mooncake.", "kvtier.backends.mooncake.")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mooncake", None)
    monkeypatch.setitem(sys.modules, "mooncake.store", None)


@pytest.mark.parametrize(
    ("url", "options", "message"),
    [
        ("mooncake://", {"metadata_server": "P2PHANDSHAKE"}, "no master host"),
        ("mooncake://h:1/x", {"metadata_server": "P2PHANDSHAKE"}, "path, query"),
        ("mooncake://h:port", {"metadata_server": "P2PHANDSHAKE"}, "mooncake://<master host>"),
        ("mooncake://h:1", {}, "metadata_server"),
        ("mooncake://h:1", {"metadata_server": "h:8080"}, "http://host:port/metadata"),
        ("mooncake://h:1", {"metadata_server": "P2PHANDSHAKE", "soft_pin_ttl": 5}, "soft_pin"),
        ("mooncake://h:1", {"metadata_server": "P2PHANDSHAKE", "admin_url": "h:9"}, "admin_url"),
        ("mooncake://h:1", {"metadata_server": "P2PHANDSHAKE", "replicas": 2}, "replicas"),
    ],
)
@pytest.mark.usefixtures("without_native_client")
def test_bad_configuration_is_a_clear_error(
    url: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_backend(url, options=options)


@pytest.mark.usefixtures("without_native_client")
def test_default_master_port_and_options() -> None:
    assert parse_mooncake_url("mooncake://10.1.2.3") == "10.1.2.3:50051"
    assert parse_mooncake_url("mooncake://[::1]:7") == "[::1]:7"
    given = {"metadata_server": "etcd://h:2379", "global_segment_size": "4GiB"}
    options = validate_model(MooncakeOptions, given, "mooncake options")
    assert (options.global_segment_size, options.replica_num, options.threads) == (4 << 30, 1, 4)


def test_options_become_the_clients_replicate_config() -> None:
    require_client()  # builds Mooncake's own config type
    backend = build_backend(
        "mooncake://10.1.2.3",
        options={"metadata_server": "P2PHANDSHAKE", "soft_pin": True, "soft_pin_ttl": 2.5},
    )
    assert backend._settings.master == "10.1.2.3:50051"  # type: ignore[attr-defined]
    config = backend._config  # type: ignore[attr-defined]
    assert (config.replica_num, config.soft_pin_ttl_ms) == (1, 2500)
    assert "ENABLE" in str(config.soft_pin_action)


def test_unreachable_master_fails_open_quickly(
    mooncake_factory: Callable[[], MooncakeStore],
) -> None:
    store = mooncake_factory()
    store.stop()
    backend = build_backend(store.url, options=store.options(connect_timeout=1))
    with pytest.raises(BackendUnavailableError, match="cannot reach the master"):
        run(backend.open)
    run(backend.close)


@pytest.mark.usefixtures("without_native_client")
def test_a_missing_mooncake_says_which_extra_to_install() -> None:
    with pytest.raises(MissingExtraError, match=r"pip install 'kvtier\[mooncake\]'"):
        build_backend("mooncake://h:1", options={"metadata_server": "P2PHANDSHAKE"})


# -- faults through the engine ---------------------------------------------------------


class Events:
    """Records the tier events of one registry."""

    def __init__(self) -> None:
        self.seen: list[TierEvent] = []

    @hookimpl
    def kvtier_tier_event(self, event: TierEvent) -> None:
        self.seen.append(event)

    def failures(self, tier: str) -> list[str]:
        return [e.detail for e in self.seen if e.kind is EventKind.FAILED and e.tier == tier]


def prompt(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n,), generator=gen)
    return tokens, torch.randn(LAYOUT.chunk_shape(n), generator=gen).to(LAYOUT.dtype)


def open_engine(store: MooncakeStore, **tier: Any) -> tuple[KVTier, Events]:
    events = Events()
    registry = PluginRegistry()
    registry.pm.register(events)
    config = {
        "chunk_tokens": CHUNK,
        "retry_after": 0.2,
        "tiers": [{"url": store.url, "options": store.options(), "timeout": 2, **tier}],
    }
    return KVTier.open(config, model="m", layout=LAYOUT, registry=registry), events


def stored_and_served(kv: KVTier, seed: int) -> bool:
    """Store a prompt, then whether all of it is served back intact; never raises."""
    tokens, data = prompt(2 * CHUNK, seed)
    kv.store(tokens, data)
    kv.flush()
    n, got = kv.retrieve(tokens)
    return n == 2 * CHUNK and torch.equal(got, data)


def until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


OUTAGES = ("master unreachable", "does not answer", "cannot reach the master", "timed out after")
"""How a stopped master shows: a failed RPC, the client's heartbeat, a refused
connection, or an RPC the client retries past the tier's timeout."""


def test_engine_skips_a_stopped_master_and_uses_it_again(
    mooncake_factory: Callable[[], MooncakeStore],
) -> None:
    store = mooncake_factory()
    kv, events = open_engine(store)
    name = kv.stats().tiers[0].name
    try:
        assert stored_and_served(kv, seed=1)
        store.stop()
        for seed in range(2, 5):  # store and retrieve never raise; nothing is served
            assert not stored_and_served(kv, seed)
        stats = kv.stats().tier(name)
        assert stats.errors >= 1 and not stats.available
        failures = events.failures(name)
        assert failures, "the stopped master was not reported"
        for detail in failures:  # whichever way the outage showed first
            assert any(outage in detail for outage in OUTAGES), f"not an outage: {detail}"
        store.start()  # an empty master on the same port
        assert until(lambda: stored_and_served(kv, seed=9), 30), "the tier was not used again"
        assert kv.stats().tier(name).available
    finally:
        store.start()
        kv.close()


def test_engine_bounds_a_frozen_master_by_the_tier_timeout(
    mooncake_factory: Callable[[], MooncakeStore],
) -> None:
    store = mooncake_factory()
    kv, events = open_engine(store, timeout=1)
    name = kv.stats().tiers[0].name
    try:
        assert stored_and_served(kv, seed=1)
        store.pause()
        assert not stored_and_served(kv, seed=2)
        assert kv.lookup(prompt(2 * CHUNK, seed=1)[0]) == 0
        assert any("timed out after 1" in d for d in events.failures(name)), events.failures(name)
        store.resume()
        assert until(lambda: stored_and_served(kv, seed=3), 30), "the tier was not used again"
    finally:
        store.resume()
        kv.close()
