"""The ``mooncake`` tier against a real Mooncake Store (master + metadata server on
127.0.0.1): the conformance suite, zero copy into pool memory, sizes, empty blobs,
per-key failures, options, and faults through the engine (master stopped and
restarted, master frozen)."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping
from typing import Any, TypeVar

import pytest
import torch
from servers._process import require
from servers.mooncake import MooncakeStore

from kvtier.backends.mooncake import parse_mooncake_url
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

T = TypeVar("T")
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16


def run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(body())


def key() -> str:
    return f"{NAMESPACE}.{os.urandom(16).hex()}"


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
        items = [(key(), writer.pool.copy_of(bytes([i]) * (1000 + i))) for i in range(3)]
        items.append((key(), writer.pool.acquire(0)))
        assert run(lambda: writer.put_many(items)) == [True] * 4
        miss = key()
        got = run(lambda: reader.get_many([miss, *(k for k, _ in items)]))
        assert got[0] is None
        for (_, want), blob in zip(items, got[1:], strict=True):
            assert blob is not None and bytes(blob.view) == bytes(want.view)
        assert run(reader.stats).details["size_queries"] == 1, "sizes are asked once a batch"
    finally:
        run(reader.close)
        run(writer.close)


def test_empty_blobs_replace_and_are_replaced(backend: Backend) -> None:
    k, full, empty = key(), backend.pool.copy_of(b"f" * 5000), backend.pool.acquire(0)

    async def body() -> None:
        assert await backend.put_many([(k, full)]) == [True]
        assert await backend.put_many([(k, empty)]) == [True]
        [got] = await backend.get_many([k])
        assert got is not None and got.nbytes == 0
        assert await backend.put_many([(k, full)], PutMode.CREATE) == [False]
        assert [key async for key in backend.iter_keys(k)] == [k]
        assert await backend.put_many([(k, full)]) == [True]
        [got] = await backend.get_many([k])
        assert got is not None and bytes(got.view) == bytes(full.view)
        assert await backend.delete_many([k]) == [True]
        assert await backend.contains_many([k]) == [False]
        assert await backend.get_many([k]) == [None]

    run(body)


def test_a_blob_larger_than_the_store_fails_alone(
    mooncake_factory: Callable[[], MooncakeStore],
) -> None:
    """On its own store: the failed allocation makes the master evict some keys."""
    store = mooncake_factory()
    backend = opened(store, global_segment_size="64MiB")
    big = backend.pool.acquire(100 << 20)  # never fits; contents do not matter
    k1, k2, small = key(), key(), backend.pool.copy_of(b"s" * 1000)

    async def body() -> None:
        assert await backend.put_many([(k1, big), (k2, small)]) == [False, True]
        assert await backend.contains_many([k1, k2]) == [False, True]
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
def test_bad_configuration_is_a_clear_error(
    url: str, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_backend(url, options=options)


def test_default_master_port() -> None:
    assert parse_mooncake_url("mooncake://10.1.2.3") == "10.1.2.3:50051"
    assert parse_mooncake_url("mooncake://[::1]:7") == "[::1]:7"


def test_options_become_the_clients_replicate_config() -> None:
    require("mooncake.store", "kvtier[mooncake]")  # builds Mooncake's own config type
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


def test_a_missing_mooncake_says_which_extra_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "mooncake", None)  # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "mooncake.store", None)
    monkeypatch.delitem(sys.modules, "kvtier.backends.mooncake.backend", raising=False)
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
        assert any("unreachable" in d or "does not answer" in d for d in events.failures(name))
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
