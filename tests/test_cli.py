"""The command line: every command, and bad input as one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvtier.core import KVLayout, KVTier
from kvtier.core.cli import main


def run(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["kvtier", *args])
    monkeypatch.setenv("COLUMNS", "200")
    try:
        main()
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def store(tmp_path):
    """A file store holding two chunks of a model."""
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    url = f"file://{tmp_path}/kv"
    cfg = {"chunk_tokens": 8, "tiers": [{"url": url, "capacity": "16MiB", "codec": "int8"}]}
    with KVTier.open(cfg, model="org/cli-model", layout=layout) as cache:
        cache.store(torch.arange(16), torch.randn(layout.chunk_shape(16)).half())
        namespace = cache.hasher.namespace
    return url, namespace


def test_plugins_lists_builtins(monkeypatch, capsys):
    code, out, _ = run(monkeypatch, capsys, "plugins")
    assert code == 0
    for name in ("cpu", "file", "codecs", "eviction", "backend:cpu", "codec:int8", "kvtier"):
        assert name in out


def test_ls_and_stats(monkeypatch, capsys, store):
    url, namespace = store
    code, out, _ = run(monkeypatch, capsys, "ls", url)
    assert code == 0 and out.count(f"{namespace}.") == 2, out  # two keys
    assert "int8 [2, 2, 8, 2, 8]" in out
    code, out, _ = run(monkeypatch, capsys, "stats", url)
    assert code == 0 and f"chunks in {namespace}" in out and "bytes_used" in out


def test_config_validate(monkeypatch, capsys, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        "tiers:\n  - {url: 'cpu://', capacity: 1GiB}\n  - {url: 'file:///x', codec: int8+zstd}\n"
    )
    code, out, _ = run(monkeypatch, capsys, "config", "validate", str(good))
    assert code == 0 and "int8+zstd" in out and "valid" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiers:\n  - {url: 'cpu://', capacty: 1GiB}\n")
    code, out, err = run(monkeypatch, capsys, "config", "validate", str(bad))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "did you mean 'capacity'" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ls", "nosuch://x"], "no backend handles URL scheme 'nosuch'"),
        (["ls"], "Missing argument 'url'. (see 'kvtier ls --help')"),
        (["ls", "cpu://", "--limit", "zero"], "Invalid value for '--limit'"),
        (["frobnicate"], "No such command 'frobnicate'"),
        (["ls", "file://relative/path"], "file://"),
        (["ls", "cpu://", "--option", "novalue"], "KEY=VALUE"),
        (["ls", "cpu://", "--option", "colour=red"], "unknown key 'colour'"),
        (["check-backend", "cpu://", "--capacity", "lots"], "--capacity"),
        (["config", "validate", "/does/not/exist.yaml"], "cannot read config file"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(monkeypatch, capsys, args, message):
    code, out, err = run(monkeypatch, capsys, *args)
    assert code == 2, err
    assert err.startswith("kvtier: error: ") and err.count("\n") == 1
    assert message in err
    assert "Traceback" not in err + out


def test_demo_stores_and_reloads(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code, out, err = run(monkeypatch, capsys, "demo", "--tokens", "600")
    assert code == 0, err
    assert "retrieve after restart" in out and "NO" not in out
    assert out.count("yes") == 2
    assert (tmp_path / "kvtier" / "chunks").is_dir()


def test_check_backend_runs_the_conformance_suite(monkeypatch, capsys):
    code, out, _ = run(
        monkeypatch,
        capsys,
        "check-backend",
        "cpu://",
        "--capacity",
        "64MiB",
        "--pytest-arg=-m",
        "--pytest-arg=not slow",
        "--pytest-arg=-p",
        "--pytest-arg=no:randomly",
    )
    assert code == 0, out
    assert " passed" in out and "failed" not in out


def test_console_script_exit_code():
    script = Path(sys.executable).with_name("kvtier")  # installed beside this interpreter
    result = subprocess.run(
        [str(script), "ls", "s4://bucket"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.startswith("kvtier: error: no backend handles URL scheme 's4'")
