"""Entries a backend finds malformed at its own storage level are misses that it removes,
so that ``lookup`` stops promising them: for the redis, s3, mooncake and nixl tiers,
each kind of malformed entry is planted with the store's own client, then read through
a real tier chain (``KVTier``) and through the backend API. Entries a concurrent
writer is half way through are left alone."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Iterator
from typing import Any, TypeVar

import pytest
import redis
import torch
from servers._process import require
from servers.mooncake import MooncakeStore
from servers.seaweedfs import SeaweedFS
from servers.valkey import ValkeyCluster, ValkeyServer
from test_mooncake_backend import key as mooncake_key
from test_mooncake_backend import native
from test_mooncake_backend import put as mooncake_put
from test_nixl_backend import chunk_key as nixl_chunk_key
from test_nixl_backend import make_blob
from test_redis_backend import get as read
from test_redis_backend import put as write

from kvtier.backends.redis.split import DISCARD, write_job
from kvtier.core import KVLayout, KVTier
from kvtier.core.backend import Backend, PutMode
from kvtier.core.buffers import Buffer, BufferPool, address_of
from kvtier.core.factory import build_backend

T = TypeVar("T")
KiB = 1 << 10
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16


def run(body: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(body)


def prompt(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 50_000, (n,), generator=gen)
    return tokens, torch.randn(LAYOUT.chunk_shape(n), generator=gen).to(LAYOUT.dtype)


def open_chain(
    url: str, options: dict[str, Any], pool: BufferPool | None = None, **tier: Any
) -> KVTier:
    config = {
        "chunk_tokens": CHUNK,
        "tiers": [{"url": url, "timeout": 10.0, "options": options, **tier}],
    }
    return KVTier.open(config, model="malformed-test", layout=LAYOUT, pool=pool)


def chain_removes_the_planted_entry(
    cache: KVTier,
    plant: Callable[[str], None],
    present: Callable[[str], bool],
    *,
    promised: bool = True,
    writer: KVTier | None = None,
) -> None:
    """Store four chunks (through ``writer``, else ``cache``), replace the third by a
    malformed entry (``plant``), and check that lookup promises it once (if
    ``promised``: else never), retrieve stops before it and the backend removes it
    (``present`` says whether the store still holds an entry under a key) without
    handing it to the chain, lookup then no longer counts it, and storing the prompt
    again writes it anew."""
    tokens, kv = prompt(4 * CHUNK)
    (writer or cache).store(tokens, kv)
    (writer or cache).flush()
    victim = cache.hasher.key_strings(tokens)[2]
    plant(victim)
    assert present(victim)
    if promised:
        assert cache.lookup(tokens) == 4 * CHUNK, "the planted entry looks stored"
    else:
        assert cache.lookup(tokens) == 2 * CHUNK, "lookup promised a malformed entry"
    n, got = cache.retrieve(tokens)
    assert n == 2 * CHUNK and torch.equal(got, kv[:, :, : 2 * CHUNK])
    assert not present(victim), "the malformed entry was left in the store"
    assert cache.stats().tiers[0].corrupt == 0, "the tier handed the chain no blob there"
    assert cache.lookup(tokens) == 2 * CHUNK, "lookup still promises a malformed entry"
    cache.store(tokens, kv)
    cache.flush()
    n, got = cache.retrieve(tokens)
    assert n == 4 * CHUNK and torch.equal(got, kv)


def chunk_key(i: int) -> str:
    return f"malformed.{i:032x}"


# -- redis -------------------------------------------------------------------------------

SPLIT_AT = KiB
"""``max_value_bytes`` of the redis tiers here: a chunk's blob is a split hash."""

RedisPlant = Callable[[Any, str], None]
REDIS_PLANTS: dict[str, RedisPlant] = {
    "list": lambda c, name: c.rpush(name, b"kv"),
    "set": lambda c, name: c.sadd(name, b"kv"),
    "sorted set": lambda c, name: c.zadd(name, {b"kv": 1}),
    "stream": lambda c, name: c.xadd(name, {b"kv": b"1"}),
    "split, a part missing": lambda c, name: c.hset(
        name, mapping={"n": 2, "size": 8, "p0": b"abcd"}
    ),
    "split, sizes do not add up": lambda c, name: c.hset(
        name, mapping={"n": 2, "size": 9, "p0": b"abcd", "p1": b"efgh"}
    ),
    "split, a part too many": lambda c, name: c.hset(
        name, mapping={"n": 1, "size": 4, "p0": b"abcd", "p1": b"efgh"}
    ),
    "split, a huge part count": lambda c, name: c.hset(
        name, mapping={"n": 10**12, "size": 4, "p0": b"abcd"}
    ),
    "split, a count that is no decimal": lambda c, name: c.hset(
        name, mapping={"n": "0x1", "size": 4, "p0": b"abcd"}
    ),
    "split, no parts": lambda c, name: c.hset(name, mapping={"n": 0, "size": 0}),
    "hash of other fields": lambda c, name: c.hset(name, mapping={"kv": b"1"}),
}
"""Values under a chunk key that no redis tier writes. (The tier chain needs no help
with "split, no parts": it reads as an empty blob, which the chain deletes as corrupt.)"""


def redis_name(key: str, prefix: str = "kvtier:") -> str:
    return f"{prefix}{{{key}}}"


def redis_client(server: ValkeyServer | ValkeyCluster) -> Any:
    if isinstance(server, ValkeyCluster):
        return redis.RedisCluster(host="127.0.0.1", port=server.nodes[0].port)
    return redis.Redis(host="127.0.0.1", port=server.port)


def replace_redis_value(client: Any, plant: RedisPlant) -> Callable[[str], None]:
    def replace(key: str) -> None:
        name = redis_name(key)
        client.delete(name)
        plant(client, name)

    return replace


@pytest.mark.parametrize("kind", [k for k in REDIS_PLANTS if k != "split, no parts"])
def test_redis_chain_removes_a_malformed_value(valkey_server: ValkeyServer, kind: str) -> None:
    with (
        redis_client(valkey_server) as client,
        open_chain(valkey_server.url, {"max_value_bytes": SPLIT_AT}) as cache,
    ):
        chain_removes_the_planted_entry(
            cache,
            replace_redis_value(client, REDIS_PLANTS[kind]),
            lambda key: bool(client.exists(redis_name(key))),
        )


@pytest.mark.parametrize("server", ["valkey_server", "valkey_cluster"])
@pytest.mark.parametrize("data_path", ["direct", "redis-py"])
def test_redis_backend_removes_every_malformed_value(
    request: pytest.FixtureRequest,
    monkeypatch: pytest.MonkeyPatch,
    server: str,
    data_path: str,
) -> None:
    """One batch with every kind of malformed value beside whole ones: the malformed
    ones are misses, removed (and counted), and no longer contained; whole values stay.
    On both data paths: the direct one, and redis-py's pipelines (an unknown release)."""
    target = request.getfixturevalue(server)
    if data_path == "redis-py":
        monkeypatch.setattr(redis, "__version__", "99.0.0")
    whole = {chunk_key(100): b"small", chunk_key(101): bytes(range(256)) * 12}  # 2nd: split
    planted = {chunk_key(i): plant for i, plant in enumerate(REDIS_PLANTS.values())}
    keys = [*whole, *planted]

    async def body(backend: Backend, client: Any) -> None:
        assert await write(backend, whole) == [True, True]
        assert client.type(redis_name(chunk_key(101))) == b"hash"
        for key, plant in planted.items():
            plant(client, redis_name(key))
        assert await backend.contains_many(keys) == [True] * len(keys)
        assert await read(backend, keys) == [*whole.values(), *[None] * len(planted)]
        assert [bool(client.exists(redis_name(k))) for k in keys] == [
            *[True] * len(whole),
            *[False] * len(planted),
        ]
        assert await backend.contains_many(keys) == [*[True] * len(whole), *[False] * len(planted)]
        assert (await backend.stats()).details["malformed_removed"] == len(planted)
        assert await read(backend, keys) == [*whole.values(), *[None] * len(planted)]

    async def main() -> None:
        backend = build_backend(target.url, options={"max_value_bytes": SPLIT_AT})
        with redis_client(target) as client:
            async with backend:
                assert (await backend.stats()).details["data_path"] == data_path
                await body(backend, client)

    run(main())


def test_redis_split_value_half_written_is_left_to_its_writer(
    valkey_server: ValkeyServer,
) -> None:
    """A split value being assembled (its temp hash has part of its parts) stays while a
    read of the chunk misses and removes a malformed value beside it; the writer then
    publishes it, whole."""
    value = bytes(range(256)) * 12
    writing, broken = chunk_key(1), chunk_key(2)

    async def main() -> None:
        backend = build_backend(valkey_server.url, options={"max_value_bytes": SPLIT_AT})
        with redis_client(valkey_server) as client, backend.pool.copy_of(value) as buf:
            job = write_job(redis_name(writing), buf, SPLIT_AT, PutMode.CREATE, 0)
            temp = str(job[0][1])
            first, rest = job[:3], job[3:]  # header, expiry and p0; then p1, p2, publish

            def send(commands: Any) -> list[Any]:
                pipe = client.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command(
                        *(bytes(a) if isinstance(a, memoryview) else a for a in command)
                    )
                return pipe.execute()

            send(first)
            client.rpush(redis_name(broken), b"kv")
            async with backend:
                assert await read(backend, [writing, broken]) == [None, None]
                assert client.hlen(temp) == 3, "the half-written value was touched"
                assert not client.exists(redis_name(broken))
                assert send(rest)[-1] == 1, "the writer could not publish its value"
                assert await read(backend, [writing]) == [value]

    run(main())


def test_redis_discard_checks_again_and_never_deletes_a_whole_value(
    valkey_server: ValkeyServer,
) -> None:
    """The removal re-checks the value on the server in the step that deletes it: a
    value a writer put in place after the reader found a malformed one (a string, a
    whole split hash) is never deleted, nor is a missing key an error."""
    value = bytes(range(256)) * 12

    async def main() -> None:
        backend = build_backend(valkey_server.url, options={"max_value_bytes": SPLIT_AT})
        async with backend:
            assert await write(backend, {chunk_key(1): b"whole", chunk_key(2): value})
        with redis_client(valkey_server) as client:
            for key in (chunk_key(1), chunk_key(2), chunk_key(3)):
                assert client.eval(DISCARD, 1, redis_name(key)) == 0
            assert client.get(redis_name(chunk_key(1))) == b"whole"
            assert client.type(redis_name(chunk_key(2))) == b"hash"
            for i, plant in enumerate(REDIS_PLANTS.values()):
                name = redis_name(chunk_key(10 + i))
                plant(client, name)
                assert client.eval(DISCARD, 1, name) == 1 and not client.exists(name)

    run(main())


# -- s3 ----------------------------------------------------------------------------------

S3_LIMIT = 100_000
"""The largest object the s3 tests' tiers take for a blob (``reads.MAX_OBJECT_BYTES``)."""


@pytest.fixture
def s3_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects over :data:`S3_LIMIT` bytes are no blobs (the real bound, 4 GiB and more,
    is too large to plant)."""
    pytest.importorskip("boto3", reason="pip install 'kvtier[s3]'")
    from kvtier.backends.s3 import reads

    monkeypatch.setattr(reads, "MAX_OBJECT_BYTES", S3_LIMIT)


class S3Objects:
    """The objects of an s3 tier's bucket and prefix, through a plain boto3 client."""

    def __init__(self, server: SeaweedFS, url: str) -> None:
        import boto3

        self.client = boto3.client("s3", **server.client_args())
        self.bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.prefix = prefix + "/"

    def put(self, key: str, data: bytes) -> str:
        """Store ``data`` as chunk ``key``'s object; its ETag."""
        return self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)["ETag"]

    def present(self, key: str) -> bool:
        try:
            self.client.head_object(Bucket=self.bucket, Key=self.prefix + key)
        except self.client.exceptions.ClientError:
            return False
        return True

    def read(self, key: str) -> bytes:
        return self.client.get_object(Bucket=self.bucket, Key=self.prefix + key)["Body"].read()


@pytest.mark.usefixtures("s3_limit")
def test_s3_chain_removes_an_object_larger_than_any_blob(seaweedfs: SeaweedFS) -> None:
    url = seaweedfs.url()
    objects = S3Objects(seaweedfs, url)
    with open_chain(url, seaweedfs.options()) as cache:
        chain_removes_the_planted_entry(
            cache, lambda key: objects.put(key, bytes(S3_LIMIT + 1)), objects.present
        )


@pytest.mark.usefixtures("s3_limit")
def test_s3_backend_removes_an_object_larger_than_any_blob(seaweedfs: SeaweedFS) -> None:
    url = seaweedfs.url()
    objects = S3Objects(seaweedfs, url)
    largest, oversized = bytes(S3_LIMIT), bytes(S3_LIMIT + 1)
    keys = [chunk_key(1), chunk_key(2)]

    async def main() -> None:
        async with build_backend(url, options=seaweedfs.options()) as backend:
            assert await write(backend, {keys[0]: largest}) == [True]
            objects.put(keys[1], oversized)
            assert await backend.contains_many(keys) == [True, True]
            assert await read(backend, keys) == [largest, None]
            assert [objects.present(k) for k in keys] == [True, False]
            assert await backend.contains_many(keys) == [True, False]
            assert (await backend.stats()).details["malformed_removed"] == 1

    run(main())


@pytest.mark.usefixtures("s3_limit")
def test_s3_upload_in_progress_is_left_to_its_writer(seaweedfs: SeaweedFS) -> None:
    """A multipart upload of a blob over an oversized object is under way: a read
    misses and deletes the oversized object, and the upload then completes, whole."""
    url = seaweedfs.url()
    objects = S3Objects(seaweedfs, url)
    key, value = chunk_key(1), b"v" * 50_000
    objects.put(key, bytes(S3_LIMIT + 1))
    name = objects.prefix + key
    client = objects.client
    upload = client.create_multipart_upload(Bucket=objects.bucket, Key=name)["UploadId"]
    part = client.upload_part(
        Bucket=objects.bucket, Key=name, UploadId=upload, PartNumber=1, Body=value
    )

    async def main() -> None:
        async with build_backend(url, options=seaweedfs.options()) as backend:
            assert await read(backend, [key]) == [None]
            assert not objects.present(key)
            client.complete_multipart_upload(
                Bucket=objects.bucket,
                Key=name,
                UploadId=upload,
                MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]},
            )
            assert await read(backend, [key]) == [value]

    run(main())


def test_s3_removal_never_deletes_an_object_written_since_the_read(seaweedfs: SeaweedFS) -> None:
    """The deletion is conditional on the ETag the read saw: an object written over the
    malformed one in between stays."""
    pytest.importorskip("boto3", reason="pip install 'kvtier[s3]'")
    from kvtier.backends.s3 import S3Options
    from kvtier.backends.s3.bucket import Bucket
    from kvtier.backends.s3.errors import Place

    url = seaweedfs.url()
    objects = S3Objects(seaweedfs, url)
    seen = objects.put(chunk_key(1), bytes(S3_LIMIT + 1))
    latest = objects.put(chunk_key(1), b"a blob written since")
    options = S3Options(**seaweedfs.options())
    bucket = Bucket.connect(options, objects.bucket, objects.prefix, Place(url, "b", "e"))
    try:
        name = objects.prefix + chunk_key(1)
        assert not bucket.delete_if_unchanged(name, seen)
        assert objects.read(chunk_key(1)) == b"a blob written since"
        assert bucket.delete_if_unchanged(name, latest)
        assert not objects.present(chunk_key(1))
        assert not bucket.delete_if_unchanged(name, latest), "a missing object was deleted"
    finally:
        bucket.close()


# -- mooncake ----------------------------------------------------------------------------

MOONCAKE_LIMIT = 64 * KiB
"""The largest object the mooncake tests' tiers take for a blob."""


@pytest.fixture(scope="module")
def mooncake(mooncake_session: MooncakeStore) -> Iterator[Backend]:
    """A backend on the session's store, whose Mooncake client the tier chains here
    share (so no test waits for a client to close); tests plant objects with it."""
    mooncake_session.start()
    backend = build_backend(mooncake_session.url, options=mooncake_session.options())
    run(backend.open())
    yield backend
    run(backend.close())


@pytest.fixture
def mooncake_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """Objects over :data:`MOONCAKE_LIMIT` bytes are no blobs (the real bound, 4 GiB and
    more, does not fit the test store)."""
    from kvtier.backends.mooncake import reads

    monkeypatch.setattr(reads, "MAX_OBJECT_BYTES", MOONCAKE_LIMIT)


def mooncake_present(backend: Backend, name: str) -> bool:
    return bool(native(backend).is_exist(name) == 1)


MOONCAKE_PLANTS: dict[str, bytes] = {
    "one byte without a marker": b"\x07",
    "larger than any blob": bytes(MOONCAKE_LIMIT + 1),
}


@pytest.mark.usefixtures("mooncake_limit")
@pytest.mark.parametrize("kind", MOONCAKE_PLANTS)
def test_mooncake_chain_removes_a_malformed_object(
    mooncake_server: MooncakeStore, mooncake: Backend, kind: str
) -> None:
    with open_chain(mooncake_server.url, mooncake_server.options()) as cache:
        chain_removes_the_planted_entry(
            cache,
            lambda key: mooncake_put(mooncake, key, MOONCAKE_PLANTS[kind]),
            lambda key: mooncake_present(mooncake, key),
        )


@pytest.mark.usefixtures("mooncake_limit")
def test_mooncake_backend_removes_every_malformed_object(
    mooncake_server: MooncakeStore, mooncake: Backend
) -> None:
    whole = {mooncake_key(): b"blob", mooncake_key(): b"", mooncake_key(): bytes(MOONCAKE_LIMIT)}
    planted = {mooncake_key(): value for value in MOONCAKE_PLANTS.values()}
    keys = [*whole, *planted]

    async def main() -> None:
        backend = build_backend(mooncake_server.url, options=mooncake_server.options())
        async with backend:
            assert await write(backend, whole) == [True] * len(whole)
            for key, value in planted.items():
                mooncake_put(backend, key, value)
            assert await backend.contains_many(keys) == [True] * len(keys)
            assert await read(backend, keys) == [*whole.values(), *[None] * len(planted)]
            assert [mooncake_present(backend, k) for k in keys] == [
                *[True] * len(whole),
                *[False] * len(planted),
            ]
            assert await backend.contains_many(keys) == [
                *[True] * len(whole),
                *[False] * len(planted),
            ]
            assert (await backend.stats()).details["malformed_removed"] == len(planted)

    run(main())


def test_mooncake_writes_in_progress_are_left_to_their_writers(
    mooncake_server: MooncakeStore, mooncake: Backend
) -> None:
    """Beside a one-byte object without a marker (removed by the read), two writes are
    half way: a tiny blob whose marker and object are written but whose old marker is
    not removed yet (both markers), and a put session that reserved a key and moved its
    bytes but has not ended. Reads miss both and leave them; the writers then finish."""
    from mooncake.store import ReplicateConfig

    tiny, reserved, broken = mooncake_key(), mooncake_key(), mooncake_key()
    value = bytes(range(256)) * 8
    client = native(mooncake)
    mooncake_put(mooncake, tiny, b"\0")  # was the empty blob ...
    mooncake_put(mooncake, tiny + "#empty", b"\0")
    mooncake_put(mooncake, tiny + "#byte", b"\0")  # ... becoming b"\x07": marker first,
    mooncake_put(mooncake, tiny, b"\x07")  # then the object; "#empty" not removed yet
    mooncake_put(mooncake, broken, b"\x07")
    assert client.batch_put_session_start([reserved], [len(value)], ReplicateConfig()) == [0]

    async def main() -> None:
        backend = build_backend(mooncake_server.url, options=mooncake_server.options())
        with backend.pool.copy_of(value) as buf:
            sent = client.batch_put_from_multi_buffer_ranges(
                [reserved], [[address_of(buf.block)]], [[len(value)]], [[0]]
            )
            assert sent == [len(value)]
            async with backend:
                assert await read(backend, [tiny, reserved, broken]) == [None, None, None]
                assert not mooncake_present(backend, broken)
                assert mooncake_present(backend, tiny), "the tiny blob being written was removed"
                assert client.batch_put_session_end([reserved]) == [0]
                assert client.remove(tiny + "#empty", True) == 0
                assert await read(backend, [tiny, reserved]) == [b"\x07", value]

    run(main())


# -- nixl --------------------------------------------------------------------------------


class NixlIndex:
    """A group's peer index, read and written with a plain redis-py client."""

    def __init__(self, server: ValkeyServer, group: str) -> None:
        self.client = redis_client(server)
        self.prefix = f"kvtier:nixl:{group}:"

    def holder(self, key: str) -> str:
        """The agent whose entries name ``key``."""
        for agent in self.client.smembers(self.prefix + "agents"):
            if self.client.hexists(self.chunks(agent.decode()), key):
                return str(agent.decode())
        raise AssertionError(f"no agent publishes {key}")

    def chunks(self, agent: str) -> str:
        return f"{self.prefix}chunks:{agent}"

    def record(self, agent: str) -> str:
        return f"{self.prefix}agent:{agent}"

    def entry(self, agent: str, key: str) -> list[bytes]:
        """``[gen, address, nbytes]`` of ``agent``'s entry for ``key``."""
        return list(self.client.hget(self.chunks(agent), key).split(b":"))

    def set_entry(self, agent: str, key: str, value: bytes) -> None:
        self.client.hset(self.chunks(agent), key, value)

    def has_entry(self, key: str) -> bool:
        agents = self.client.smembers(self.prefix + "agents")
        return any(self.client.hexists(self.chunks(a.decode()), key) for a in agents)


def nixl_plants(index: NixlIndex) -> dict[str, tuple[Callable[[str, str], bytes], bool]]:
    """Malformed values for a key's entry, from the key and the entry of another chunk
    of the same owner; and whether lookup still promises the key (it cannot tell)."""

    def record_gen(key: str) -> int:
        return int(index.client.hget(index.record(index.holder(key)), "gen"))

    return {
        "not an entry": (lambda key, other: b"no location", False),
        "a length no blob has": (
            lambda key, other: b":".join([*index.entry(index.holder(key), key)[:2], b"1"]),
            False,
        ),
        "the memory of another chunk": (
            lambda key, other: b":".join(index.entry(index.holder(key), other)),
            True,
        ),
        "a generation no metadata covers": (
            lambda key, other: b":".join(
                [b"%d" % (record_gen(key) + 1), *index.entry(index.holder(key), key)[1:]]
            ),
            True,
        ),
    }


NIXL_KINDS = ["not an entry", "a length no blob has", "the memory of another chunk"]
NIXL_KINDS += ["a generation no metadata covers"]


@pytest.mark.parametrize("kind", NIXL_KINDS)
def test_nixl_chain_removes_a_malformed_index_entry(valkey_server: ValkeyServer, kind: str) -> None:
    """One KVTier stores, another reads its chunks through the index, where the third
    chunk's entry is malformed."""
    require("nixl_cu12", "kvtier[nixl]")
    grp = f"m{uuid.uuid4().hex[:12]}"
    index = NixlIndex(valkey_server, grp)
    value, promised = nixl_plants(index)[kind]
    tier = {"capacity": "32MiB"}
    options = {"index": valkey_server.url, "ttl": 30}

    def plant(key: str) -> None:
        tokens = prompt(4 * CHUNK)[0]
        other = writer.hasher.key_strings(tokens)[3]
        index.set_entry(index.holder(key), key, value(key, other))

    with (
        open_chain(f"nixl://{grp}", options, pool=BufferPool(), **tier) as writer,
        open_chain(f"nixl://{grp}", options, pool=BufferPool(), **tier) as reader,
    ):
        chain_removes_the_planted_entry(
            reader, plant, index.has_entry, promised=promised, writer=writer
        )


def nixl_backend(server: ValkeyServer, grp: str, pool: BufferPool) -> Backend:
    return build_backend(
        f"nixl://{grp}", capacity=64 << 20, options={"index": server.url, "ttl": 60}, pool=pool
    )


def with_nixl_peers(
    server: ValkeyServer,
    grp: str,
    owner_pool: BufferPool,
    blobs: dict[str, Buffer],
    body: Callable[[Backend, Backend], Coroutine[Any, Any, None]],
) -> None:
    """Run ``body(owner, reader)`` with two open backends of group ``grp`` (the owner's
    on ``owner_pool``), then release ``blobs``."""

    async def main() -> None:
        owner = nixl_backend(server, grp, owner_pool)
        reader = nixl_backend(server, grp, BufferPool())
        async with owner, reader:
            await body(owner, reader)

    try:
        run(main())
    finally:
        for blob in blobs.values():
            blob.release()


def test_nixl_backend_removes_malformed_index_entries(valkey_server: ValkeyServer) -> None:
    require("nixl_cu12", "kvtier[nixl]")
    grp = f"m{uuid.uuid4().hex[:12]}"
    index = NixlIndex(valkey_server, grp)
    owner_pool = BufferPool()
    keys = [nixl_chunk_key() for _ in range(4)]
    blobs = {key: make_blob(key, 16, owner_pool) for key in keys}
    plants = nixl_plants(index)
    planted = {  # the third key keeps its entry
        keys[0]: "not an entry",
        keys[1]: "the memory of another chunk",
        keys[3]: "a generation no metadata covers",
    }

    async def body(owner: Backend, reader: Backend) -> None:
        assert await owner.put_many(list(blobs.items())) == [True] * 4
        agent = index.holder(keys[0])
        for key, kind in planted.items():
            index.set_entry(agent, key, plants[kind][0](key, keys[2]))
        assert await reader.contains_many(keys) == [False, True, True, True]
        got = await reader.get_many(keys)
        assert [b is not None for b in got] == [False, False, True, False]
        assert got[2] is not None and bytes(got[2].view) == bytes(blobs[keys[2]].view)
        got[2].release()
        assert [index.has_entry(k) for k in keys] == [False, False, True, False]
        assert await reader.contains_many(keys) == [False, False, True, False]
        assert (await reader.stats()).details["malformed_removed"] == 3

    with_nixl_peers(valkey_server, grp, owner_pool, blobs, body)


NIXL_RECORDS: dict[str, Callable[[Any, str], None]] = {
    "metadata NIXL refuses": lambda c, record: c.hset(record, "md", b"no metadata"),
    "no metadata": lambda c, record: c.hdel(record, "md"),
    "a generation that is no number": lambda c, record: c.hset(record, "gen", b"x1"),
}


@pytest.mark.parametrize("kind", NIXL_RECORDS)
def test_nixl_malformed_record_is_removed_and_its_owner_publishes_again(
    valkey_server: ValkeyServer, kind: str
) -> None:
    """A malformed owner record makes its chunks misses; the reader removes the record,
    so lookups stop naming them, and the owner publishes its record and entries again
    (at its next write or heartbeat), after which they are read."""
    require("nixl_cu12", "kvtier[nixl]")
    grp = f"m{uuid.uuid4().hex[:12]}"
    index = NixlIndex(valkey_server, grp)
    owner_pool = BufferPool()
    first, second = nixl_chunk_key(), nixl_chunk_key()
    blobs = {first: make_blob(first, 16, owner_pool), second: make_blob(second, 16, owner_pool)}

    async def body(owner: Backend, reader: Backend) -> None:
        assert await owner.put_many([(first, blobs[first])]) == [True]
        record = index.record(index.holder(first))
        NIXL_RECORDS[kind](index.client, record)
        assert await reader.contains_many([first]) == [True]
        assert await reader.get_many([first]) == [None]
        assert not index.client.exists(record)
        assert await reader.contains_many([first]) == [False]
        assert (await reader.stats()).details["malformed_removed"] == 1
        assert await owner.put_many([(second, blobs[second])]) == [True]
        got = await reader.get_many([first, second])
        assert [bytes(b.view) if b else None for b in got] == [
            bytes(blobs[first].view),
            bytes(blobs[second].view),
        ]
        for buf in got:
            assert buf is not None
            buf.release()

    with_nixl_peers(valkey_server, grp, owner_pool, blobs, body)


def test_nixl_memory_registered_since_the_reader_looked_is_no_malformed_entry(
    valkey_server: ValkeyServer,
) -> None:
    """An owner registers a new block for a chunk after a reader loaded its metadata:
    the entry is newer than what the reader knows, but not than the owner's record, so
    the reader loads the newer metadata and reads the chunk; an entry newer than the
    record, beside it, is removed."""
    require("nixl_cu12", "kvtier[nixl]")
    grp = f"m{uuid.uuid4().hex[:12]}"
    index = NixlIndex(valkey_server, grp)
    owner_pool = BufferPool()
    small, large, forged = nixl_chunk_key(), nixl_chunk_key(), nixl_chunk_key()
    blobs = {small: make_blob(small, 16, owner_pool)}  # the large one: made later
    plants = nixl_plants(index)

    async def body(owner: Backend, reader: Backend) -> None:
        assert await owner.put_many([(small, blobs[small])]) == [True]
        [got] = await reader.get_many([small])  # loads the owner's metadata
        assert got is not None
        got.release()
        agent = index.holder(small)
        before = int(index.client.hget(index.record(agent), "gen"))
        blobs[large] = make_blob(large, 1024, owner_pool)  # in a block mapped now
        assert await owner.put_many([(large, blobs[large])]) == [True]
        assert int(index.entry(agent, large)[0]) > before, "no block was registered"
        index.set_entry(agent, forged, plants["a generation no metadata covers"][0](large, small))
        got_large, got_forged = await reader.get_many([large, forged])
        assert got_forged is None and not index.has_entry(forged)
        assert got_large is not None and bytes(got_large.view) == bytes(blobs[large].view)
        got_large.release()
        assert index.has_entry(large)

    with_nixl_peers(valkey_server, grp, owner_pool, blobs, body)


def test_nixl_removal_never_deletes_what_an_owner_wrote_since(
    valkey_server: ValkeyServer,
) -> None:
    """Entries and records are removed only while they are as the reader found them: an
    entry rewritten since, an entry whose owner's record has since reached its
    generation, and a record rewritten since all stay."""
    pytest.importorskip("redis", reason="pip install 'kvtier[nixl]'")
    from kvtier.backends.nixl.index import Entry, PeerIndex, Record

    grp = f"m{uuid.uuid4().hex[:12]}"
    raw = NixlIndex(valkey_server, grp)
    raw.client.hset(raw.record("a"), mapping={"gen": 3, "md": b"meta"})
    raw.client.hset(raw.chunks("a"), mapping={"k1": b"new", "k2": b"3:1:100", "k3": b"x"})

    async def main() -> None:
        index = PeerIndex(valkey_server.url, grp, "reader", ttl=60)
        try:
            assert await index.drop_entries([Entry("a", "k1", b"old")]) == 0
            assert await index.drop_entries([Entry("a", "k2", b"3:1:100", below=3)]) == 0
            assert not await index.drop_record(Record("a", b"2", b"meta"))
            assert not await index.drop_record(Record("a", b"3", None))
            assert raw.client.hgetall(raw.chunks("a")) == {
                b"k1": b"new",
                b"k2": b"3:1:100",
                b"k3": b"x",
            }
            assert await index.drop_entries([Entry("a", "k3", b"x")]) == 1
            assert await index.drop_entries([Entry("a", "k2", b"3:1:100", below=4)]) == 1
            assert await index.drop_record(Record("a", b"3", b"meta"))
            assert raw.client.hgetall(raw.chunks("a")) == {b"k1": b"new"}
            assert not raw.client.exists(raw.record("a"))
        finally:
            await index.close()

    run(main())
