"""The ``nixl://`` tier: the conformance suite in one process, then peer reads between
two real processes over NIXL/UCX on loopback with a real Valkey index: identical
bytes, stale entries, stopped and killed owners, an index restart, and the tier chain
riding out an index outage."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from servers._process import free_port, require
from servers.valkey import ValkeyFactory, ValkeyServer
from test_memory_backend import RamStoreAccess

from kvtier.core import KVLayout, KVTier
from kvtier.core.backend import Backend
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.errors import BackendUnavailableError, ConfigError, MissingExtraError
from kvtier.core.factory import build_backend
from kvtier.core.keys import ChunkKey
from kvtier.core.plugins import get_registry
from kvtier.core.testing import BackendConformance

T = TypeVar("T")
OWNER = Path(__file__).parent / "peers" / "nixl_owner.py"
MiB = 1 << 20


@pytest.fixture(autouse=True)
def nixl_installed() -> None:
    require("nixl_cu12", "kvtier[nixl]")


# -- conformance (one process: local hits) -----------------------------------------------


class TestNixlConformance(RamStoreAccess, BackendConformance):
    """Every contract check against this process's store (out of band through
    ``backend.store``, like the cpu tier's). Not overridden:
    ``stop_server`` - with the index down, local hits are still served (they need no
    index), so only operations that need the index raise; see the chain test below."""

    url = "nixl://conformance"
    capacity = 96 * MiB

    @pytest.fixture
    def backend_options(self, valkey_server: ValkeyServer) -> Mapping[str, Any]:
        return {"index": valkey_server.url, "ttl": 2}


# -- helpers -----------------------------------------------------------------------------


def chunk_key() -> str:
    return str(ChunkKey("nixl-test", os.urandom(16)))


def make_blob(key: str, tokens: int, pool: BufferPool) -> Buffer:
    """A real blob (raw codec) of a random ``[2, 2, tokens, 4, 64]`` fp32 chunk."""
    pipeline = CodecPipeline.from_config("raw", get_registry())
    return pipeline.encode(key, torch.randn(2, 2, tokens, 4, 64), pool).buf


def open_backend(url: str, pool: BufferPool, **options: Any) -> Backend:
    return build_backend(url, capacity=64 * MiB, options=options, pool=pool)


def run(body: Callable[[], Coroutine[Any, Any, T]]) -> T:
    return asyncio.run(body())


def group() -> str:
    return f"t{uuid.uuid4().hex[:12]}"


@dataclass
class Owner:
    """A second kvtier process holding chunks in a ``nixl`` tier (tests/peers)."""

    proc: subprocess.Popen[str]
    agent: str

    def command(self, line: str) -> None:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == "ok", f"owner did not do {line!r}"

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def stop(self) -> None:
        """End of input: the owner closes its tier and exits."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(30) == 0


OwnerFactory = Callable[..., Owner]


@pytest.fixture
def nixl_owner(tmp_path: Path) -> Iterator[OwnerFactory]:
    """Start owners: ``nixl_owner(index_url, group, blobs, ttl=1)``; killed after the test."""
    started: list[subprocess.Popen[str]] = []

    def start(index: str, grp: str, blobs: Mapping[str, Buffer], ttl: float = 1.0) -> Owner:
        folder = tmp_path / f"owner{len(started)}"
        folder.mkdir()
        for key, blob in blobs.items():
            (folder / key).write_bytes(blob.view)
        args = [sys.executable, str(OWNER), "--index", index, "--group", grp, "--ttl", str(ttl)]
        proc = subprocess.Popen(
            [*args, *(str(folder / key) for key in blobs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(folder / "stderr.log", "w"),  # noqa: SIM115 - the process owns it
            text=True,
            env={**os.environ, "NIXL_LOG_LEVEL": "WARN"},
        )
        started.append(proc)
        assert proc.stdout is not None
        line = proc.stdout.readline().split()
        if line[:1] != ["ready"]:
            proc.kill()
            pytest.fail(f"owner failed: {(folder / 'stderr.log').read_text()[-3000:]}")
        return Owner(proc, line[1])

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def blob_set(pool: BufferPool, tokens: list[int]) -> dict[str, Buffer]:
    """Real blobs of chunks with the given token counts, by key."""
    blobs = {}
    for n in tokens:
        key = chunk_key()
        blobs[key] = make_blob(key, n, pool)
    return blobs


def listening_addresses(pid: int) -> list[str]:
    """Local addresses of the TCP sockets ``pid`` listens on (from /proc)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with open(f"/proc/{pid}/net/{table}") as f:
            for row in f.readlines()[1:]:
                fields = row.split()
                if fields[3] == "0A" and fields[9] in inodes:  # LISTEN
                    raw = bytes.fromhex(fields[1].split(":")[0])
                    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                    found.append(socket.inet_ntop(family, words))
    return found


# -- options and plugin ------------------------------------------------------------------


def test_registered_with_its_extra() -> None:
    spec = get_registry().backend_for_url("nixl://x")
    assert (spec.name, spec.extra) == ("nixl", "nixl")
    assert spec.load().__name__ == "NixlBackend"


@pytest.mark.parametrize(
    ("url", "options", "capacity", "message"),
    [
        ("nixl://", {}, MiB, "'index' is required"),
        ("nixl://", {"index": "http://127.0.0.1:6379"}, MiB, "index must be a Redis"),
        ("nixl://", {"index": "redis://h:6379/0", "ttl": 0}, MiB, "ttl"),
        ("nixl://", {"index": "redis://h:6379/0", "net_devices": "lo eth0"}, MiB, "net_devices"),
        ("nixl://", {"index": "redis://h:6379/0", "indx": 1}, MiB, "did you mean 'index'"),
        ("nixl://a/b", {"index": "redis://h:6379/0"}, MiB, "nixl://<group>"),
        ("nixl://", {"index": "redis://h:6379/0"}, None, "needs a positive capacity"),
    ],
)
def test_bad_configuration_is_explained(
    url: str, options: dict[str, Any], capacity: int | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        build_backend(url, capacity=capacity, options=options)


def test_unreachable_index_is_unavailable_without_showing_its_password() -> None:
    index = f"redis://:secret@127.0.0.1:{free_port()}/0"

    async def body() -> None:
        backend = open_backend("nixl://", BufferPool(), index=index)
        try:
            with pytest.raises(BackendUnavailableError) as info:
                await backend.open()
            assert "secret" not in str(info.value) and "***" in str(info.value)
            assert "secret" not in str((await backend.stats()).details)
        finally:
            await backend.close()

    run(body)


@pytest.mark.parametrize("module", ["nixl_cu12", "redis"])
def test_missing_client_library_names_the_extra(
    monkeypatch: pytest.MonkeyPatch, module: str
) -> None:
    for name in list(sys.modules):
        if name == module or name.startswith((f"{module}.", "kvtier.backends.nixl.")):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    with pytest.raises(MissingExtraError, match=r"kvtier\[nixl\]"):
        build_backend("nixl://", capacity=MiB, options={"index": "redis://h:6379/0"})


# -- two processes -----------------------------------------------------------------------


def test_peer_reads_identical_bytes(valkey_server: ValkeyServer, nixl_owner: OwnerFactory) -> None:
    """Process A stores; this process reads every chunk through nixl:// byte for byte,
    in any order, with misses and duplicates; nothing of A's is stored here."""
    pool, grp = BufferPool(), group()
    blobs = blob_set(pool, [1, 16, 64, 256, 1024, 3])  # 4 KiB .. 2 MiB
    owner = nixl_owner(valkey_server.url, grp, blobs)
    assert all(address.startswith("127.") for address in listening_addresses(owner.proc.pid))

    async def body() -> None:
        async with open_backend(f"nixl://{grp}", pool, index=valkey_server.url) as reader:
            keys = [*blobs, chunk_key(), next(iter(blobs))]
            random.shuffle(keys)
            assert await reader.contains_many(keys) == [k in blobs for k in keys]
            got = await reader.get_many(keys)
            for key, buf in zip(keys, got, strict=True):
                if key not in blobs:
                    assert buf is None
                    continue
                assert buf is not None and bytes(buf.view) == bytes(blobs[key].view)
                buf.release()
            stats = await reader.stats()
            assert stats.keys == 0 and stats.details["remote_hits"] == len(blobs)
            assert [k async for k in reader.iter_keys()] == []
            other = open_backend("nixl://another-group", pool, index=valkey_server.url)
            async with other:
                assert await other.get_many(list(blobs)) == [None] * len(blobs)

    run(body)
    owner.stop()  # closing withdraws A's entries at once

    async def after() -> None:
        async with open_backend(f"nixl://{grp}", pool, index=valkey_server.url) as reader:
            assert await reader.contains_many(list(blobs)) == [False] * len(blobs)

    run(after)


def test_stale_entries_are_misses(
    valkey_server: ValkeyServer, nixl_owner: OwnerFactory, tmp_path: Path
) -> None:
    """An entry whose memory now holds another chunk, or that points at the wrong
    length, is a miss (counted as stale); the chunk really there is still served."""
    redis = require("redis", "kvtier[redis]")
    pool, grp = BufferPool(), group()
    first, second = chunk_key(), chunk_key()
    blobs = {first: make_blob(first, 64, pool), second: make_blob(second, 64, pool)}
    owner = nixl_owner(valkey_server.url, grp, blobs)
    index = redis.Redis(host="127.0.0.1", port=valkey_server.port)
    chunks = f"kvtier:nixl:{grp}:chunks:{owner.agent}"
    old_entry = index.hget(chunks, first)
    gen, address, nbytes = old_entry.split(b":")

    # A deletes `first`, then stores `third` (same size) into the block `first` used.
    third = chunk_key()
    replacement = make_blob(third, 64, pool)
    path = tmp_path / third
    path.write_bytes(replacement.view)
    owner.command(f"delete {first}")
    owner.command(f"put {path}")
    assert index.hget(chunks, third).split(b":")[1] == address, "block was not reused"
    index.hset(chunks, first, old_entry)  # as if A's withdrawal had been lost
    second_address = index.hget(chunks, second).split(b":")[1]
    bogus = chunk_key()  # points at `second`, 8 bytes short
    index.hset(chunks, bogus, b"%s:%s:%d" % (gen, second_address, int(nbytes) - 8))

    async def body() -> None:
        async with open_backend(f"nixl://{grp}", pool, index=valkey_server.url) as reader:
            got = await reader.get_many([first, bogus, third, second])
            assert got[0] is None and got[1] is None
            assert got[2] is not None and bytes(got[2].view) == bytes(replacement.view)
            assert got[3] is not None and bytes(got[3].view) == bytes(blobs[second].view)
            assert (await reader.stats()).details["stale"] == 2
            for buf in got[2:]:
                assert buf is not None
                buf.release()

    run(body)


def test_stopped_and_killed_owner_give_misses(
    valkey_server: ValkeyServer, nixl_owner: OwnerFactory
) -> None:
    """A frozen owner is a miss within the transfer timeout, a killed one at once;
    neither raises; after the TTL the index no longer names the dead owner."""
    pool, grp = BufferPool(), group()
    blobs = blob_set(pool, [64, 64, 128])
    keys = list(blobs)
    owner = nixl_owner(valkey_server.url, grp, blobs, ttl=3.0)
    options = {"index": valkey_server.url, "ttl": 3.0, "transfer_timeout": 0.5}

    async def body() -> None:
        async with open_backend(f"nixl://{grp}", pool, **options) as reader:
            owner.signal(signal.SIGSTOP)  # cannot answer the connection set-up
            try:
                got = await asyncio.wait_for(reader.get_many(keys), timeout=5)
            finally:
                owner.signal(signal.SIGCONT)
            assert got == [None] * len(keys)
            assert (await reader.stats()).details["transfer_failures"] >= 1

            got = await reader.get_many(keys)  # reconnects
            assert [bytes(b.view) if b else None for b in got] == [
                bytes(blobs[k].view) for k in keys
            ]
            for buf in got:
                assert buf is not None
                buf.release()

            owner.signal(signal.SIGKILL)
            owner.proc.wait()
            assert await reader.get_many(keys) == [None] * len(keys)
            deadline = time.monotonic() + 30
            while any(await reader.contains_many(keys)):
                assert time.monotonic() < deadline, "a dead owner's entries never expired"
                await asyncio.sleep(0.2)
            assert await reader.get_many(keys) == [None] * len(keys)

    run(body)


# -- one process, two agents -------------------------------------------------------------


def test_unregistered_buffer_is_copied_and_shared(valkey_server: ValkeyServer) -> None:
    """A blob outside the tier's pool is copied into it, so peers can still read it."""
    grp, key = group(), chunk_key()
    blob = make_blob(key, 32, BufferPool())
    outside = Buffer.wrap(bytes(blob.view))

    async def body() -> None:
        owner = open_backend(f"nixl://{grp}", BufferPool(), index=valkey_server.url)
        reader = open_backend(f"nixl://{grp}", BufferPool(), index=valkey_server.url)
        async with owner, reader:
            assert await owner.put_many([(key, outside)]) == [True]
            assert (await owner.stats()).details["copied_in"] == 1
            [got] = await reader.get_many([key])
            assert got is not None and bytes(got.view) == bytes(blob.view)
            got.release()

    run(body)


def test_copies_and_checks_run_off_the_event_loop(
    valkey_server: ValkeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Copying a blob into registered memory and verifying a blob read from a peer
    happen in the tier's worker threads, never on the event loop's."""
    from kvtier.backends.nixl import reader as reader_module

    seen: dict[str, set[str]] = {"copy": set(), "verify": set()}
    verify = reader_module.verify

    class RecordingPool(BufferPool):
        def copy_of(self, data: Any) -> Buffer:
            seen["copy"].add(threading.current_thread().name)
            return super().copy_of(data)

    def recording_verify(blob: Any, *, expected_key: str | None = None) -> Any:
        seen["verify"].add(threading.current_thread().name)
        return verify(blob, expected_key=expected_key)

    monkeypatch.setattr(reader_module, "verify", recording_verify)
    grp, key = group(), chunk_key()
    blob = make_blob(key, 32, BufferPool())

    async def body() -> None:
        owner = open_backend(f"nixl://{grp}", RecordingPool(), index=valkey_server.url)
        reader = open_backend(f"nixl://{grp}", BufferPool(), index=valkey_server.url)
        async with owner, reader:
            assert await owner.put_many([(key, Buffer.wrap(bytes(blob.view)))]) == [True]
            [got] = await reader.get_many([key])
            assert got is not None and bytes(got.view) == bytes(blob.view)
            got.release()

    run(body)
    assert seen["copy"] and seen["verify"]
    for names in seen.values():
        assert all(name.startswith("kvtier-NixlBackend") for name in names), seen


def test_batch_read_part_by_part(
    valkey_server: ValkeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With one transfer per chunk, each moved chunk is verified while the next one
    moves: the batch comes back byte for byte, and a stale entry in its middle (the
    memory of another chunk) is a miss."""
    from kvtier.backends.nixl import reader as reader_module

    redis = require("redis", "kvtier[redis]")
    monkeypatch.setattr(reader_module, "PART_BYTES", 1)
    grp, stale = group(), chunk_key()
    blobs = blob_set(BufferPool(), [16, 32, 64, 16, 8])
    keys = list(blobs)
    options = {"index": valkey_server.url, "concurrency": 1}

    async def body() -> None:
        owner = open_backend(f"nixl://{grp}", BufferPool(), **options)
        reader = open_backend(f"nixl://{grp}", BufferPool(), **options)
        async with owner, reader:
            assert await owner.put_many(list(blobs.items())) == [True] * len(blobs)
            index = redis.Redis(host="127.0.0.1", port=valkey_server.port)
            [chunks] = index.keys(f"kvtier:nixl:{grp}:chunks:*")
            index.hset(chunks, stale, index.hget(chunks, keys[0]))
            asked = [*keys[:2], stale, *keys[2:]]
            got = await reader.get_many(asked)
            assert got[2] is None
            for key, buf in zip(asked, got, strict=True):
                if key != stale:
                    assert buf is not None and bytes(buf.view) == bytes(blobs[key].view)
                    buf.release()
            details = (await reader.stats()).details
            assert (details["remote_hits"], details["stale"]) == (len(keys), 1)

    run(body)


def test_index_restart_republishes(valkey_factory: ValkeyFactory) -> None:
    """An index that restarts empty is filled again by the owners' heartbeats."""
    server, grp, key = valkey_factory(), group(), chunk_key()
    blob = make_blob(key, 32, BufferPool())
    options = {"index": server.url, "ttl": 0.6}

    async def body() -> None:
        owner = open_backend(f"nixl://{grp}", BufferPool(), **options)
        reader = open_backend(f"nixl://{grp}", BufferPool(), **options)
        async with owner, reader:
            assert await owner.put_many([(key, blob)]) == [True]
            assert await reader.contains_many([key]) == [True]
            server.stop()
            server.start()
            deadline = time.monotonic() + 30
            while True:
                [got] = await reader.get_many([key])
                if got is not None:
                    break
                assert time.monotonic() < deadline, "the owner never published again"
                await asyncio.sleep(0.1)
            assert bytes(got.view) == bytes(blob.view)
            got.release()

    run(body)


def test_stale_remembered_location_is_looked_up_again(valkey_server: ValkeyServer) -> None:
    """A reader remembers where a chunk was; when that memory now holds another chunk,
    it asks the index again and reads the chunk from its new owner."""
    grp, key, other = group(), chunk_key(), chunk_key()
    options = {"index": valkey_server.url, "ttl": 30}

    async def body() -> None:
        first_pool, second_pool = BufferPool(), BufferPool()
        first = open_backend(f"nixl://{grp}", first_pool, **options)
        second = open_backend(f"nixl://{grp}", second_pool, **options)
        reader = open_backend(f"nixl://{grp}", BufferPool(), **options)
        async with first, second, reader:
            with make_blob(key, 32, first_pool) as blob:
                want = bytes(blob.view)
                assert await first.put_many([(key, blob)]) == [True]
            [got] = await reader.get_many([key])  # remembered: on `first`
            assert got is not None
            got.release()
            assert await first.delete_many([key]) == [True]
            with make_blob(other, 32, first_pool) as blob:  # reuses the freed block
                assert await first.put_many([(other, blob)]) == [True]
            with make_blob(key, 32, second_pool) as blob:
                blob.view[:] = want
                assert await second.put_many([(key, blob)]) == [True]
            [got] = await reader.get_many([key])
            assert got is not None and bytes(got.view) == want
            got.release()
            details = (await reader.stats()).details
            assert (details["stale"], details["remote_hits"]) == (1, 2)

    run(body)


def test_index_outage_keeps_local_chunks_and_publishes_later(
    valkey_factory: ValkeyFactory,
) -> None:
    """With the index down, local hits are still served, anything that needs the index
    raises BackendUnavailableError, and a chunk stored meanwhile is kept and
    published once the index is back."""
    server, grp = valkey_factory(), group()
    before, during = chunk_key(), chunk_key()
    options = {"index": server.url, "ttl": 0.6}

    async def body() -> None:
        pool = BufferPool()
        owner = open_backend(f"nixl://{grp}", pool, **options)
        reader = open_backend(f"nixl://{grp}", BufferPool(), **options)
        async with owner, reader:
            with make_blob(before, 16, pool) as blob:
                assert await owner.put_many([(before, blob)]) == [True]
            server.stop()
            [got] = await owner.get_many([before])
            assert got is not None
            got.release()
            assert await owner.contains_many([before]) == [True]
            with pytest.raises(BackendUnavailableError):
                await owner.get_many([chunk_key()])
            with make_blob(during, 16, pool) as blob, pytest.raises(BackendUnavailableError):
                await owner.put_many([(during, blob)])
            assert (await owner.stats()).keys == 2
            server.start()
            deadline = time.monotonic() + 30
            while await reader.contains_many([before, during]) != [True, True]:
                assert time.monotonic() < deadline, "the chunks were never published"
                await asyncio.sleep(0.1)

    run(body)


# -- the tier chain ----------------------------------------------------------------------

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float32)
CHUNK = 16


def prompt(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n,), generator=gen)
    return tokens, torch.randn(LAYOUT.chunk_shape(n), generator=gen)


def chain(index: str, grp: str) -> dict[str, Any]:
    return {
        "chunk_tokens": CHUNK,
        "retry_after": 0.1,
        "tiers": [
            {
                "url": f"nixl://{grp}",
                "capacity": "32MiB",
                "timeout": 5,
                "options": {"index": index, "ttl": 0.6, "transfer_timeout": 1},
            }
        ],
    }


def test_two_kvtiers_share_chunks(valkey_server: ValkeyServer) -> None:
    """What one KVTier stores, another (own pool, own agent) retrieves from its memory."""
    tokens, kv = prompt(4 * CHUNK, seed=1)
    cfg = chain(valkey_server.url, group())
    with (
        KVTier.open(cfg, model="m", layout=LAYOUT, pool=BufferPool()) as owner,
        KVTier.open(cfg, model="m", layout=LAYOUT, pool=BufferPool()) as reader,
    ):
        owner.store(tokens, kv)
        owner.flush()
        assert reader.lookup(tokens) == 4 * CHUNK
        n, got = reader.retrieve(tokens)
        assert n == 4 * CHUNK and torch.equal(got, kv)
        assert reader.stats().tier("nixl").hits == 4


def test_chain_rides_out_an_index_outage(valkey_factory: ValkeyFactory) -> None:
    """Index down mid-workload: store and retrieve never raise, the tier's errors are
    counted and it is skipped; index back: the tier is used again."""
    server = valkey_factory()
    before, during = prompt(2 * CHUNK, seed=2), prompt(2 * CHUNK, seed=3)
    with KVTier.open(chain(server.url, group()), model="m", layout=LAYOUT) as cache:
        cache.store(*before)
        cache.flush()
        server.stop()
        cache.store(*during)  # needs the index: fails inside the chain
        cache.flush()
        n, _ = cache.retrieve(during[0])
        assert n == 0
        stats = cache.stats().tier("nixl")
        assert stats.errors >= 1 and stats.stored == 2

        server.start()
        deadline = time.monotonic() + 30
        while cache.retrieve(during[0])[0] < 2 * CHUNK:  # stored (CREATE) or republished
            assert time.monotonic() < deadline, "the tier was never used again"
            time.sleep(0.2)
            cache.store(*during)
            cache.flush()
        for tokens, kv in (before, during):
            n, got = cache.retrieve(tokens)
            assert n == 2 * CHUNK and torch.equal(got, kv)


def test_close_returns_while_a_heartbeat_swallows_its_cancel(
    valkey_server: ValkeyServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """redis-py's asyncio pipeline can ignore a cancel that arrives as it starts and
    return normally; close() must not then wait for a heartbeat that beats on."""
    from kvtier.backends.nixl.index import PeerIndex

    beating = asyncio.Event()

    async def deaf_heartbeat(self: PeerIndex) -> bool:
        beating.set()
        with contextlib.suppress(asyncio.CancelledError):  # swallowed, as the pipeline does
            await asyncio.sleep(0.05)
        return True

    monkeypatch.setattr(PeerIndex, "heartbeat", deaf_heartbeat)

    async def body() -> None:
        backend = open_backend(f"nixl://{group()}", BufferPool(), index=valkey_server.url, ttl=0.6)
        await backend.open()
        await asyncio.wait_for(beating.wait(), 5)
        await asyncio.wait_for(backend.close(), 5)

    run(body)
