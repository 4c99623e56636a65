"""``kvtier config validate`` runs every check opening the chain runs, without
connecting: what it calls valid opens, what open refuses it refuses, in one line each
(issue 11, item 2)."""

from __future__ import annotations

import pytest
import torch
import yaml
from test_cli import run

from kvtier.core import KVLayout, KVTier
from kvtier.core.errors import ConfigError

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=15, dtype=torch.float16)

BAD = {
    "no capacity on cpu": ({"url": "cpu://"}, "needs a positive capacity"),
    "zero capacity on file": ({"url": "file:///tmp/kv", "capacity": 0}, "positive capacity"),
    "misspelled file option": (
        {"url": "file:///tmp/kv", "capacity": "1GiB", "options": {"o_drect": True}},
        "did you mean 'o_direct'",
    ),
    "misspelled redis option": (
        {"url": "redis://127.0.0.1:1/0", "options": {"tll": 5}},
        "did you mean 'ttl'",
    ),
    "unknown eviction policy": (
        {"url": "cpu://", "capacity": "1GiB", "options": {"eviction": "fifo"}},
        "unknown eviction policy 'fifo'",
    ),
    "port 99999": ({"url": "redis://127.0.0.1:99999/0"}, "port '99999'"),
    "relative file path": ({"url": "file://relative/kv", "capacity": "1GiB"}, "names a host"),
    "bucket S3 forbids": ({"url": "s3://Bad_Bucket/p"}, "not a valid bucket name"),
    "nixl without index": ({"url": "nixl://g", "capacity": "1GiB"}, "'index' is required"),
    "mooncake without metadata_server": (
        {"url": "mooncake://127.0.0.1"},
        "'metadata_server' is required",
    ),
    "unknown codec": ({"url": "cpu://", "capacity": "1GiB", "codec": "int9"}, "unknown codec"),
    # found by probing the s3 and mooncake options ("And then")
    "s3 endpoint port 99999": (
        {"url": "s3://bucket/p", "options": {"endpoint_url": "http://127.0.0.1:99999"}},
        "Port out of range",
    ),
    "s3 region with spaces": (
        {"url": "s3://bucket/p", "options": {"region": "us east 1"}},
        "region must be a region name",
    ),
    "s3 CA bundle missing": (
        {"url": "s3://bucket/p", "options": {"verify": "/nonexistent/ca.pem"}},
        "is not a file",
    ),
    "mooncake local_hostname": (
        {
            "url": "mooncake://127.0.0.1",
            "options": {"metadata_server": "P2PHANDSHAKE", "local_hostname": "no such host"},
        },
        "local_hostname must be an IP address or a host name",
    ),
    "mooncake admin_url port": (
        {
            "url": "mooncake://127.0.0.1",
            "options": {"metadata_server": "P2PHANDSHAKE", "admin_url": "http://h:99999"},
        },
        "Port out of range",
    ),
    "unclosed IPv6 bracket": ({"url": "redis://[::1:6379/0"}, "is not a valid URL"),
    "control character": ({"url": "file:///tmp/a\nb", "capacity": "1GiB"}, "control character"),
}


def validate(tmp_path, monkeypatch, capsys, config: dict, *args: str) -> tuple[int, str]:
    path = tmp_path / "kvtier.yaml"
    path.write_text(yaml.safe_dump(config))
    code, out, err = run(monkeypatch, capsys, "config", "validate", str(path), *args, columns=300)
    return code, out + err


@pytest.mark.parametrize("case", BAD)
def test_validate_refuses_what_open_refuses(tmp_path, monkeypatch, capsys, case) -> None:
    tier, message = BAD[case]
    config = {"tiers": [tier]}
    code, output = validate(tmp_path, monkeypatch, capsys, config)
    assert code == 2 and message in output, output
    assert len(output.strip().splitlines()) == 1, "one line per run"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        KVTier.open(config, model="m", layout=LAYOUT).close()


def test_validate_names_every_problem_at_once(tmp_path, monkeypatch, capsys) -> None:
    tiers = [BAD["no capacity on cpu"][0], BAD["bucket S3 forbids"][0]]
    code, output = validate(tmp_path, monkeypatch, capsys, {"tiers": tiers})
    assert code == 2 and "positive capacity" in output and "bucket name" in output


def test_two_tiers_on_one_store_are_an_error(tmp_path, monkeypatch, capsys) -> None:
    tier = {"url": f"file://{tmp_path}/kv", "capacity": "1GiB"}
    same = {"url": f"file://{tmp_path}/kv/", "capacity": "2GiB"}
    code, output = validate(tmp_path, monkeypatch, capsys, {"tiers": [tier, same]})
    assert code == 2 and "are the same store" in output


def test_codecs_are_checked_against_a_layout_when_one_is_given(
    tmp_path, monkeypatch, capsys
) -> None:
    config = {"tiers": [{"url": "cpu://", "capacity": "1GiB", "codec": "int4"}]}
    assert validate(tmp_path, monkeypatch, capsys, config)[0] == 0
    layout = ("--layers", "2", "--kv-heads", "2", "--head-dim", "15")
    code, output = validate(tmp_path, monkeypatch, capsys, config, *layout)
    assert code == 2 and "codec 'int4'" in output and "head_dim" in output
    code, output = validate(tmp_path, monkeypatch, capsys, config, "--layers", "2")
    assert code == 2 and "together" in output


def test_validate_connects_to_nothing(tmp_path, monkeypatch, capsys) -> None:
    """A chain whose servers are down validates: nothing was contacted."""
    config = {"tiers": [{"url": "redis://127.0.0.1:1/0"}, {"url": "s3://bucket/p"}]}
    code, output = validate(tmp_path, monkeypatch, capsys, config)
    assert code == 0 and "valid" in output
