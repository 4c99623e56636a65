"""``kvtier purge``: removes exactly the selected chunks from real file, Redis (Valkey)
and S3 (SeaweedFS) stores; a dry run changes nothing; no selector is refused."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import torch
from test_cli import run

from kvtier.core import KVLayout, KVTier
from kvtier.core.factory import build_backend
from kvtier.core.keys import namespace_for, tenant_tag
from kvtier.core.layout import ModelFingerprint

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=16, dtype=torch.float16)
CHUNK = 16
OWNERS = [("m1", "alice"), ("m1", "bob"), ("m2", "alice"), ("m2", None)]


def fill(url: str, options: dict[str, Any]) -> None:
    """Three chunks for each (model, tenant) of :data:`OWNERS`."""
    tier = {"url": url, "options": options}
    if url.startswith("file:"):
        tier["capacity"] = "64MiB"
    cfg = {"chunk_tokens": CHUNK, "tiers": [tier]}
    for i, (model, tenant) in enumerate(OWNERS):
        with KVTier.open(cfg, model=model, layout=LAYOUT, tenant=tenant) as kv:
            tokens = list(range(i * 1000, i * 1000 + 3 * CHUNK))
            kv.store(tokens, torch.ones(LAYOUT.chunk_shape(len(tokens)), dtype=LAYOUT.dtype))


def keys(url: str, options: dict[str, Any]) -> list[str]:
    async def listing() -> list[str]:
        capacity = 1 << 30 if url.startswith("file:") else None
        async with build_backend(url, capacity=capacity, options=options) as backend:
            return sorted([key async for key in backend.iter_keys()])

    return asyncio.run(listing())


@pytest.fixture(params=["file", "redis", "s3"])
def store(request, tmp_path) -> tuple[str, dict[str, Any]]:
    if request.param == "file":
        return f"file://{tmp_path}/kv", {}
    if request.param == "redis":
        return request.getfixturevalue("valkey_server").url, {}
    s3 = request.getfixturevalue("seaweedfs")
    return s3.url(), s3.options()


def test_purge_removes_exactly_the_selection(monkeypatch, capsys, store):
    url, options = store
    fill(url, options)
    before = keys(url, options)
    assert len(before) == 12
    flags = [f"-o{k}={v}" for k, v in options.items()]
    alice = tenant_tag("alice")

    code, out, err = run(monkeypatch, capsys, "purge", url, "--tenant", "alice", "--dry-run",
                         *flags)  # fmt: skip
    assert code == 0, err
    assert "6 chunks match (dry run)" in out
    assert keys(url, options) == before

    code, out, err = run(monkeypatch, capsys, "purge", url, "--tenant", "alice", *flags)
    assert code == 0, err
    assert "deleted 6 chunks" in out
    assert keys(url, options) == [k for k in before if not k.split(".")[0].endswith(alice)]

    code, out, err = run(monkeypatch, capsys, "purge", url, "--model", "m2", *flags)
    assert code == 0, err
    assert "deleted 3 chunks" in out
    left = keys(url, options)
    assert len(left) == 3 and all(k.startswith("m1-") for k in left)
    secret = options.get("secret_access_key")
    assert secret is None or secret not in out + err


def test_purge_without_a_selector_is_refused(monkeypatch, capsys, tmp_path):
    url = f"file://{tmp_path}/kv"
    fill(url, {})
    code, _, err = run(monkeypatch, capsys, "purge", url)
    assert code == 2
    assert "purge needs a selection" in err
    assert len(keys(url, {})) == 12


def test_a_new_weights_revision_never_reuses_the_old_kv(tmp_path):
    cfg = {"chunk_tokens": CHUNK, "tiers": [{"url": f"file://{tmp_path}/kv", "capacity": "64MiB"}]}
    tokens = list(range(3 * CHUNK))

    def opened(revision: str | None) -> KVTier:
        return KVTier.open(cfg, model="m1", layout=LAYOUT, revision=revision)

    with opened("v1") as kv:
        kv.store(tokens, torch.ones(LAYOUT.chunk_shape(len(tokens)), dtype=LAYOUT.dtype))
    with opened("v2") as kv:
        assert kv.lookup(tokens) == 0
    with opened(None) as kv:
        assert kv.lookup(tokens) == 0
    with opened("v1") as kv:
        assert kv.lookup(tokens) == len(tokens)
        v1 = kv.hasher.namespace
    with opened(None) as kv:  # without a revision the namespace is what it always was
        assert kv.hasher.namespace == namespace_for(ModelFingerprint("m1", LAYOUT)) != v1


def test_purge_older_than(monkeypatch, capsys, store):
    url, options = store
    flags = [f"-o{k}={v}" for k, v in options.items()]
    if url.startswith("redis"):  # Redis keeps no write times
        code, _, err = run(monkeypatch, capsys, "purge", url, "--older-than", "1s", *flags)
        assert code == 2 and "records when chunks were written" in err
        return
    fill(url, options)
    old = keys(url, options)
    time.sleep(3.2)  # s3's ages are up to 1 s short (whole-second LastModified)
    cfg_tokens = list(range(90_000, 90_000 + 2 * CHUNK))
    tier = {"url": url, "options": options, **({"capacity": "64MiB"} if "file:" in url else {})}
    with KVTier.open({"chunk_tokens": CHUNK, "tiers": [tier]}, model="m3", layout=LAYOUT) as kv:
        kv.store(cfg_tokens, torch.ones(LAYOUT.chunk_shape(len(cfg_tokens)), dtype=LAYOUT.dtype))
    assert len(keys(url, options)) == len(old) + 2
    code, out, err = run(monkeypatch, capsys, "purge", url, "--older-than", "2s", *flags)
    assert code == 0, err
    assert f"deleted {len(old)} chunks" in out
    assert [k for k in keys(url, options) if k in old] == []
    assert len(keys(url, options)) == 2
    code, _, err = run(monkeypatch, capsys, "purge", url, "--older-than", "soon", *flags)
    assert code == 2 and "positive duration" in err
