"""Config loading: validation messages, sizes, env overrides, defaults."""

import pytest
import yaml

from kvtier.core.config import KVTierConfig, default_config, load_config, parse_size
from kvtier.core.errors import ConfigError

TWO_TIERS = {
    "tiers": [{"url": "cpu://", "capacity": "1GiB"}, {"url": "file:///tmp/x", "capacity": 5}]
}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("20GiB", 20 << 30),
        ("500 GB", 500 * 10**9),
        ("1.5MiB", 3 << 19),
        (4096, 4096),
        ("64k", 64 << 10),
        ("7", 7),
        ("2 TiB", 2 << 40),
    ],
)
def test_sizes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["20 zb", "-1", "GiB", True, 1.5, None, -3])
def test_bad_sizes(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


def test_yaml_file(tmp_path):
    path = tmp_path / "kv.yaml"
    path.write_text(
        "chunk_tokens: 128\n"
        "tiers:\n"
        "  - url: cpu://\n    capacity: 20GiB\n"
        "  - url: file:///nvme/kv\n    capacity: 500GiB\n    codec: int8+zstd\n"
        "    write_policy: back\n    promote: 'false'\n"
    )
    cfg = load_config(path, environ={})
    assert cfg.chunk_tokens == 128
    assert [t.name for t in cfg.tiers] == ["cpu", "file"]
    assert cfg.tiers[0].capacity == 20 << 30
    assert cfg.tiers[1].write_policy == "back"
    assert cfg.tiers[1].promote is False, "'false' reads as False, not as a truthy string"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"tiers": [{"url": "cpu://", "capcity": 1}]},
            "unknown key 'tiers.0.capcity' (did you mean 'capacity'?)",
        ),
        ({"chunk_tokns": 2, "tiers": [{"url": "cpu://"}]}, "did you mean 'chunk_tokens'"),
        ({"tiers": []}, "at least 1"),
        ({}, "'tiers' is required"),
        ({"tiers": [{"capacity": 1}]}, "'tiers.0.url' is required"),
        ({"tiers": [{"url": "cpu://", "write_policy": "maybe"}]}, "write_policy"),
        (
            {"tiers": [{"url": "cpu://", "write_policy": "back"}]},
            "first tier cannot use write_policy 'back'",
        ),
        ({"tiers": [{"url": "cpu://", "name": "a"}, {"url": "cpu://x", "name": "a"}]}, "named 'a'"),
        ({"tiers": [{"url": "cpu://", "capacity": "lots"}]}, "expected a size"),
        ({"hash": "md5", "tiers": [{"url": "cpu://"}]}, "hash"),
    ],
)
def test_errors_name_the_problem(data, message):
    with pytest.raises(ConfigError) as info:
        load_config(data, environ={})
    assert message in str(info.value)


def test_unnamed_tiers_of_one_scheme_get_distinct_names():
    cfg = load_config(
        {"tiers": [{"url": "cpu://"}, {"url": "cpu://b"}, {"url": "file:///x"}]}, environ={}
    )
    assert [t.name for t in cfg.tiers] == ["cpu", "cpu-2", "file"]


@pytest.fixture
def two_tiers_file(tmp_path):
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump(TWO_TIERS))
    return path


def test_env_overrides(two_tiers_file):
    env = {
        "KVTIER_CHUNK_TOKENS": "64",
        "KVTIER_TIERS__1__CAPACITY": "2GiB",
        "KVTIER_TIERS__0__PROMOTE": "false",
        "KVTIER_PLUGINS__DISABLE": "[foo, bar]",
        "KVTIER_TIERS__1__OPTIONS__FSYNC": "true",
        "OTHER": "ignored",
    }
    cfg = load_config(two_tiers_file, environ=env)
    assert cfg.chunk_tokens == 64
    assert cfg.tiers[1].capacity == 2 << 30
    assert cfg.tiers[0].promote is False
    assert cfg.plugins.disable == ["foo", "bar"]
    assert cfg.tiers[1].options == {"fsync": "true"}


def test_env_overrides_apply_to_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = load_config(None, environ={"KVTIER_TIERS__0__CAPACITY": "3GiB"})
    assert cfg.tiers[0].capacity == 3 << 30


def test_a_mapping_given_in_code_is_taken_as_it_is():
    """KVTIER_* variables configure deployments (files, the default), not the values a
    program passes; even a misspelled variable does not break it."""
    env = {"KVTIER_CHUNK_TOKENS": "64", "KVTIER_CHUNK_TOKNS": "1"}
    cfg = load_config(TWO_TIERS, environ=env)
    assert cfg.chunk_tokens == 256
    assert TWO_TIERS["tiers"][1]["capacity"] == 5, "the caller's mapping is not modified"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"KVTIER_CHUNK_TOKNS": "1"},
            "KVTIER_CHUNK_TOKNS: unknown key 'chunk_tokns' (did you mean 'chunk_tokens'?)",
        ),
        ({"KVTIER_TIERS__5__CAPACITY": "1"}, "KVTIER_TIERS__5__CAPACITY: '5' is not the index"),
        ({"KVTIER_TIERS__0__CAPCITY": "1"}, "did you mean 'capacity'"),
        ({"KVTIER_CHUNK_TOKENS": "many"}, "chunk_tokens"),
    ],
)
def test_bad_env_overrides(env, message, two_tiers_file):
    with pytest.raises(ConfigError) as info:
        load_config(two_tiers_file, environ=env)
    assert message in str(info.value)


def test_config_env_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("tiers: [{url: 'cpu://', capacity: 1MiB}]\n")
    assert load_config(None, environ={"KVTIER_CONFIG": str(path)}).tiers[0].capacity == 1 << 20


def test_default_config_is_cpu_then_file_in_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cfg = load_config(None, environ={})
    assert [(t.name, t.capacity) for t in cfg.tiers] == [("cpu", 2 << 30), ("file", 20 << 30)]
    assert cfg.tiers[1].url == f"file://{tmp_path}/kvtier/chunks"
    assert default_config()["tiers"][0]["url"] == "cpu://"


@pytest.mark.parametrize(
    ("content", "message"), [("tiers: [", "not valid YAML"), ("- a\n- b\n", "mapping")]
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        load_config(path, environ={})
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_ready_config_objects_pass_through():
    cfg = KVTierConfig.model_validate(TWO_TIERS)
    assert load_config(cfg) is cfg


ALIAS_BOMB = (
    'a: &a ["x","x","x","x","x","x","x","x","x"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n"
    "e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n"
    "tiers: *e\n"
)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (ALIAS_BOMB.encode(), "expands to more than 10000 values"),
        (b"a: &a [*a]\ntiers: []\n", "recursive alias"),
        (b"tiers:\n  - url: cpu://\n    capacity: 1GiB\n    capacity: 2GiB\n", "given twice"),
        (b"tiers:\n  - url: cpu://\n    name: caf\xe9\n", "not UTF-8 text: byte 36 is 0xe9"),
    ],
    ids=["alias bomb", "recursive alias", "duplicate key", "latin-1"],
)
def test_hostile_files_get_one_short_error(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path, environ={})
    assert len(str(info.value)) < 300 and str(path) in str(info.value)


def test_merge_keys_may_override_what_they_merge(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text(
        "tiers:\n  - &ram {url: 'cpu://', capacity: 1GiB}\n"
        "  - {<<: *ram, url: 'cpu://b', capacity: 2GiB}\n"
    )
    cfg = load_config(path, environ={})
    assert [t.capacity for t in cfg.tiers] == [1 << 30, 2 << 30]


def test_errors_quote_huge_input_briefly():
    huge = {"tiers": [{"url": "cpu://", "capacity": ["x" * 1000] * 10_000}]}
    with pytest.raises(ConfigError) as info:
        load_config(huge, environ={})
    assert len(str(info.value)) < 1000  # was 10 MB (34.7 MB for an alias bomb)
