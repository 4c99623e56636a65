"""The ``vineyard://`` tier against real vineyardd servers: the conformance suite, URLs
and options, the naming scheme, zero-copy views that outlive deletes by other
processes, eviction, sweeping up after crashed processes, a killed and restarted
vineyardd (alone and under the tier chain), two processes on one vineyardd, RPC, two
vineyardd sharing etcd metadata, and ``kvtier migrate`` / ``check-backend``."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from servers._process import free_port, require
from servers.vineyard import (
    EtcdServer,
    NetNamespace,
    VineyardFactory,
    VineyardServer,
    socket_answers,
)
from test_engine import CHUNK, LAYOUT, prompt
from test_migrate import KEYS, cli, dump, fill, migrated, open_store, table_rows
from test_nixl_backend import listening_addresses
from test_redis_backend import wait_until

from kvtier.core import KVTier
from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import BufferPool
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.errors import BackendUnavailableError, ConfigError
from kvtier.core.factory import build_backend
from kvtier.core.keys import ChunkKey
from kvtier.core.plugins import get_registry
from kvtier.core.testing import BackendConformance

T = TypeVar("T")
MiB = 1 << 20
PEER = Path(__file__).parent / "peers" / "vineyard_peer.py"
PREFIX = "kvtier/"


@pytest.fixture(autouse=True)
def vineyard_installed() -> None:
    require("kvtier.backends.vineyard.client", "'kvtier[vineyard]'")


def run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(body())


def key(i: int, ns: str = "vy") -> str:
    return f"{ns}.{i:032x}"


def make(url: str, capacity: int = 64 * MiB, **options: Any) -> Backend:
    return build_backend(url, capacity=capacity, options=options)


# -- out of band: the layout, written and read with a plain vineyard client ------------


def raw_put(server: VineyardServer, key: str, data: bytes, prefix: str = PREFIX) -> None:
    """Store a chunk as the tier lays it out: a blob in a ``kvtier::Chunk@<prefix>``
    object, persisted and named ``<prefix>k/<key>``."""
    from kvtier.backends.vineyard.client import ObjectMeta

    client = server.client()
    if data:
        builder = client.create_blob(len(data))
        builder.copy(0, data)
        blob = builder.seal(client)
    else:
        blob = client.create_empty_blob()
    meta = ObjectMeta()
    meta["typename"] = f"kvtier::Chunk@{prefix}"
    meta["nbytes"] = len(data)
    meta["key"] = key
    meta.add_member("buffer", blob)
    meta = client.create_metadata(meta)
    client.persist(meta.id)
    client.put_name(meta.id, f"{prefix}k/{key}")


def raw_get(server: VineyardServer, key: str, prefix: str = PREFIX) -> bytes | None:
    from kvtier.backends.vineyard.client import MISSING

    client = server.client()
    try:
        meta = client.get_meta(client.get_name(f"{prefix}k/{key}"))
    except MISSING:
        return None
    return bytes(memoryview(client.get_blob(meta["buffer"].id)))


class TestVineyardConformance(BackendConformance):
    """Every contract check against the session's vineyardd, out of band through a
    plain vineyard client."""

    capacity = 96 * MiB

    @pytest.fixture
    def backend_url(self, vineyard_server: VineyardServer) -> str:
        self.server = vineyard_server
        return vineyard_server.url

    def stop_server(self, url: str) -> None:
        self.server.kill()  # the fixture restarts it for the next test

    def raw_write(self, backend: Backend, key: str, data: bytes) -> None:
        raw_put(self.server, key, data)

    def raw_read(self, backend: Backend, key: str) -> bytes | None:
        return raw_get(self.server, key)


# -- URLs, options, registration -------------------------------------------------------


def test_registered_with_its_extra() -> None:
    spec = get_registry().backend_for_url("vineyard:///run/vineyard.sock")
    assert (spec.name, spec.extra) == ("vineyard", "vineyard")
    assert spec.load().__name__ == "VineyardBackend"


def test_urls() -> None:
    from kvtier.backends.vineyard.url import Target, parse_url

    assert parse_url("vineyard:///run/v6d/vineyard.sock") == Target(socket="/run/v6d/vineyard.sock")
    assert parse_url("vineyard://10.0.0.5:9600") == Target(host="10.0.0.5", port=9600)
    assert parse_url("vineyard://[::1]:9600") == Target(host="::1", port=9600)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("vineyard://run/vineyard.sock", "has no path"),
        ("vineyard:///run/", "name a file"),
        ("vineyard://host", "needs host:port"),
        ("vineyard://host:99999", "port '99999'"),
        ("vineyard:///x.sock?size=1", "query"),
        ("vineyard://u@host:1", "user"),
    ],
)
def test_bad_urls_say_how_to_write_them(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        build_backend(url, capacity=MiB)
    assert "vineyard:///path/to/vineyard.sock" in str(info.value)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"key_prefix": "no-slash"}, "end with '/'"),
        ({"key_prefix": "a*/"}, "key_prefix"),
        ({"evict_to": 0}, "evict_to"),
        ({"threads": 0}, "threads"),
        ({"prefix": "x/"}, "prefix"),
    ],
)
def test_bad_options(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_backend("vineyard:///run/vineyard.sock", capacity=MiB, options=options)


def test_needs_a_capacity() -> None:
    with pytest.raises(ConfigError, match="capacity"):
        build_backend("vineyard:///run/vineyard.sock")


def test_unreachable_socket_fails_at_once(tmp_path: Path) -> None:
    backend = make(f"vineyard://{tmp_path}/none.sock")
    start = time.perf_counter()
    with pytest.raises(BackendUnavailableError, match="does not accept connections"):
        run(backend.open)
    assert time.perf_counter() - start < 2  # not vineyard's ten retries a second apart


def test_listens_on_no_tcp_port(vineyard_server: VineyardServer) -> None:
    assert vineyard_server.proc is not None
    assert listening_addresses(vineyard_server.proc.pid) == []


# -- layout, zero copy, pins ------------------------------------------------------------


def test_layout_and_zero_copy_views(vineyard_server: VineyardServer) -> None:
    """Names are ``<prefix>k/<key>``; a hit is a read-only view of the blob where the
    backend's client maps vineyardd's shared memory, not a copy."""
    from kvtier.backends.vineyard.leases import LeasedView

    async def body() -> None:
        async with make(vineyard_server.url, key_prefix="t1/") as backend:
            data = os.urandom(3 * MiB + 1)
            with backend.pool.copy_of(data) as buf:
                assert await backend.put_many([(key(1), buf)]) == [True]
            assert raw_get(vineyard_server, key(1), "t1/") == data
            client = vineyard_server.client()
            assert list(client.list_names("t1/k/*", False, 100)) == [f"t1/k/{key(1)}"]
            [view] = await backend.get_many([key(1)])
            assert isinstance(view, LeasedView) and view.view.readonly
            meta = client.get_meta(client.get_name(f"t1/k/{key(1)}"))
            mapped = backend.connection.client().get_blob(meta["buffer"].id)  # type: ignore[attr-defined]
            assert mapped.address == torch.frombuffer(view.view, dtype=torch.uint8).data_ptr()
            pins = client.list_names("t1/pin/*", False, 100)
            assert len(pins) == 1, "one pin while the view lives"
            view.release()  # a worker thread drops the pin: close() waits for it

    run(body)
    assert vineyard_server.client().list_names("t1/pin/*", False, 100) == {}


def test_overwrite_and_delete_free_the_old_blob(vineyard_server: VineyardServer) -> None:
    client = vineyard_server.client()

    async def body() -> None:
        async with make(vineyard_server.url) as backend:
            base = int(client.status.memory_usage)
            for size in (2 * MiB, 3 * MiB, MiB):
                with backend.pool.copy_of(os.urandom(size)) as buf:
                    assert await backend.put_many([(key(1), buf)]) == [True]
                assert int(client.status.memory_usage) - base == size, "the old value was kept"
            assert await backend.delete_many([key(1), key(2)]) == [True, False]
            assert int(client.status.memory_usage) == base
            assert client.list_names("kvtier/*", False, 100) == {}

    run(body)


@dataclass
class Peer:
    """A second process with a vineyard tier (tests/peers/vineyard_peer.py)."""

    proc: subprocess.Popen[str]
    folder: Path

    def __call__(self, *words: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(words) + "\n")
        self.proc.stdin.flush()
        reply = self.proc.stdout.readline().strip()
        while reply and not reply.startswith("ok"):  # vineyard prints notes to stdout
            reply = self.proc.stdout.readline().strip()
        if not reply.startswith("ok"):
            error = (self.folder / "stderr.log").read_text()[-3000:]
            pytest.fail(f"peer did not do {words}: {reply!r}\n{error}")
        return reply[3:]

    def file(self, name: str, data: bytes | None = None) -> str:
        path = self.folder / name
        if data is not None:
            path.write_bytes(data)
        return str(path)


PeerFactory = Callable[..., Peer]


@pytest.fixture
def peer(tmp_path: Path) -> Iterator[PeerFactory]:
    """Start peers: ``peer(url, prefix="kvtier/", netns=None)``; ended after the test."""
    started: list[subprocess.Popen[str]] = []

    def start(url: str, prefix: str = PREFIX, netns: NetNamespace | None = None) -> Peer:
        folder = tmp_path / f"peer{len(started)}"
        folder.mkdir()
        argv = [sys.executable, "-P", str(PEER), url, "--prefix", prefix]
        proc = subprocess.Popen(
            argv if netns is None else netns.argv(argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(folder / "stderr.log", "w"),  # noqa: SIM115 - the process owns it
            text=True,
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        while line and line.strip() != "ready":  # vineyard prints notes to stdout
            line = proc.stdout.readline()
        if not line:
            proc.kill()
            pytest.fail(f"peer failed: {(folder / 'stderr.log').read_text()[-3000:]}")
        return Peer(proc, folder)

    yield start
    for proc in started:
        if proc.stdin is not None and proc.poll() is None:
            proc.stdin.close()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_views_survive_deletes_and_overwrites_by_another_process(
    vineyard_server: VineyardServer, peer: PeerFactory
) -> None:
    """Process B deletes and overwrites chunks this process holds views of, then fills
    the memory they took: the views keep their bytes, and their blobs are freed when
    released."""
    other = peer(vineyard_server.url)
    client = vineyard_server.client()
    first, second = os.urandom(4 * MiB), os.urandom(4 * MiB)

    async def body() -> int:
        async with make(vineyard_server.url) as backend:
            base = int(client.status.memory_usage)
            for i, data in ((1, first), (2, second)):
                assert other("put", key(i), other.file(f"v{i}", data)) == "True"
            views = await backend.get_many([key(1), key(2)])
            assert other("delete", key(1)) == "True"
            assert other("put", key(2), other.file("new", os.urandom(MiB))) == "True"
            for i in range(3, 9):  # reuses any memory freed too early
                assert other("put", key(i), other.file("fill", os.urandom(4 * MiB))) == "True"
            assert [bytes(v.view) for v in views if v] == [first, second]
            held = int(client.status.memory_usage) - base
            assert held == 8 * MiB + MiB + 6 * 4 * MiB, "the viewed blobs were freed"
            for view in views:
                assert view is not None
                view.release()  # a worker thread drops the pins: close() waits for it
            return base

    base = run(body)
    assert int(client.status.memory_usage) - base == MiB + 6 * 4 * MiB
    assert client.list_names("kvtier/gc/*", False, 100) == {}


def test_a_read_never_uses_a_chunk_being_deleted(vineyard_server: VineyardServer) -> None:
    """An object marked for deletion (its deleter may not see a new pin) is a miss."""
    from kvtier.backends.vineyard.client import ObjectID

    raw_put(vineyard_server, key(1), b"x" * 1000)
    client = vineyard_server.client()
    object_id = client.get_name(f"{PREFIX}k/{key(1)}")

    async def body() -> None:
        async with make(vineyard_server.url) as backend:  # its sweep would free a marked one
            client.put_name(ObjectID(int(object_id)), f"{PREFIX}gc/{int(object_id):016x}")
            assert await backend.get_many([key(1)]) == [None]
            assert (await backend.stats()).details["stale_views"] == 1

    run(body)
    assert not client.list_names(f"{PREFIX}pin/*", False, 10)


def test_sweep_repairs_what_crashed_processes_left(vineyard_server: VineyardServer, peer) -> None:
    """Pins of a killed process are dropped and their deleted objects freed; an object
    no name reaches is freed once older than ``reclaim_after``; dangling names go."""
    other = peer(vineyard_server.url)
    client = vineyard_server.client()
    assert other("put", key(1), other.file("a", os.urandom(2 * MiB))) == "True"
    assert other("hold", key(1)) == "hit"
    assert other("delete", key(1)) == "True"  # deferred: the peer itself views it
    other.proc.kill()
    other.proc.wait()
    base = int(client.status.memory_usage)
    raw_put(vineyard_server, key(2), os.urandom(MiB))
    client.drop_name(f"{PREFIX}k/{key(2)}")  # as if its writer died before naming it
    raw_put(vineyard_server, key(3), b"y")
    client.delete(client.get_name(f"{PREFIX}k/{key(3)}"))  # a name left dangling

    async def body() -> dict[str, int]:
        async with make(vineyard_server.url, reclaim_after=0.001) as backend:
            return dict(backend.swept)  # type: ignore[attr-defined]

    time.sleep(0.01)
    swept = run(body)
    assert swept == {"dead_pins": 1, "freed": 1, "unreachable": 1, "dangling_names": 1}
    assert int(client.status.memory_usage) == base - 2 * MiB
    assert client.list_names(f"{PREFIX}*", False, 100) == {}


# -- capacity -------------------------------------------------------------------------


def test_eviction_is_oldest_first_across_processes(
    vineyard_server: VineyardServer, peer: PeerFactory
) -> None:
    other = peer(vineyard_server.url)
    evicted: list[tuple[str, int]] = []

    async def body() -> None:
        async with make(vineyard_server.url, capacity=10 * MiB) as backend:
            backend.eviction_listener = evicted.extend
            for i in range(4):  # 8 MiB, half of it written by the other process
                data = os.urandom(2 * MiB)
                if i % 2 == 0:
                    assert other("put", key(i), other.file("d", data)) == "True"
                else:
                    with backend.pool.copy_of(data) as buf:
                        assert await backend.put_many([(key(i), buf)]) == [True]
            with backend.pool.copy_of(os.urandom(3 * MiB)) as buf:
                assert await backend.put_many([(key(9), buf)]) == [True]
            # 11 MiB > 10: down to 0.9 * 10 MiB - 3 MiB = 6 MiB: the oldest goes, though
            # the other process wrote it
            assert evicted == [(key(0), 2 * MiB)]
            found = await backend.contains_many([key(i) for i in (0, 1, 2, 3, 9)])
            assert found == [False, True, True, True, True]
            stats = await backend.stats()
            assert (stats.bytes_used, stats.evictions) == (9 * MiB, 1)

    run(body)


def test_a_full_vineyardd_evicts_then_refuses(vineyard_factory: VineyardFactory) -> None:
    server = vineyard_factory(size="16Mi")

    async def body() -> None:
        async with make(server.url, capacity=64 * MiB) as backend:
            for i in range(6):  # vineyardd holds four
                with backend.pool.copy_of(os.urandom(4 * MiB)) as buf:
                    assert await backend.put_many([(key(i), buf)]) == [True]
            assert (await backend.stats()).evictions == 2
            found = await backend.contains_many([key(i) for i in range(6)])
            assert found == [False, False, True, True, True, True]
            with backend.pool.copy_of(os.urandom(17 * MiB)) as big:
                assert await backend.put_many([(key(99), big)], PutMode.CREATE) == [False]
            stats = await backend.stats()
            assert stats.details["rejected_full"] == 1 and stats.evictions == 2, "evicted in vain"

    run(body)


# -- faults -----------------------------------------------------------------------------


def test_killed_vineyardd_is_unavailable_then_used_again(vineyard_factory) -> None:
    server = vineyard_factory()

    async def body() -> None:
        async with make(server.url) as backend:
            with backend.pool.copy_of(os.urandom(MiB)) as buf:
                assert await backend.put_many([(key(1), buf)]) == [True]
                [view] = await backend.get_many([key(1)])
                server.kill()
                for call in (
                    lambda: backend.get_many([key(1)]),
                    lambda: backend.put_many([(key(2), buf)]),
                    lambda: backend.contains_many([key(1)]),
                    lambda: backend.delete_many([key(1)]),
                    backend.stats,
                ):
                    with pytest.raises(BackendUnavailableError):
                        await call()
                assert view is not None and bytes(view.view) == bytes(buf.view)  # still mapped
                view.release()
                server.start()  # the same socket, empty
                assert await backend.get_many([key(1)]) == [None]
                assert await backend.put_many([(key(2), buf)]) == [True]
                [again] = await backend.get_many([key(2)])
                assert again is not None and bytes(again.view) == bytes(buf.view)
                again.release()

    run(body)


def test_the_chain_skips_a_killed_vineyardd_and_uses_it_when_back(vineyard_factory) -> None:
    server = vineyard_factory()
    config = {
        "chunk_tokens": CHUNK,
        "retry_after": 0.2,
        "tiers": [{"name": "shm", "url": server.url, "capacity": "32MiB", "timeout": 2.0}],
    }
    tokens, kv = prompt(4 * CHUNK)
    with KVTier.open(config, model="test-model", layout=LAYOUT) as cache:
        cache.store(tokens, kv)
        cache.flush()
        n, got = cache.retrieve(tokens)
        assert n == 4 * CHUNK and torch.equal(got, kv)
        server.kill()
        assert cache.lookup(tokens) == 0
        assert cache.retrieve(tokens)[0] == 0
        later, kv2 = prompt(3 * CHUNK, seed=1)
        cache.store(later, kv2)
        cache.flush()
        stats = cache.stats().tier("shm")
        assert stats.errors >= 1 and not stats.available
        server.start()

        def stored_again() -> bool:
            cache.store(later, kv2)
            cache.flush()
            return cache.lookup(later) == 3 * CHUNK

        wait_until(stored_again, "a store into the restarted vineyardd")
        n, got = cache.retrieve(later)
        assert n == 3 * CHUNK and torch.equal(got, kv2)
        assert cache.stats().tier("shm").available


# -- two processes, RPC, two hosts --------------------------------------------------------


def real_blob(k: str, tokens: int = 64) -> bytes:
    pipeline = CodecPipeline.from_config("raw", get_registry())
    with pipeline.encode(k, torch.randn(2, 2, tokens, 4, 64), BufferPool()).buf as buf:
        return bytes(buf.view)


def chunk_key() -> str:
    return str(ChunkKey("vineyard-test", os.urandom(16)))


def test_two_processes_share_one_vineyardd(vineyard_server: VineyardServer, peer) -> None:
    other = peer(vineyard_server.url)
    theirs = {chunk_key(): real_blob("x") for _ in range(3)}
    for k, data in theirs.items():
        assert other("put", k, other.file(k, data)) == "True"
    ours = {chunk_key(): os.urandom(300_000)}

    async def body() -> None:
        async with make(vineyard_server.url) as backend:
            got = await backend.get_many(list(theirs))
            assert [bytes(b.view) for b in got if b] == list(theirs.values())
            for b in got:
                assert b is not None
                b.release()
            [(k, data)] = ours.items()
            with backend.pool.copy_of(data) as buf:
                assert await backend.put_many([(k, buf)]) == [True]
            assert other("get", k, other.file("back")) == "hit"
            assert Path(other.file("back")).read_bytes() == data
            listed = sorted([k async for k in backend.iter_keys()])
            assert listed == sorted([*theirs, k])

    run(body)
    assert json.loads(other("stats"))["hits"] == 1


def test_rpc_url_from_a_process_on_loopback(vineyard_factory, netns, peer) -> None:
    """``vineyard://127.0.0.1:PORT``: a process that reaches vineyardd over RPC (copies)
    reads what this process wrote over IPC, and writes what it reads. vineyardd's RPC
    port listens on every address of its network namespace, whose only interface is
    loopback."""
    port = free_port()
    server = vineyard_factory(rpc_port=port, netns=netns)
    assert server.proc is not None
    assert Path(f"/proc/{server.proc.pid}/net/dev").read_text().count(":") == 1  # lo only
    assert listening_addresses(server.proc.pid) == ["0.0.0.0"]
    remote = peer(f"vineyard://127.0.0.1:{port}", netns=netns)
    data, back = real_blob("a"), os.urandom(2 * MiB + 7)

    async def body() -> None:
        async with make(server.url) as backend:
            with backend.pool.copy_of(data) as buf:
                assert await backend.put_many([(key(1), buf)]) == [True]
            assert remote("get", key(1), remote.file("got")) == "hit"
            assert Path(remote.file("got")).read_bytes() == data
            assert remote("put", key(2), remote.file("back", back)) == "True"
            [got] = await backend.get_many([key(2)])
            assert got is not None and bytes(got.view) == back
            got.release()
            assert json.loads(remote("stats"))["data_path"] == "rpc"

    run(body)


def test_two_vineyardd_sharing_etcd_metadata(
    vineyard_factory, netns, etcd_server: EtcdServer, peer
) -> None:
    """Two vineyardd (as on two hosts) share metadata in etcd: a chunk written through
    one is read through the other (fetched over RPC from the one holding the blob), and
    deleting it there frees it here."""
    a = vineyard_factory(rpc_port=free_port(), etcd=etcd_server, netns=netns)
    b = vineyard_factory(rpc_port=free_port(), etcd=etcd_server, netns=netns)
    reader = peer(b.url, netns=netns)
    data = real_blob("b", tokens=256)

    async def body() -> None:
        async with make(a.url) as backend:
            with backend.pool.copy_of(data) as buf:
                assert await backend.put_many([(key(1), buf)]) == [True]
            wait_until(lambda: reader("get", key(1), reader.file("got")) == "hit", "b sees it")
            assert Path(reader.file("got")).read_bytes() == data
            assert reader("delete", key(1)) == "True"
            wait_until(lambda: int(a.client().status.memory_usage) == 0, "a frees the blob")
            assert await backend.get_many([key(1)]) == [None]

    run(body)
    assert socket_answers(a.socket) and socket_answers(b.socket)


# -- kvtier migrate and check-backend ------------------------------------------------------


def test_migrate_to_and_from_vineyard(monkeypatch, capsys, tmp_path, vineyard_server) -> None:
    async def fill_source() -> dict[str, bytes]:
        async with open_store(f"file://{tmp_path}/src") as src:
            await fill(src, KEYS)
            return await dump(src)

    original = run(fill_source)
    code, out, err = cli(
        monkeypatch, capsys, "migrate", f"file://{tmp_path}/src", vineyard_server.url,
        "--dst-capacity", "64MiB", "--dst-option", "key_prefix=mig/",
    )  # fmt: skip
    assert code == 0, err
    assert table_rows(out)["copied"] == str(len(KEYS))

    async def back() -> None:
        async with make(vineyard_server.url, key_prefix="mig/") as shm:
            assert await dump(shm) == original
            async with open_store(f"file://{tmp_path}/back") as dst:
                report = await migrated(shm, dst, verify=True, delete_source=True)
                assert (report.copied, report.deleted) == (len(KEYS), len(KEYS))
                assert await dump(dst) == original
            assert [k async for k in shm.iter_keys()] == []

    run(back)


def test_check_backend_passes(monkeypatch, capsys, vineyard_server) -> None:
    code, out, _ = cli(
        monkeypatch, capsys, "check-backend", vineyard_server.url, "--capacity", "96MiB",
        "--pytest-arg=-m", "--pytest-arg=not slow", "--pytest-arg=-p", "--pytest-arg=no:randomly",
    )  # fmt: skip
    assert code == 0, out
    assert " passed" in out and "failed" not in out
