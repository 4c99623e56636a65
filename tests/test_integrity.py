"""Keyed integrity: blobs signed with secret keys; forged, unsigned and other tenants'
blobs are a miss and are removed; keys rotate; secrets never appear in errors."""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from test_config_validate import validate
from test_engine import CHUNK, LAYOUT, prompt
from test_migrate import fill, key_in, migrated, open_store

from kvtier.core import KVTier
from kvtier.core import blob as fmt
from kvtier.core.blob.framing import body_digest
from kvtier.core.buffers import default_pool
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.errors import ChunkCorruptedError, ConfigError
from kvtier.core.integrity import MacKeys, parse_keys, tenant_key
from kvtier.core.keys import tenant_tag
from kvtier.core.migrate import Outcome
from kvtier.core.plugins import get_registry

REGISTRY = get_registry()
RAW = CodecPipeline.from_config("raw", REGISTRY)
MASTER, OLD, OTHER = (secrets.token_bytes(32) for _ in range(3))
NS = "model-0123456789ab"
KEY_A = f"{NS}-{tenant_tag('a')}.{'1' * 32}"
KEY_B = f"{NS}-{tenant_tag('b')}.{'1' * 32}"
KEY_NONE = f"{NS}.{'1' * 32}"


def signed(key: str, keys: MacKeys, **encode: Any) -> bytes:
    chunk = torch.randn(2, 2, 4, 2, 8).half()
    with RAW.encode(key, chunk, default_pool(), keys=keys, **encode) as blob:
        return bytes(blob.view)


# -- the blob format -------------------------------------------------------------------


@pytest.mark.parametrize("strong", [False, True])
def test_a_signed_blob_verifies_with_its_key_and_no_other(strong: bool) -> None:
    keys = MacKeys((MASTER,), strong=strong)
    data = signed(KEY_A, keys)
    header = fmt.verify(data, expected_key=KEY_A, keys=keys)
    assert header.signed and data[6] == (fmt.SIGNED | (fmt.STRONG if strong else 0))
    fmt.verify(data)  # intact, whoever reads it: the digest needs no key
    with pytest.raises(ChunkCorruptedError, match="MAC"):
        fmt.verify(data, keys=MacKeys((OTHER,)))


@pytest.mark.parametrize(
    "damage",
    ["payload byte", "header byte", "mac byte", "digest byte", "strong flag cleared"],
)
def test_any_change_to_a_signed_blob_is_refused(damage: str) -> None:
    keys = MacKeys((MASTER,), strong=True)
    data = bytearray(signed(KEY_A, keys))
    header = fmt.parse(bytes(data))
    where = {
        "payload byte": header.payload_offset + 5,
        "header byte": 24,
        "mac byte": len(data) - 3,
        "digest byte": len(data) - 40,
        "strong flag cleared": 6,
    }[damage]
    data[where] ^= fmt.STRONG if damage == "strong flag cleared" else 0x01
    with pytest.raises(ChunkCorruptedError):
        fmt.verify(bytes(data), keys=keys)


def test_a_rewritten_header_cannot_reuse_a_valid_mac() -> None:
    """A store writer who moves a signed blob to another chunk's key (its header key
    rewritten, the digest recomputed) is caught by the MAC, not only the checksum."""
    keys = MacKeys((MASTER,))
    data = bytearray(signed(KEY_A, keys))
    other = KEY_A.replace("1" * 32, "2" * 32).encode()
    start = data.index(KEY_A.encode())
    data[start : start + len(other)] = other
    body = len(data) - 48
    data[body : body + 16] = body_digest(memoryview(data)[:body], data[6])
    fmt.verify(bytes(data))  # intact as far as a checksum can tell
    with pytest.raises(ChunkCorruptedError, match="MAC"):
        fmt.verify(bytes(data), keys=keys)


def test_unsigned_blobs_are_refused_unless_signatures_are_optional() -> None:
    with RAW.encode(KEY_A, torch.zeros(1, 2, 1, 1, 4).half(), default_pool()) as blob:
        data = bytes(blob.view)
    with pytest.raises(ChunkCorruptedError, match="unsigned"):
        fmt.verify(data, keys=MacKeys((MASTER,)))
    assert fmt.verify(data, keys=MacKeys((MASTER,), required=False)).key == KEY_A


def test_rotation_old_keys_verify_and_the_first_signs() -> None:
    old_blob = signed(KEY_A, MacKeys((OLD,)))
    rotated = MacKeys((MASTER, OLD))
    fmt.verify(old_blob, keys=rotated)
    fmt.verify(signed(KEY_A, rotated), keys=MacKeys((MASTER,)))
    with pytest.raises(ChunkCorruptedError):
        fmt.verify(old_blob, keys=MacKeys((MASTER,)))  # retired: OLD dropped from the list


def test_a_tenants_derived_key_signs_only_its_own_chunks() -> None:
    tenant_a = MacKeys(
        (tenant_key(MASTER, tenant_tag("a")),), derived=True, tenant_tag=tenant_tag("a")
    )
    master = MacKeys((MASTER,))
    fmt.verify(signed(KEY_A, tenant_a), keys=master)  # the master key verifies it
    with pytest.raises(ConfigError, match="cannot sign another tenant"):
        signed(KEY_B, tenant_a)
    # tenant a, using its key as if it were b's, still cannot make a blob b accepts
    forged = signed(KEY_B, MacKeys(tenant_a.keys, derived=True, tenant_tag=tenant_tag("b")))
    tenant_b = MacKeys(
        (tenant_key(MASTER, tenant_tag("b")),), derived=True, tenant_tag=tenant_tag("b")
    )
    for reader in (master, tenant_b):
        with pytest.raises(ChunkCorruptedError, match="MAC"):
            fmt.verify(forged, keys=reader)
    with pytest.raises(ChunkCorruptedError, match="MAC"):  # nor read b's chunks
        fmt.verify(signed(KEY_B, master), keys=tenant_a)
    fmt.verify(signed(KEY_NONE, master), keys=master)  # chunks of no tenant: their own key


# -- keys in the config -----------------------------------------------------------------


def test_keys_parse_as_hex_or_base64_and_errors_never_show_them() -> None:
    import base64

    assert parse_keys(f"{MASTER.hex()}\n\n{base64.b64encode(OLD).decode()}\n", "here") == (
        MASTER,
        OLD,
    )
    assert parse_keys(f"{MASTER.hex()},{OLD.hex()}", "env") == (MASTER, OLD)
    short = secrets.token_hex(8)
    with pytest.raises(ConfigError, match="here: key 2 is not 16 bytes") as err:
        parse_keys(f"{MASTER.hex()}\n{short}", "here")
    assert short not in str(err.value) and MASTER.hex() not in str(err.value)
    with pytest.raises(ConfigError, match="holds no key"):
        parse_keys("\n \n", "here")


def cache_config(tmp_path: Path, **integrity: Any) -> dict[str, Any]:
    return {
        "chunk_tokens": CHUNK,
        "tiers": [{"url": f"file://{tmp_path}/kv", "capacity": "64MiB"}],
        "integrity": integrity,
    }


@pytest.mark.parametrize(
    ("integrity", "message"),
    [
        ({}, "keys_file or keys_env"),
        ({"keys_file": "a", "keys_env": "B"}, "keys_file or keys_env"),
        ({"keys_env": "KVTEST_UNSET_KEYS"}, "environment variable is not set"),
        ({"keys_file": "/nonexistent/keys"}, "cannot read it"),
        ({"keys_env": "KVTEST_KEYS", "derived": True}, "set the config's tenant"),
        ({"keys_env": "KVTEST_KEYS", "digest": "md5"}, "digest"),
    ],
)
def test_bad_integrity_settings_are_clear_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, integrity: dict[str, Any], message: str
) -> None:
    monkeypatch.setenv("KVTEST_KEYS", MASTER.hex())
    with pytest.raises(ConfigError, match=message) as err:
        KVTier.open(cache_config(tmp_path, **integrity), model="m", layout=LAYOUT).close()
    assert MASTER.hex() not in str(err.value)


# -- end to end: a shared file tier -----------------------------------------------------


def open_cache(tmp_path: Path, keys: bytes | list[bytes] | None, **top: Any) -> KVTier:
    cfg: dict[str, Any] = cache_config(tmp_path) | top
    if keys is None:
        del cfg["integrity"]
    else:
        listed = keys if isinstance(keys, list) else [keys]
        path = tmp_path / f"keys-{secrets.token_hex(4)}"
        path.write_text("\n".join(k.hex() for k in listed))
        cfg["integrity"] = {"keys_file": str(path)} | cfg["integrity"]
    return KVTier.open(cfg, model="m", layout=LAYOUT)


def chunk_files(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "kv").glob("??/*"))


def test_a_signing_cache_reads_its_own_chunks_back(tmp_path: Path) -> None:
    tokens, kv = prompt(3 * CHUNK)
    with open_cache(tmp_path, MASTER) as cache:
        cache.store(tokens, kv)
        cache.flush()
    files = chunk_files(tmp_path)
    assert len(files) == 3 and all(f.read_bytes()[6] == fmt.SIGNED for f in files)
    with open_cache(tmp_path, MASTER) as cache:
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out=out)[0] == 3 * CHUNK and torch.equal(out, kv)


@pytest.mark.parametrize("forger", ["another key", "no key (unsigned)"])
def test_forged_chunks_in_a_shared_tier_are_a_miss_and_removed(tmp_path: Path, forger: str) -> None:
    tokens, kv = prompt(2 * CHUNK)
    with open_cache(tmp_path, OTHER if forger == "another key" else None) as writer:
        writer.store(tokens, torch.zeros_like(kv))  # planted: valid blobs, wrong data
        writer.flush()
    assert len(chunk_files(tmp_path)) == 2
    with open_cache(tmp_path, MASTER) as cache:
        assert cache.retrieve(tokens, out=torch.ones_like(kv))[0] == 0
        stats = cache.stats()
        assert stats.tiers[0].corrupt == 2
        assert cache.lookup(tokens) == 0  # never counted again
        cache.store(tokens, kv)  # the real chunks take their place
        cache.flush()
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out=out)[0] == 2 * CHUNK and torch.equal(out, kv)


def test_keys_rotate_without_losing_the_stored_chunks(tmp_path: Path) -> None:
    tokens, kv = prompt(2 * CHUNK)
    with open_cache(tmp_path, OLD) as cache:
        cache.store(tokens, kv)
        cache.flush()
    more_tokens, more_kv = prompt(2 * CHUNK, seed=1)
    with open_cache(tmp_path, [MASTER, OLD]) as cache:
        assert cache.retrieve(tokens, out=torch.zeros_like(kv))[0] == 2 * CHUNK
        cache.store(more_tokens, more_kv)
        cache.flush()
    with open_cache(tmp_path, MASTER) as cache:  # OLD retired
        assert cache.retrieve(more_tokens, out=torch.zeros_like(more_kv))[0] == 2 * CHUNK
        assert cache.retrieve(tokens, out=torch.zeros_like(kv))[0] == 0


def test_a_tenant_with_its_derived_key_shares_the_tier_with_the_operator(tmp_path: Path) -> None:
    tokens, kv = prompt(2 * CHUNK)
    derived = tenant_key(MASTER, tenant_tag("a"))
    with open_cache(tmp_path, derived, tenant="a", integrity={"derived": True}) as tenant:
        tenant.store(tokens, kv)
        tenant.flush()
    with open_cache(tmp_path, MASTER, tenant="a") as operator:
        assert operator.retrieve(tokens, out=torch.zeros_like(kv))[0] == 2 * CHUNK


def test_optional_signatures_read_old_unsigned_chunks(tmp_path: Path) -> None:
    tokens, kv = prompt(2 * CHUNK)
    with open_cache(tmp_path, None) as cache:
        cache.store(tokens, kv)
        cache.flush()
    with open_cache(tmp_path, MASTER, integrity={"require_signed": False}) as cache:
        assert cache.retrieve(tokens, out=torch.zeros_like(kv))[0] == 2 * CHUNK


def test_the_cpu_tier_keeps_signed_blobs_unsealed_until_they_leave(tmp_path: Path) -> None:
    cfg = cache_config(tmp_path)
    cfg["tiers"].insert(0, {"url": "cpu://", "capacity": "64MiB"})
    path = tmp_path / "keys"
    path.write_text(MASTER.hex())
    cfg["integrity"] = {"keys_file": str(path)}
    tokens, kv = prompt(2 * CHUNK)
    with KVTier.open(cfg, model="m", layout=LAYOUT) as cache:
        cache.store(tokens, kv)
        cache.flush()
        out = torch.zeros_like(kv)
        assert cache.retrieve(tokens, out=out)[0] == 2 * CHUNK and torch.equal(out, kv)
    for file in chunk_files(tmp_path):
        fmt.verify(file.read_bytes(), keys=MacKeys((MASTER,)))


def test_migrate_refuses_to_recode_a_signed_blob(tmp_path: Path) -> None:
    keys = [key_in("test", i) for i in range(2)]
    target = CodecPipeline.from_config("int8", REGISTRY)

    async def scenario() -> None:
        src = open_store(f"file://{tmp_path}/src")
        dst = open_store(f"file://{tmp_path}/dst")
        async with src, dst:
            signing = CodecPipeline.from_config("raw", REGISTRY)
            blobs = [
                signing.encode(
                    k, torch.zeros(1, 2, 2, 1, 4).half(), default_pool(), keys=MacKeys((MASTER,))
                )
                for k in keys[:1]
            ]
            assert await src.put_many([(keys[0], blobs[0])])
            blobs[0].release()
            await fill(src, keys[1:])
            report = await migrated(src, dst, recode=target)
        assert (report.copied, report.failed) == (1, 1)
        [(outcome, key, reason)] = report.problems
        assert (outcome, key) == (Outcome.FAILED, keys[0]) and "signed" in reason

    asyncio.run(scenario())


def test_config_validate_checks_the_keys(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    config = cache_config(tmp_path, keys_env="KVTEST_KEYS")
    code, output = validate(tmp_path, monkeypatch, capsys, config)
    assert code == 2 and "KVTEST_KEYS" in output and "not set" in output, output
    monkeypatch.setenv("KVTEST_KEYS", MASTER.hex())
    code, output = validate(tmp_path, monkeypatch, capsys, config)
    assert code == 0 and "integrity" in output and MASTER.hex() not in output, output


@pytest.mark.parametrize("variable", ["KVTIER_MAC_KEYS", "KVTIER_CUSTOM_KEYS"])
def test_the_keys_variable_is_not_taken_for_a_config_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    """``KVTIER_*`` variables override config keys; the one holding the keys must not
    (it would be an unknown key, and its value could end up in an error)."""
    path = tmp_path / "kvtier.yaml"
    path.write_text(yaml.safe_dump(cache_config(tmp_path, keys_env=variable)))
    monkeypatch.setenv(variable, MASTER.hex())
    tokens, kv = prompt(CHUNK)
    with KVTier.open(str(path), model="m", layout=LAYOUT) as cache:
        assert cache.integrity is not None and cache.integrity.keys == (MASTER,)
        cache.store(tokens, kv)
        cache.flush()
    assert [f.read_bytes()[6] for f in chunk_files(tmp_path)] == [fmt.SIGNED]
