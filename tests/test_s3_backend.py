"""The ``s3`` tier against a real SeaweedFS: the conformance suite, multipart and ranged
transfers, conditional writes, clear errors, truncated bodies, and the engine riding
out a stopped and a frozen server."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import torch
from servers.seaweedfs import SeaweedFactory, SeaweedFS

from kvtier.core import KVLayout, KVTier
from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import Buffer, BufferPool, default_pool
from kvtier.core.cli import main as cli_main
from kvtier.core.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigError,
    MissingExtraError,
)
from kvtier.core.factory import build_backend
from kvtier.core.testing import BackendConformance
from kvtier.core.testing.conformance import BackendHarness

pytest.importorskip("boto3", reason="pip install 'kvtier[s3]'")
from kvtier.backends.s3.backend import S3Backend

T = TypeVar("T")
MiB = 1 << 20
SMALL_PARTS = {"part_size": 5 * MiB, "multipart_threshold": 5 * MiB}
"""S3's smallest parts, so that a few MiB exercise multipart and ranged reads."""
FAST_FAIL = {"max_attempts": 1, "connect_timeout": 1}
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(scenario)


def key(i: int, ns: str = "s3test") -> str:
    return f"{ns}.{i:032x}"


def blob(nbytes: int) -> Buffer:
    return default_pool().copy_of(os.urandom(nbytes))


def make(server: SeaweedFS, url: str | None = None, **options: Any) -> Backend:
    return build_backend(url or server.url(), options=server.options(**options))


async def opened(server: SeaweedFS, url: str | None = None, **options: Any) -> Backend:
    backend = make(server, url, **options)
    await backend.open()
    return backend


def same(got: Buffer | None, want: Buffer) -> bool:
    return got is not None and bytes(got.view) == bytes(want.view)


class TestS3Conformance(BackendConformance):
    """The shared suite on the session server; the stopped-server test on its own."""

    @pytest.fixture
    def server(
        self,
        request: pytest.FixtureRequest,
        seaweedfs: SeaweedFS,
        seaweedfs_factory: SeaweedFactory,
    ) -> SeaweedFS:
        if request.node.originalname == "test_stopped_server_is_unavailable":
            self.own_server = seaweedfs_factory()
            return self.own_server
        return seaweedfs

    @pytest.fixture
    def backend_url(self, server: SeaweedFS) -> str:
        return server.url()

    @pytest.fixture
    def backend_options(self, server: SeaweedFS) -> dict[str, Any]:
        return server.options(**SMALL_PARTS, max_attempts=2, connect_timeout=1)

    def stop_server(self, url: str) -> None:
        self.own_server.kill()

    def raw_client(self, backend: Backend) -> Any:
        """A plain boto3 client of the backend's endpoint and credentials."""
        import boto3

        assert isinstance(backend, S3Backend)
        o = backend.options
        assert o.secret_access_key is not None
        return boto3.client(
            "s3",
            endpoint_url=o.endpoint_url,
            region_name=o.region,
            aws_access_key_id=o.access_key_id,
            aws_secret_access_key=o.secret_access_key.get_secret_value(),
        )

    def raw_write(self, backend: Backend, key: str, data: bytes) -> None:
        assert isinstance(backend, S3Backend)
        client = self.raw_client(backend)
        try:
            client.put_object(Bucket=backend.bucket, Key=backend.prefix + key, Body=data)
        finally:
            client.close()

    def raw_read(self, backend: Backend, key: str) -> bytes | None:
        assert isinstance(backend, S3Backend)
        client = self.raw_client(backend)
        try:
            body = client.get_object(Bucket=backend.bucket, Key=backend.prefix + key)["Body"]
            return bytes(body.read())
        except client.exceptions.NoSuchKey:
            return None
        finally:
            client.close()

    def test_raw_hooks_bypass_the_backend(self, backend_harness: BackendHarness) -> None:
        """What the backend puts, ``raw_read`` sees; what ``raw_write`` stores, it gets."""
        put, raw = backend_harness.items([MiB + 3, 0])

        async def body(backend: Backend) -> None:
            assert self.raw_read(backend, put[0]) is None
            assert await backend.put_many([put]) == [True]
            assert self.raw_read(backend, put[0]) == bytes(put[1].view)
            self.raw_write(backend, raw[0], b"out of band")
            [got] = await backend.get_many([raw[0]])
            assert got is not None and bytes(got.view) == b"out of band"
            got.release()

        backend_harness.run(body)


# -- configuration ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("s3://", "not a valid bucket name"),
        ("s3://ab/x", "not a valid bucket name"),
        ("s3://Bucket/x", "not a valid bucket name"),
        ("s3://key:secret@bucket/x", "not in the URL"),
        ("s3://bucket/a//b", "empty, '.' or '..' part"),
        ("s3://bucket/../b", "empty, '.' or '..' part"),
        ("s3://bucket/x?region=eu", "query or fragment"),
    ],
)
def test_bad_urls_are_clear_errors(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_backend(url)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"access_key_id": "AK"}, "both access_key_id and secret_access_key"),
        ({"session_token": "t"}, "session_token needs"),
        ({"profile": "p", "access_key_id": "a", "secret_access_key": "s"}, "profile or access"),
        ({"endpoint_url": "localhost:9000"}, "http://host:port"),
        ({"endpoint_url": "http://key:secret@minio:9000"}, "must not hold credentials"),
        ({"part_size": "1MiB"}, "part_size"),
        ({"part_size": "64MiB"}, "multipart_threshold"),
        ({"addressing_style": "dns"}, "addressing_style"),
        ({"max_attempt": 3}, "max_attempts"),
    ],
)
def test_bad_options_are_clear_errors(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_backend("s3://bucket/x", options=options)


def test_capacity_is_refused() -> None:
    with pytest.raises(ConfigError, match="lifecycle rule"):
        build_backend("s3://bucket/x", capacity=1 << 30)


def test_key_layout_and_prefix(seaweedfs: SeaweedFS) -> None:
    """Chunk ``k`` is object ``<prefix>/k``; other objects there are not keys."""
    import boto3

    prefix = f"layout-{os.urandom(4).hex()}/deep"
    s3 = boto3.client("s3", **seaweedfs.client_args())
    for foreign in ("notes.txt", "sub/" + key(9), ".hidden"):
        s3.put_object(Bucket="kvtier-test", Key=f"{prefix}/{foreign}", Body=b"x")

    async def scenario() -> tuple[list[str], bytes]:
        backend = await opened(seaweedfs, seaweedfs.url(prefix + "/"))
        try:
            assert await backend.put_many([(key(1), blob(10))]) == [True]
            listed = [k async for k in backend.iter_keys()]
            body = s3.get_object(Bucket="kvtier-test", Key=f"{prefix}/{key(1)}")["Body"].read()
            return listed, body
        finally:
            await backend.close()

    listed, body = run(scenario())
    assert listed == [key(1)]
    assert len(body) == 10


def test_the_plugin_module_does_not_import_boto3(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without boto3 the tier registers, and using it says which extra to install."""
    for module in ("boto3", "botocore"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now fails
    for module in [m for m in sys.modules if m.startswith("kvtier.backends.s3")]:
        monkeypatch.delitem(sys.modules, module)
    importlib.import_module("kvtier.backends.s3")
    with pytest.raises(MissingExtraError, match=re.escape("pip install 'kvtier[s3]'")):
        build_backend("s3://bucket/x")


# -- transfers -------------------------------------------------------------------------


def test_multipart_and_ranged_reads(seaweedfs: SeaweedFS) -> None:
    """A blob over the threshold goes up in parts and comes back in ranged GETs."""
    big, small = blob(11 * MiB + 3), blob(5 * MiB)

    async def scenario() -> None:
        backend = await opened(seaweedfs, **SMALL_PARTS)
        try:
            assert await backend.put_many([(key(1), big), (key(2), small)]) == [True, True]
            got = await backend.get_many([key(1), key(2), key(1)])
            assert same(got[0], big) and same(got[1], small) and same(got[2], big)
            assert got[0] is got[2] and got[0] is not None and got[0].refcount == 2
            for buf in got:
                assert buf is not None
                buf.release()
            details = (await backend.stats()).details
            assert details["multipart_uploads"] == 1, details
            assert details["ranged_reads"] == 1, details  # the duplicate key is read once
        finally:
            await backend.close()

    run(scenario())


def test_create_mode_with_native_and_emulated_conditions(seaweedfs: SeaweedFS) -> None:
    """SeaweedFS honours ``If-None-Match: *`` (``auto`` finds it); both ways, CREATE
    never replaces a value, for single PUTs and multipart uploads alike."""
    old, new, big_old, big_new = blob(100), blob(200), blob(6 * MiB), blob(7 * MiB)

    async def scenario(conditional_put: str) -> str:
        backend = await opened(seaweedfs, conditional_put=conditional_put, **SMALL_PARTS)
        try:
            created = await backend.put_many([(key(1), old), (key(2), big_old)], PutMode.CREATE)
            assert created == [True, True]
            again = await backend.put_many([(key(1), new), (key(2), big_new)], PutMode.CREATE)
            assert again == [False, False]
            got = await backend.get_many([key(1), key(2)])
            assert same(got[0], old) and same(got[1], big_old)
            # Only an atomic CREATE is one: the chain writes emulated stores with OVERWRITE.
            assert backend.capabilities.create_mode is (conditional_put == "auto")
            return str((await backend.stats()).details["conditional_put"])
        finally:
            await backend.close()

    assert run(scenario("auto")) == "native"
    assert run(scenario("emulated")) == "emulated"
    assert S3Backend.capabilities.create_mode, "narrowed per instance, not for the class"


def test_create_is_one_conditional_request(seaweedfs: SeaweedFS) -> None:
    """A native CREATE asks no HEAD first: a single PUT, or a multipart upload whose
    completion, with ``If-None-Match: *``, the store refuses where the key exists
    (the upload is then aborted)."""
    sent: list[tuple[str, str | None]] = []

    def record(model: Any, params: dict[str, Any], **_: Any) -> None:
        sent.append((model.name, params["headers"].get("If-None-Match")))

    async def scenario() -> None:
        backend = await opened(seaweedfs, conditional_put="native", **SMALL_PARTS)
        try:
            assert isinstance(backend, S3Backend)
            backend.client.meta.events.register("before-call.s3", record)
            items = [(key(1), blob(100)), (key(2), blob(11 * MiB))]  # 1 + 2 parts
            assert await backend.put_many(items, PutMode.CREATE) == [True, True]
            first = Counter(sent)
            sent.clear()
            assert await backend.put_many(items, PutMode.CREATE) == [False, False]
            again = Counter(sent)
        finally:
            await backend.close()
        conditional = Counter(
            {
                ("PutObject", "*"): 1,
                ("CreateMultipartUpload", None): 1,
                ("UploadPart", None): 2,
                ("CompleteMultipartUpload", "*"): 1,
            }
        )
        assert first == conditional
        assert again == conditional + Counter({("AbortMultipartUpload", None): 1})

    run(scenario())


@pytest.mark.parametrize("size", [100_000, 5 * MiB + 1], ids=["put", "multipart"])
def test_racing_creates_store_exactly_one_value(seaweedfs: SeaweedFS, size: int) -> None:
    """16 writers CREATE one key at once (16 requests in flight): exactly one
    succeeds, and the key holds that writer's value, whole.

    SeaweedFS 4.48 checks ``If-None-Match`` on a multipart completion outside its
    lock, so several racing completions may succeed (the last value stays): for
    multipart uploads, only the value is checked there."""
    writers = 16
    values = [blob(size + i) for i in range(writers)]  # the size names the writer

    async def scenario() -> tuple[list[bool], Buffer | None]:
        backend = await opened(
            seaweedfs, max_concurrency=writers, conditional_put="native", **SMALL_PARTS
        )
        try:
            creates = [backend.put_many([(key(1), v)], PutMode.CREATE) for v in values]
            results = await asyncio.gather(*creates)
            [got] = await backend.get_many([key(1)])
            return [won for [won] in results], got
        finally:
            await backend.close()

    won, got = run(scenario())
    winners = [v for v, ok in zip(values, won, strict=True) if ok]
    assert len(winners) == 1 or (size > SMALL_PARTS["multipart_threshold"] and winners), won
    assert got is not None and any(same(got, v) for v in winners), "a winner's value, whole"


def test_cancelled_transfers_release_every_buffer(seaweedfs: SeaweedFS) -> None:
    """Reads and writes cancelled at any point hand every pool buffer back once the
    requests they started have ended (at the latest when ``close()`` returns)."""
    pool = BufferPool()
    acquired: list[Buffer] = []
    acquire = pool.acquire

    def tracked(nbytes: int) -> Buffer:
        acquired.append(acquire(nbytes))
        return acquired[-1]

    pool.acquire = tracked  # type: ignore[method-assign]
    big, small = pool.copy_of(os.urandom(11 * MiB)), pool.copy_of(os.urandom(3 * MiB))

    async def cancelled(call: Coroutine[Any, Any, list[Any]], delay: float) -> None:
        task = asyncio.ensure_future(call)
        await asyncio.sleep(delay)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            for got in await task:
                if isinstance(got, Buffer):
                    got.release()

    async def scenario() -> None:
        options = seaweedfs.options(**SMALL_PARTS)
        backend = build_backend(seaweedfs.url(), options=options, pool=pool)
        await backend.open()
        try:
            assert await backend.put_many([(key(1), big), (key(2), small)]) == [True, True]
            for delay in (0, 0.002, 0.01, 0.03, 0.1):
                await cancelled(backend.get_many([key(1), key(2)]), delay)
                for mode in PutMode:
                    items = [(key(1), big), (key(3), small)]
                    await cancelled(backend.put_many(items, mode), delay)
        finally:
            await backend.close()

    run(scenario())
    assert (big.refcount, small.refcount) == (1, 1), "the caller's references only"
    live = [(buf.nbytes, buf.refcount) for buf in acquired if buf.refcount]
    assert live == [(big.nbytes, 1), (small.nbytes, 1)], live


def test_reads_never_mix_two_versions(seaweedfs: SeaweedFS) -> None:
    """A blob rewritten while ranged GETs read it comes back whole: one version."""
    versions = [blob(6 * MiB), blob(6 * MiB)]

    async def scenario() -> None:
        backend = await opened(seaweedfs, **SMALL_PARTS)
        try:
            assert await backend.put_many([(key(1), versions[0])]) == [True]

            async def rewrite() -> None:
                for i in range(1, 5):
                    await backend.put_many([(key(1), versions[i % 2])])

            writer = asyncio.create_task(rewrite())
            while not writer.done():
                [got] = await backend.get_many([key(1)])
                assert got is not None and any(same(got, v) for v in versions)
                got.release()
            await writer
        finally:
            await backend.close()

    run(scenario())


def test_iter_keys_pages_through_listings(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvtier.backends.s3 import bucket

    monkeypatch.setattr(bucket, "LIST_PAGE", 3)
    keys = [key(i) for i in range(8)]

    async def scenario() -> list[str]:
        backend = await opened(seaweedfs)
        try:
            await backend.put_many([(k, blob(1)) for k in keys])
            return [k async for k in backend.iter_keys("s3test.")]
        finally:
            await backend.close()

    assert sorted(run(scenario())) == keys


def test_an_object_larger_than_any_blob_is_a_miss(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvtier.backends.s3 import reads

    monkeypatch.setattr(reads, "MAX_OBJECT_BYTES", 100_000)
    small, big = blob(100_000), blob(100_001)

    async def scenario() -> list[bool]:
        backend = await opened(seaweedfs)
        try:
            await backend.put_many([(key(1), small), (key(2), big)])
            got = await backend.get_many([key(1), key(2)])
            return [same(got[0], small), got[1] is None]
        finally:
            await backend.close()

    assert run(scenario()) == [True, True]


def test_requests_run_on_the_bounded_pool(seaweedfs: SeaweedFS) -> None:
    """Every request is sent from the tier's threads, never from the event loop's, and
    no more than ``max_concurrency`` of them."""
    items = [(key(i), blob(64 * 1024)) for i in range(12)]
    senders: set[str] = set()

    async def scenario() -> None:
        backend = await opened(seaweedfs, max_concurrency=3)
        try:

            def record(**_: Any) -> None:
                senders.add(threading.current_thread().name)

            backend.client.meta.events.register("before-send.s3", record)
            await backend.put_many(items)
            for buf in await backend.get_many([k for k, _ in items]):
                assert buf is not None
                buf.release()
            await backend.delete_many([k for k, _ in items])
        finally:
            await backend.close()

    run(scenario())
    assert senders and all(name.startswith("kvtier-S3Backend") for name in senders), senders
    assert len(senders) <= 3, senders


# -- errors ----------------------------------------------------------------------------


def test_missing_bucket_is_a_clear_error(seaweedfs: SeaweedFS) -> None:
    with pytest.raises(BackendError, match="no-such-bucket") as info:
        run(opened(seaweedfs, seaweedfs.url(bucket="no-such-bucket")))
    assert not isinstance(info.value, BackendUnavailableError)
    assert seaweedfs.endpoint in str(info.value) and "create it" in str(info.value)


@pytest.mark.parametrize("wrong", ["access_key_id", "secret_access_key"])
def test_bad_credentials_are_a_clear_error_without_secrets(
    seaweedfs: SeaweedFS, wrong: str, caplog: pytest.LogCaptureFixture
) -> None:
    options = {wrong: "wrong" + os.urandom(8).hex()}
    with pytest.raises(BackendError, match="credentials") as info:
        run(opened(seaweedfs, **options))
    message = str(info.value)
    assert not isinstance(info.value, BackendUnavailableError)
    assert "kvtier-test" in message and seaweedfs.endpoint in message
    for secret in (seaweedfs.secret_key, options.get("secret_access_key", seaweedfs.secret_key)):
        assert secret not in message and secret not in caplog.text
        assert secret not in repr(make(seaweedfs, **options).options)


def test_unreachable_endpoint_is_unavailable(seaweedfs: SeaweedFS) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        with pytest.raises(BackendUnavailableError, match="cannot reach"):
            run(opened(seaweedfs, endpoint_url=endpoint, **FAST_FAIL))


class CuttingProxy:
    """A TCP proxy to a real server. With ``cut_after`` set, it closes each connection
    once it has forwarded that many response bytes: bodies arrive truncated."""

    def __init__(self, port: int) -> None:
        self.upstream = port
        self.cut_after: int | None = None
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream))
            for src, dst, cuts in ((client, server, False), (server, client, True)):
                threading.Thread(target=self._pump, args=(src, dst, cuts), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, cuts: bool) -> None:
        sent = 0
        try:
            while data := src.recv(65536):
                limit = self.cut_after if cuts else None
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: max(limit - sent, 0)])
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (src, dst):  # shutdown wakes the other pump, blocked in recv
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def cutting_proxy(seaweedfs: SeaweedFS) -> Iterator[CuttingProxy]:
    proxy = CuttingProxy(seaweedfs.s3_port)
    yield proxy
    proxy.close()


def test_truncated_bodies_are_never_data(seaweedfs: SeaweedFS, cutting_proxy: CuttingProxy) -> None:
    """Bodies cut short are read again, then fail the batch; the engine sees a miss."""
    small, big = blob(3 * MiB), blob(7 * MiB)
    url = seaweedfs.url()

    async def scenario() -> None:
        backend = await opened(
            seaweedfs, url, endpoint_url=cutting_proxy.endpoint, **SMALL_PARTS, **FAST_FAIL
        )
        try:
            assert await backend.put_many([(key(1), small), (key(2), big)]) == [True, True]
            cutting_proxy.cut_after = MiB
            for k in (key(1), key(2)):
                with pytest.raises(BackendUnavailableError, match="body"):
                    await backend.get_many([k])
            assert (await backend.stats()).details["reads_retried"] == 4
            cutting_proxy.cut_after = None
            got = await backend.get_many([key(1), key(2)])  # new connections: whole again
            assert same(got[0], small) and same(got[1], big)
        finally:
            await backend.close()

    run(scenario())


# -- the engine on a failing server ----------------------------------------------------


def prompt(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n,), generator=gen)
    return tokens, torch.randn(LAYOUT.chunk_shape(n), generator=gen).to(LAYOUT.dtype)


def engine(server: SeaweedFS, timeout: float, **options: Any) -> KVTier:
    tier = {"url": server.url("engine"), "timeout": timeout, "options": server.options(**options)}
    config = {"chunk_tokens": CHUNK, "retry_after": 0.2, "tiers": [tier]}
    return KVTier.open(config, model="s3-test", layout=LAYOUT)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} within {timeout} s"
        time.sleep(0.1)


def test_engine_skips_a_stopped_server_and_uses_it_again(
    seaweedfs_factory: SeaweedFactory,
) -> None:
    server = seaweedfs_factory()
    before, kv_before = prompt(3 * CHUNK, seed=1)
    during, kv_during = prompt(2 * CHUNK, seed=2)
    after, kv_after = prompt(2 * CHUNK, seed=3)
    with engine(server, timeout=5.0, **FAST_FAIL) as cache:
        cache.store(before, kv_before)
        cache.flush()
        server.kill()  # mid-workload: nothing below may raise
        assert cache.store(during, kv_during) == 2 * CHUNK
        cache.flush()
        assert cache.retrieve(before)[0] == 0
        assert cache.lookup(during) == 0
        stats = cache.stats().tier("s3")
        assert stats.errors >= 1 and not stats.available and stats.stored == 3

        server.start()  # same ports and data

        def back() -> bool:
            cache.store(after, kv_after)
            cache.flush()
            return cache.lookup(after) == 2 * CHUNK

        # Not the `stored` counter: a put that timed out may land later, and the
        # next CREATE of its keys then finds them present (counted as `rejected`).
        wait_until(back, "the tier is written again once the server is back")
        n, got = cache.retrieve(before)
        assert n == 3 * CHUNK and torch.equal(got, kv_before), "data survived the restart"
        assert cache.stats().tier("s3").available


def test_engine_bounds_a_frozen_server_by_the_tier_timeout(
    seaweedfs_factory: SeaweedFactory,
) -> None:
    server = seaweedfs_factory()
    tokens, kv = prompt(2 * CHUNK, seed=4)
    other, kv_other = prompt(2 * CHUNK, seed=5)
    with engine(server, timeout=0.5, max_attempts=1, read_timeout=5) as cache:
        cache.store(tokens, kv)
        cache.flush()
        server.pause()
        try:
            start = time.perf_counter()
            cache.store(other, kv_other)
            cache.flush()
            assert cache.retrieve(tokens)[0] == 0
            elapsed = time.perf_counter() - start
            stats = cache.stats().tier("s3")
        finally:
            server.resume()
        # Without the tier's timeout, the store and the retrieve would each wait out the
        # 5 s read timeout.
        assert elapsed < 3, f"a frozen server held the engine for {elapsed:.1f} s"
        assert stats.errors >= 1 and not stats.available
        wait_until(lambda: cache.retrieve(tokens)[0] == 2 * CHUNK, "reads once it thaws")


def test_engine_opens_while_the_server_is_down(seaweedfs_factory: SeaweedFactory) -> None:
    """An unreachable store at ``KVTier.open`` is skipped, then used once it is up."""
    server = seaweedfs_factory()
    server.kill()
    tokens, kv = prompt(2 * CHUNK, seed=6)
    with engine(server, timeout=5.0, **FAST_FAIL) as cache:
        assert cache.store(tokens, kv) == 2 * CHUNK
        cache.flush()
        assert not cache.stats().tier("s3").available
        server.start()

        def stored() -> bool:
            cache.store(tokens, kv)
            cache.flush()
            return cache.lookup(tokens) == 2 * CHUNK

        # A restarted SeaweedFS allocates its volumes on the first write: seconds
        # when the machine is loaded, so a put may time out, and land later (then
        # the next CREATE finds its keys present: the `stored` counter stays put).
        wait_until(stored, "the tier is opened and written once the server is up", timeout=60)
        n, got = cache.retrieve(tokens)
        assert n == 2 * CHUNK and torch.equal(got, kv)


def test_cli_lists_and_counts_an_unbounded_store(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = seaweedfs.url()
    tier = {"url": url, "options": seaweedfs.options()}
    with KVTier.open({"chunk_tokens": CHUNK, "tiers": [tier]}, model="s3-cli", layout=LAYOUT) as kv:
        kv.store(*prompt(2 * CHUNK, seed=7))
        kv.flush()
    options = [
        arg for name, value in seaweedfs.options().items() for arg in ("-o", f"{name}={value}")
    ]
    monkeypatch.setenv("COLUMNS", "250")
    for command in ("ls", "stats"):
        monkeypatch.setattr(sys, "argv", ["kvtier", command, url, *options])
        with contextlib.suppress(SystemExit):
            cli_main()
        out, err = capsys.readouterr()
        assert err == "", f"kvtier {command}: {err}"
        assert "s3-cli" in out, f"kvtier {command} did not show the stored namespace:\n{out}"
