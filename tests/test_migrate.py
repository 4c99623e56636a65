"""``kvtier migrate``: copies, filters, dry runs, recoding, resuming, corruption,
verification, deleting the source, third-party backends, and the command line."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from test_cli import run as cli

from kvtier.core import KVLayout, KVTier
from kvtier.core.backend import Backend
from kvtier.core.blob import verify
from kvtier.core.buffers import default_pool
from kvtier.core.codecs.decode import decode_blob
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.factory import build_backend
from kvtier.core.keys import ChunkKey, namespace_for
from kvtier.core.layout import ModelFingerprint
from kvtier.core.migrate import ChunkFilter, MigrateOptions, MigrationReport, Outcome, migrate
from kvtier.core.plugins import PluginRegistry, get_registry

T = TypeVar("T")
LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, dtype=torch.float16)
SHAPE = LAYOUT.chunk_shape(8)
REGISTRY = get_registry()
RAW = CodecPipeline.from_config("raw", REGISTRY)

VAULT_PLUGIN = """
    from pydantic import BaseModel, ConfigDict
    from kvtier.core import hookimpl
    from kvtier.core.backend import Backend, BackendStats, PutMode
    from kvtier.core.specs import BackendSpec

    STORES = {}

    class VaultOptions(BaseModel):
        model_config = ConfigDict(extra="forbid")
        flip_bit: bool = False  # stores a damaged copy, like a faulty device

    class VaultBackend(Backend):
        '''Blobs as bytes in a dict per URL, shared by every instance in the process.'''

        def _configure(self):
            self.blobs = STORES.setdefault(self.url, {})

        async def _get_unique(self, keys):
            found = [self.blobs.get(key) for key in keys]
            return [None if blob is None else self.pool.copy_of(blob) for blob in found]

        async def _put_unique(self, items, mode):
            stored = []
            for key, buf in items:
                if mode is PutMode.CREATE and key in self.blobs:
                    stored.append(False)
                    continue
                data = bytearray(buf.view)
                if self.options.flip_bit:
                    data[len(data) // 2] ^= 1
                self.blobs[key] = bytes(data)
                stored.append(True)
            return stored

        async def _contains_unique(self, keys):
            return [key in self.blobs for key in keys]

        async def _delete_unique(self, keys):
            return [self.blobs.pop(key, None) is not None for key in keys]

        async def _iter_keys(self, prefix):
            for key in list(self.blobs):
                if key.startswith(prefix):
                    yield key

        async def _stats(self):
            return BackendStats(keys=len(self.blobs))

    @hookimpl
    def kvtier_backends():
        return [BackendSpec(name="vault", schemes=("vault",), cls=VaultBackend,
                            options=VaultOptions)]
"""


def run(scenario: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(scenario)


def chunk(seed: int) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed)).half()


def key_in(namespace: str, i: int) -> str:
    return str(ChunkKey(namespace, i.to_bytes(16, "big")))


def open_store(url: str, registry: PluginRegistry = REGISTRY, **options: Any) -> Backend:
    return build_backend(url, capacity=1 << 30, options=options, registry=registry)


async def fill(backend: Backend, keys: list[str], pipeline: CodecPipeline = RAW) -> None:
    """Store one encoded random chunk under each key (seeded by its position)."""
    blobs = [pipeline.encode(key, chunk(i), default_pool()) for i, key in enumerate(keys)]
    try:
        assert all(await backend.put_many(list(zip(keys, blobs, strict=True))))
    finally:
        for blob in blobs:
            blob.release()


async def dump(backend: Backend) -> dict[str, bytes]:
    """Every blob in ``backend`` by key."""
    keys = [key async for key in backend.iter_keys()]
    blobs = await backend.get_many(keys)
    out = {}
    for key, blob in zip(keys, blobs, strict=True):
        assert blob is not None
        with blob:
            out[key] = bytes(blob.view)
    return out


def blob_path(root: Path, key: str) -> Path:
    return root / key.rpartition(".")[2][:2] / key


def flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


async def migrated(
    src: Backend, dst: Backend, progress: Callable[[MigrationReport], None] | None = None, **kw: Any
) -> MigrationReport:
    return await migrate(src, dst, MigrateOptions(**kw), progress)


KEYS = [key_in("test", i) for i in range(20)]


@pytest.mark.parametrize("dst_url", ["file://{tmp}/dst", "cpu://"])
@pytest.mark.parametrize(("batch", "concurrency"), [(1, 1), (8, 4)])
def test_copies_every_chunk_byte_for_byte(tmp_path, dst_url, batch, concurrency):
    async def scenario() -> None:
        src, dst = open_store(f"file://{tmp_path}/src"), open_store(dst_url.format(tmp=tmp_path))
        async with src, dst:
            await fill(src, KEYS)
            seen: list[int] = []
            report = await migrated(
                src, dst, lambda r: seen.append(r.processed), batch_size=batch,
                concurrency=concurrency,
            )  # fmt: skip
            assert await dump(dst) == await dump(src)
            total = sum(len(blob) for blob in (await dump(src)).values())
        assert (report.copied, report.skipped, report.corrupt, report.failed) == (20, 0, 0, 0)
        assert report.bytes_read == report.bytes_written == total
        assert report.ok and not report.problems and report.deleted == 0
        assert seen == sorted(seen) and seen[-1] == 20 and len(seen) == -(-20 // batch)

    run(scenario())


def test_filters_select_exact_models_tenants_and_namespaces(tmp_path):
    def ns(model: str, tenant: str | None = None) -> str:
        return namespace_for(ModelFingerprint(model, LAYOUT), tenant)

    # org/a-x and org/ab share the prefix "org-a" with org/a; "custom" is no model's
    spaces = [ns(m, t) for m in ("org/a", "org/a-x", "org/ab") for t in (None, "acme", "zeta")]
    spaces.append("custom")
    keys = {space: [key_in(space, i) for i in range(2)] for space in spaces}

    def selected(**select: tuple[str, ...]) -> set[str]:
        async def scenario() -> set[str]:
            src, dst = open_store(f"file://{tmp_path}/src"), open_store("cpu://")
            async with src, dst:
                report = await migrated(src, dst, select=ChunkFilter(**select))
                copied = set(await dump(dst))
            assert report.copied == len(copied)
            return copied

        return run(scenario())

    def of(*spaces: str) -> set[str]:
        return {key for space in spaces for key in keys[space]}

    run(_fill_file(tmp_path / "src", [k for ks in keys.values() for k in ks]))
    assert selected() == of(*spaces)
    a_all = of(ns("org/a"), ns("org/a", "acme"), ns("org/a", "zeta"))
    assert selected(models=("org/a",)) == a_all
    assert selected(models=("org/a", "org/ab")) == a_all | of(
        ns("org/ab"), ns("org/ab", "acme"), ns("org/ab", "zeta")
    )
    assert selected(models=("org/a",), tenants=("acme",)) == of(ns("org/a", "acme"))
    assert selected(tenants=("acme",)) == of(
        *(ns(m, "acme") for m in ("org/a", "org/a-x", "org/ab"))
    )
    assert selected(namespaces=(ns("org/ab"),)) == of(ns("org/ab"))
    assert selected(namespaces=("custom", ns("org/ab"))) == of("custom", ns("org/ab"))
    assert selected(namespaces=("custom",), models=("org/a",)) == set()
    assert selected(models=("nobody",)) == set()


async def _fill_file(root: Path, keys: list[str]) -> None:
    async with open_store(f"file://{root}") as backend:
        await fill(backend, keys)


def test_bad_filters_are_config_errors():
    from kvtier.core.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--namespace 'a\.b' is not a namespace"):
        ChunkFilter(namespaces=("a.b",))
    with pytest.raises(ConfigError, match="--tenant must not be empty"):
        ChunkFilter(tenants=("",))
    with pytest.raises(ConfigError, match="concurrency must be a positive integer"):
        MigrateOptions(concurrency=0)


def test_dry_run_changes_nothing(tmp_path):
    async def scenario() -> None:
        src, dst = open_store(f"file://{tmp_path}/src"), open_store(f"file://{tmp_path}/dst")
        async with src, dst:
            await fill(src, KEYS)
            await fill(dst, KEYS[:5])
            before = await dump(src), await dump(dst)
            report = await migrated(src, dst, dry_run=True, delete_source=True)
            assert (await dump(src), await dump(dst)) == before
        assert report.dry_run and (report.copied, report.skipped, report.deleted) == (15, 5, 0)
        assert report.bytes_read == report.bytes_written == 0

    run(scenario())


def test_recode_raw_to_int8_zstd(tmp_path):
    target = CodecPipeline.from_config("int8+zstd", REGISTRY)

    async def scenario() -> None:
        src, dst = open_store(f"file://{tmp_path}/src"), open_store(f"file://{tmp_path}/dst")
        async with src, dst:
            await fill(src, KEYS[:10])
            await fill(src, KEYS[10:12], target)  # already int8+zstd: copied as is
            report = await migrated(src, dst, recode=target)
            stored, original = await dump(dst), await dump(src)
            rerun = await migrated(src, dst, recode=target, verify=True)
        assert report.copied == 12 and report.bytes_written < report.bytes_read
        assert (rerun.skipped, rerun.mismatched) == (12, 0)  # recoding is deterministic
        for i, key in enumerate(KEYS[:10]):
            header, values = decode_blob(stored[key], REGISTRY, expected_key=key)
            assert [name for name, _ in header.stages] == ["int8", "zstd"]
            assert header.key == key and header.shape == SHAPE and header.dtype == torch.float16
            with target.encode(key, chunk(i), default_pool()) as expected:
                assert torch.equal(values, decode_blob(expected, REGISTRY)[1])
            assert (values.float() - chunk(i).float()).abs().max() < 0.05
        for key in KEYS[10:12]:
            assert stored[key] == original[key]

    run(scenario())


def test_interrupted_migration_resumes(tmp_path):
    async def scenario() -> None:
        src, dst = open_store(f"file://{tmp_path}/src"), open_store(f"file://{tmp_path}/dst")
        async with src, dst:
            await fill(src, KEYS)
            task: asyncio.Future[MigrationReport] | None = None

            def stop_after_first_batch(report: MigrationReport) -> None:
                assert task is not None
                task.cancel()

            task = asyncio.ensure_future(
                migrated(src, dst, stop_after_first_batch, batch_size=3, concurrency=1)
            )
            with pytest.raises(asyncio.CancelledError):
                await task
            assert len(await dump(dst)) == 3
            report = await migrated(src, dst, batch_size=3, concurrency=1)
            assert await dump(dst) == await dump(src)
        assert (report.copied, report.skipped) == (17, 3)

    run(scenario())


def test_corrupt_source_chunks_are_reported_not_copied(tmp_path):
    async def scenario() -> MigrationReport:
        src, dst = open_store(f"file://{tmp_path}/src"), open_store(f"file://{tmp_path}/dst")
        async with src, dst:
            return await migrated(src, dst)

    run(_fill_file(tmp_path / "src", KEYS))
    flip_byte(blob_path(tmp_path / "src", KEYS[3]))  # payload bit rot
    os.truncate(blob_path(tmp_path / "src", KEYS[4]), 50)  # torn write
    os.replace(blob_path(tmp_path / "src", KEYS[6]), blob_path(tmp_path / "src", KEYS[5]))
    report = run(scenario())
    assert (report.copied, report.corrupt, report.failed) == (16, 3, 0)  # KEYS[6] is gone
    problems = {key: (outcome, reason) for outcome, key, reason in report.problems}
    assert problems[KEYS[3]] == (Outcome.CORRUPT, "corrupt blob: checksum mismatch")
    assert problems[KEYS[4]][0] is Outcome.CORRUPT
    assert problems[KEYS[5]][0] is Outcome.CORRUPT and "foreign blob" in problems[KEYS[5]][1]
    copied = {p.name for p in (tmp_path / "dst").glob("*/*")}
    assert copied == set(KEYS) - {KEYS[3], KEYS[4], KEYS[5], KEYS[6]}


def _other_blob(key: str) -> bytes:
    with RAW.encode(key, chunk(999), default_pool()) as blob:
        return bytes(blob.view)


async def _plant(backend: Backend, blobs: dict[str, bytes]) -> None:
    bufs = [default_pool().copy_of(data) for data in blobs.values()]
    try:
        await backend.put_many(list(zip(blobs, bufs, strict=True)))
    finally:
        for buf in bufs:
            buf.release()


def test_verify_detects_a_mismatching_destination(tmp_path):
    async def scenario(verify: bool) -> MigrationReport:
        src, dst = (
            open_store(f"file://{tmp_path}/src"),
            open_store(f"file://{tmp_path}/dst{verify}"),
        )
        async with src, dst:
            await fill(src, KEYS)
            original = await dump(src)
            wrong = {KEYS[1]: _other_blob(KEYS[1]), KEYS[2]: b"garbage" * 10}
            await _plant(dst, {KEYS[0]: original[KEYS[0]], **wrong})
            report = await migrated(src, dst, verify=verify)
            after = await dump(dst)
        assert {k: after[k] for k in wrong} == wrong  # reported, never overwritten
        return report

    report = run(scenario(verify=False))
    assert (report.copied, report.skipped, report.mismatched) == (17, 3, 0) and report.ok
    report = run(scenario(verify=True))
    assert (report.copied, report.skipped, report.mismatched) == (17, 1, 2) and not report.ok
    problems = {key: reason for _, key, reason in report.problems}
    assert problems[KEYS[1]] == "the destination's blob differs from the source's"
    assert problems[KEYS[2]].startswith("corrupt at the destination: corrupt blob:")


def test_delete_source_removes_only_verified_chunks(tmp_path):
    async def scenario() -> tuple[MigrationReport, set[str]]:
        src, dst = open_store(f"file://{tmp_path}/src"), open_store(f"file://{tmp_path}/dst")
        async with src, dst:
            original = await dump(src)
            await _plant(dst, {KEYS[0]: original[KEYS[0]], KEYS[1]: _other_blob(KEYS[1])})
            report = await migrated(src, dst, delete_source=True)
            left = {key async for key in src.iter_keys()}
            copied = await dump(dst)
        assert all(copied[key] == original[key] for key in set(KEYS) - {KEYS[1], KEYS[7]})
        return report, left

    run(_fill_file(tmp_path / "src", KEYS))
    flip_byte(blob_path(tmp_path / "src", KEYS[7]))
    report, left = run(scenario())
    assert (report.copied, report.skipped, report.mismatched, report.corrupt) == (17, 1, 1, 1)
    assert report.deleted == 18 and left == {KEYS[1], KEYS[7]}


def test_third_party_backend_as_source_and_destination(tmp_path, fake_dist):
    fake_dist("kvtier-vault", {"vault": "vault_plugin"}, {"vault_plugin": VAULT_PLUGIN})
    registry = PluginRegistry()

    async def scenario() -> None:
        async with open_store(f"file://{tmp_path}/src", registry) as src:
            await fill(src, KEYS)
            original = await dump(src)
            async with open_store("vault://one", registry) as vault:
                report = await migrated(src, vault, delete_source=True)
                assert report.copied == report.deleted == 20
                assert [key async for key in src.iter_keys()] == []
                assert await dump(vault) == original
                async with open_store(f"file://{tmp_path}/back", registry) as back:
                    assert (await migrated(vault, back, batch_size=7)).copied == 20
                    assert await dump(back) == original

    run(scenario())


def test_a_bad_write_is_caught_by_the_read_back_and_undone(tmp_path, fake_dist):
    fake_dist("kvtier-vault", {"vault": "vault_plugin"}, {"vault_plugin": VAULT_PLUGIN})
    registry = PluginRegistry()

    async def scenario() -> None:
        async with open_store(f"file://{tmp_path}/src", registry) as src:
            await fill(src, KEYS[:4])
            async with open_store("vault://faulty", registry, flip_bit=True) as faulty:
                report = await migrated(src, faulty, delete_source=True)
                assert await dump(faulty) == {}  # the damaged copies were deleted again
            assert len([key async for key in src.iter_keys()]) == 4  # nothing deleted
        assert (report.copied, report.failed, report.deleted) == (0, 4, 0)
        outcome, _, reason = report.problems[0]
        assert outcome is Outcome.FAILED
        assert reason == "read back from the destination: corrupt at the destination: " \
            "corrupt blob: checksum mismatch"  # fmt: skip

    run(scenario())


# -- the command line -------------------------------------------------------------------


def table_rows(out: str) -> dict[str, str]:
    """The summary table's rows: name -> value."""
    cells = [line.split("│")[1:3] for line in out.splitlines() if line.count("│") == 3]
    return {name.strip(): value.strip() for name, value in cells}


@pytest.fixture
def cache_store(tmp_path) -> tuple[str, list[str], list[str]]:
    """A file store written by KVTier: 4 chunks of org/a and 2 of org/b, raw."""
    url = f"file://{tmp_path}/src"
    keys = []
    for model, tokens in (("org/a", 32), ("org/b", 16)):
        cfg = {"chunk_tokens": 8, "tiers": [{"url": url, "capacity": "64MiB"}]}
        with KVTier.open(cfg, model=model, layout=LAYOUT) as cache:
            cache.store(torch.arange(tokens), torch.randn(LAYOUT.chunk_shape(tokens)).half())
            cache.flush()
            keys.append([str(k) for k in cache.hasher.keys(torch.arange(tokens))])
    return url, keys[0], keys[1]


def test_console_script_migrates_end_to_end(tmp_path, cache_store):
    src_url, a_keys, _ = cache_store
    dst_url = f"file://{tmp_path}/dst"
    script = Path(sys.executable).with_name("kvtier")  # installed beside this interpreter
    argv = [str(script), "migrate", src_url, dst_url, "--model", "org/a", "--recode", "int8+zstd"]
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert table_rows(result.stdout)["copied"] == "4"
    for key in a_keys:
        header = verify(blob_path(tmp_path / "dst", key).read_bytes())
        assert [name for name, _ in header.stages] == ["int8", "zstd"]
    assert sorted(p.name for p in (tmp_path / "dst").glob("*/*")) == sorted(a_keys)
    # a mismatch found by --verify exits with 1 and one line on stderr
    flip_byte(blob_path(tmp_path / "dst", a_keys[0]))
    result = subprocess.run([*argv, "--verify"], capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert result.stderr == "kvtier: error: 0 chunks failed and 1 mismatched; a rerun retries "\
        "the failed ones\n"  # fmt: skip
    assert f"mismatched: {a_keys[0]}: corrupt at the destination" in result.stdout


def test_cli_resumes_reports_corruption_and_deletes_the_source(
    monkeypatch, capsys, tmp_path, cache_store
):
    src_url, a_keys, b_keys = cache_store
    dst_url = f"file://{tmp_path}/dst"
    flip_byte(blob_path(tmp_path / "src", b_keys[1]))
    code, out, _ = cli(monkeypatch, capsys, "migrate", src_url, dst_url, "--dry-run")
    assert code == 0 and table_rows(out)["would copy"] == "6"
    assert not list((tmp_path / "dst").glob("*/*"))  # opened, nothing written
    code, out, _ = cli(monkeypatch, capsys, "migrate", src_url, dst_url, "--namespace",
                       ChunkKey.parse(a_keys[0]).namespace, "--batch", "1")  # fmt: skip
    assert code == 0
    code, out, err = cli(
        monkeypatch, capsys, "migrate", src_url, dst_url, "--delete-source", "--concurrency", "2"
    )
    assert code == 0, err
    rows = table_rows(out)
    assert rows["copied"] == "1" and rows["skipped (at destination)"] == "4"
    assert rows["corrupt at source"] == "1" and rows["deleted from source"] == "5"
    assert f"corrupt: {b_keys[1]}: corrupt blob: checksum mismatch" in out
    assert [p.name for p in (tmp_path / "src").glob("*/*")] == [b_keys[1]]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["file:///tmp/a", "file:///tmp/a/"], "SRC_URL and DST_URL are the same store"),
        (["file:///tmp/a"], "Missing argument 'DST_URL'"),
        (["nosuch://x", "cpu://"], "no backend handles URL scheme 'nosuch'"),
        (["cpu://", "cpu://b", "--recode", "int9"], "unknown codec 'int9'"),
        (["cpu://", "cpu://b", "--dst-capacity", "lots"], "--dst-capacity"),
        (["cpu://", "cpu://b", "--concurrency", "0"], "Invalid value for '--concurrency'"),
        (["cpu://", "cpu://b", "--namespace", "a b"], "--namespace 'a b' is not a namespace"),
        (["cpu://", "cpu://b", "--src-option", "novalue"], "KEY=VALUE"),
        (["cpu://", "cpu://b", "--dst-option", "colour=red"], "unknown key 'colour'"),
        (["cpu://", "file://relative"], "file://"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(monkeypatch, capsys, args, message):
    code, out, err = cli(monkeypatch, capsys, "migrate", *args)
    assert code == 2, err
    assert err.startswith("kvtier: error: ") and err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err + out
