"""Read-only commands write nothing, and a missing store is an error naming it
(issue 11, item 7): ``ls``, ``stats``, ``migrate`` from a missing source, and a dry run."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from test_cli import run

from kvtier.core import KVLayout, KVTier
from kvtier.core.errors import ConfigError

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    code, out, err = run(monkeypatch, capsys, *args)
    return code, out + err


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("command", ["ls", "stats"])
def test_a_mistyped_folder_is_an_error_and_is_not_created(tmp_path, monkeypatch, capsys, command):
    code, output = cli(monkeypatch, capsys, command, f"file://{tmp_path}/typo/kv")
    assert code == 2 and "does not exist" in output and len(output.splitlines()) == 1
    assert tree(tmp_path) == []


@pytest.mark.parametrize("command", ["ls", "stats"])
def test_inspecting_a_folder_writes_nothing_into_it(tmp_path, monkeypatch, capsys, command):
    (tmp_path / "kv").mkdir()
    assert cli(monkeypatch, capsys, command, f"file://{tmp_path}/kv")[0] == 0
    assert tree(tmp_path) == ["kv"], "no .tmp, no shard folders"


def test_migrate_from_a_missing_source_is_an_error_and_creates_nothing(
    tmp_path, monkeypatch, capsys
) -> None:
    code, output = cli(
        monkeypatch, capsys, "migrate", f"file://{tmp_path}/none", f"file://{tmp_path}/dst"
    )
    assert code == 2 and "none does not exist" in output
    assert tree(tmp_path) == []


def test_a_dry_run_creates_no_destination(tmp_path, monkeypatch, capsys) -> None:
    cfg = {"chunk_tokens": 8, "tiers": [{"url": f"file://{tmp_path}/src", "capacity": "8MiB"}]}
    with KVTier.open(cfg, model="m", layout=LAYOUT) as cache:
        cache.store(torch.arange(16), torch.zeros(LAYOUT.chunk_shape(16), dtype=LAYOUT.dtype))
    before = tree(tmp_path)
    code, output = cli(
        monkeypatch,
        capsys,
        "migrate",
        f"file://{tmp_path}/src",
        f"file://{tmp_path}/new",
        "--dry-run",
    )
    assert code == 0 and re.search(r"would copy\s*│\s*2\s*│", output), output
    assert tree(tmp_path) == before, "the dry run changed files"


def test_a_read_only_tier_is_no_tier_of_a_chain(tmp_path) -> None:
    tier = {"url": f"file://{tmp_path}/kv", "capacity": "1MiB", "options": {"read_only": True}}
    with pytest.raises(ConfigError, match="read_only is for inspecting"):
        KVTier.open({"tiers": [tier]}, model="m", layout=LAYOUT)
