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


def test_demo_runs_on_the_default_chain(monkeypatch, capsys, tmp_path):
    pytest.importorskip("transformers")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    plot = tmp_path / "ttft.png"
    args = ("--model", "tiny", "--users", "2", "--turns", "2", "--contexts", "256", "--plot")
    code, out, err = run(monkeypatch, capsys, "demo", *args, str(plot))
    assert code == 0, err
    for text in ("user 2 turn 2", "RAG, documents in the same order", "changed order",
                 "TTFT vs context", "hit rate", f"written to {plot}"):  # fmt: skip
        assert text in out
    assert " NO " not in out  # every request's next token matched the full prefill's
    assert (tmp_path / "kvtier" / "chunks").is_dir() and plot.is_file()


def test_demo_without_its_extra_says_what_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    code, out, err = run(monkeypatch, capsys, "demo", "--model", "tiny")
    assert code == 2 and out == ""
    assert err == (
        "kvtier: error: kvtier demo needs optional dependencies: pip install 'kvtier[demo]'\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--contexts", "1k"], "--contexts '1k'"), (["--model", "7b"], "unknown model size '7b'")],
)
def test_demo_bad_arguments(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code, _, err = run(monkeypatch, capsys, "demo", *args, "--plot", str(tmp_path / "p.png"))
    assert code == 2 and err.startswith("kvtier: error: ") and message in err, err


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
