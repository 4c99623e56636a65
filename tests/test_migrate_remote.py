"""``kvtier migrate`` between real remote stores: file -> S3 (SeaweedFS) -> Redis (Valkey)
-> file, byte for byte."""

from __future__ import annotations

import asyncio

from test_migrate import KEYS, cli, dump, fill, migrated, open_store, table_rows

from kvtier.core.backend import Backend
from kvtier.core.factory import build_backend


def test_round_trip_file_s3_redis_file(monkeypatch, capsys, tmp_path, seaweedfs, valkey_server):
    s3_url, s3_options = seaweedfs.url(), seaweedfs.options()

    def s3() -> Backend:
        return build_backend(s3_url, options=s3_options)

    async def fill_source() -> dict[str, bytes]:
        async with open_store(f"file://{tmp_path}/src") as src:
            await fill(src, KEYS)
            return await dump(src)

    original = asyncio.run(fill_source())
    # file -> S3 through the command line, options and all
    options = [f"--dst-option={key}={value}" for key, value in s3_options.items()]
    code, out, err = cli(monkeypatch, capsys, "migrate", f"file://{tmp_path}/src", s3_url, *options)
    assert code == 0, err
    assert table_rows(out)["copied"] == str(len(KEYS))

    async def onwards() -> None:
        async with s3() as bucket, build_backend(valkey_server.url) as redis:
            assert await dump(bucket) == original
            report = await migrated(bucket, redis, delete_source=True, batch_size=3)
            assert (report.copied, report.deleted) == (len(KEYS), len(KEYS))
            assert [key async for key in bucket.iter_keys()] == []
            async with open_store(f"file://{tmp_path}/back") as back:
                assert (await migrated(redis, back, concurrency=2)).copied == len(KEYS)
                assert await dump(back) == original
                again = await migrated(redis, back, verify=True)
                assert (again.copied, again.skipped, again.mismatched) == (0, len(KEYS), 0)

    asyncio.run(onwards())
