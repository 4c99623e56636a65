"""Chunk keys: chaining, vLLM compatibility, namespaces and safe string forms."""

import hashlib

import cbor2
import numpy as np
import pytest
import torch

from kvtier.core.errors import ConfigError
from kvtier.core.keys import (
    ChunkHasher,
    ChunkKey,
    model_slug,
    namespace_for,
    tenant_tag,
    validate_key,
)
from kvtier.core.layout import KVLayout, ModelFingerprint

LAYOUT = KVLayout(num_layers=4, num_kv_heads=2, head_dim=8, dtype=torch.float16)


def hasher(**kw):
    return ChunkHasher(namespace_for(ModelFingerprint("m", LAYOUT)), **kw)


def test_chunks_cover_full_chunks_only_by_default():
    h = hasher(chunk_tokens=4)
    assert h.chunk_bounds(10) == [(0, 4), (4, 8)]
    assert h.chunk_bounds(10, partial=True) == [(0, 4), (4, 8), (8, 10)]
    assert len(h.keys(list(range(10)))) == 2
    assert len(h.keys(list(range(10)), partial=True)) == 3


def test_keys_are_prefix_chained():
    h = hasher(chunk_tokens=4)
    a = h.keys([1, 2, 3, 4, 5, 6, 7, 8])
    b = h.keys([1, 2, 3, 4, 5, 6, 7, 9])
    c = h.keys([0, 2, 3, 4, 5, 6, 7, 8])
    assert a[0] == b[0] and a[1] != b[1]
    assert a[0] != c[0] and a[1] != c[1], "a change in chunk 0 changes every later key"


def test_token_container_types_give_identical_keys():
    h = hasher(chunk_tokens=4)
    tokens = [5, 6, 7, 8, 9, 10, 11, 12]
    expected = h.keys(tokens)
    assert h.keys(np.array(tokens, dtype=np.int32)) == expected
    assert h.keys(torch.tensor(tokens)) == expected
    assert h.keys(tuple(tokens)) == expected


@pytest.mark.parametrize("algorithm", ["xxh3_128", "sha256_cbor"])
def test_seed_is_fixed_and_changes_keys(algorithm):
    a = hasher(chunk_tokens=2, algorithm=algorithm).keys([1, 2])
    assert a == hasher(chunk_tokens=2, algorithm=algorithm).keys([1, 2])
    assert a != hasher(chunk_tokens=2, algorithm=algorithm, seed="other").keys([1, 2])


def test_extra_keys_separate_chunks():
    h = hasher(chunk_tokens=2)
    plain = h.keys([1, 2, 3, 4])
    salted = h.keys([1, 2, 3, 4], extra_keys=[("salt",)])
    assert plain[0] != salted[0] and plain[1] != salted[1]


def test_sha256_cbor_matches_vllm_block_hash_formula():
    """vLLM: NONE_HASH = sha256_cbor(PYTHONHASHSEED); block = sha256_cbor((parent,
    tuple(tokens), extra_keys)), canonical CBOR."""

    def vllm_sha256_cbor(obj):
        return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()

    seed = "1234"
    h = hasher(chunk_tokens=3, algorithm="sha256_cbor", seed=seed)
    tokens = [11, 22, 33, 44, 55, 66]
    extra = [("my-salt",), None]
    parent = vllm_sha256_cbor(seed)
    expected = []
    for i, start in enumerate(range(0, 6, 3)):
        parent = vllm_sha256_cbor((parent, tuple(tokens[start : start + 3]), extra[i]))
        expected.append(parent)
    assert [k.digest for k in h.keys(tokens, extra_keys=extra)] == expected


def test_namespace_isolates_models_layouts_tp_and_tenants():
    base = ModelFingerprint("org/model", LAYOUT)
    variants = [
        ModelFingerprint("org/model-2", LAYOUT),
        ModelFingerprint("org/model", KVLayout(4, 2, 8, torch.bfloat16)),
        ModelFingerprint("org/model", KVLayout(5, 2, 8, torch.float16)),
        ModelFingerprint("org/model", KVLayout(4, 4, 8, torch.float16)),
        ModelFingerprint("org/model", KVLayout(4, 2, 16, torch.float16)),
        ModelFingerprint("org/model", LAYOUT, tp_rank=1, tp_size=2),
        ModelFingerprint("org/model", LAYOUT, tp_rank=0, tp_size=2),
    ]
    names = {namespace_for(base)} | {namespace_for(v) for v in variants}
    names |= {namespace_for(base, "tenant-a"), namespace_for(base, "tenant-b")}
    assert len(names) == len(variants) + 3
    assert namespace_for(base, "tenant-a").endswith(tenant_tag("tenant-a"))


@pytest.mark.parametrize("model", ["../../etc/passwd", "a/b\\c:d", "x" * 500, "..", "名前"])
def test_key_strings_are_safe_names(model):
    key = hasher(chunk_tokens=1).keys([1])[0]
    key = ChunkKey(namespace_for(ModelFingerprint(model, LAYOUT)), key.digest)
    text = str(key)
    assert validate_key(text) == text
    assert "/" not in text and "\\" not in text and not text.startswith(".")
    assert len(text) <= 160
    assert ChunkKey.parse(text) == key
    assert model_slug(model) in text


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "../x.00112233445566778899aabbccddeeff",
        "a/b.00112233445566778899aabbccddeeff",
        "ns.XYZ",
        "ns." + "0" * 31,
        "ns." + "0" * 200,
        ".ns.00112233445566778899aabbccddeeff",
    ],
)
def test_invalid_key_strings_are_rejected(bad):
    with pytest.raises(ConfigError, match="invalid chunk key"):
        validate_key(bad)


def test_bad_hasher_arguments():
    with pytest.raises(ConfigError, match="chunk_tokens"):
        hasher(chunk_tokens=0)
    with pytest.raises(ConfigError, match="unknown hash algorithm"):
        hasher(algorithm="md5")
    with pytest.raises(ConfigError, match="one-dimensional"):
        hasher().keys([[1, 2], [3, 4]])
