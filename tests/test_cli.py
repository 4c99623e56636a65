"""The command line: every command, and bad input as one line with exit code 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvtier.core import KVLayout, KVTier
from kvtier.core.cli import main
from kvtier.core.plugins import get_registry

KVTIER = Path(sys.executable).with_name("kvtier")
"""The console script, installed beside this interpreter."""


def run(monkeypatch, capsys, *args: str, columns: int = 200) -> tuple[int, str, str]:
    """Run ``kvtier *args`` in this process; its exit code, stdout and stderr."""
    monkeypatch.setattr(sys, "argv", ["kvtier", *args])
    monkeypatch.setenv("COLUMNS", str(columns))
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


def test_ls_names_layered_blobs(monkeypatch, capsys, tmp_path):
    layout = KVLayout(num_layers=2, num_kv_heads=2, head_dim=8, dtype=torch.float16)
    url = f"file://{tmp_path}/kv"
    tier = {"url": url, "capacity": "16MiB", "codec": "int8"}
    cfg = {"chunk_tokens": 8, "blob_layout": "layers", "tiers": [tier]}
    with KVTier.open(cfg, model="org/cli-model", layout=layout) as cache:
        cache.store(torch.arange(8), torch.randn(layout.chunk_shape(8)).half())
    code, out, _ = run(monkeypatch, capsys, "ls", url)
    assert code == 0 and "int8, layered [2, 2, 8, 2, 8]" in out, out


def test_config_validate(monkeypatch, capsys, tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(
        "tiers:\n  - {url: 'cpu://', capacity: 1GiB}\n"
        "  - {url: 'file:///x', capacity: 1GiB, codec: int8+zstd}\n"
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


def test_demo_runs_on_the_default_chain(tmp_path):
    """``kvtier demo`` as a user runs it: the console script, in a new process (where
    transformers would log its once-per-process messages), prints no warning."""
    pytest.importorskip("transformers")
    plot = tmp_path / "ttft.png"
    args = ("--model", "tiny", "--users", "2", "--turns", "2", "--contexts", "256", "--plot")
    result = subprocess.run(
        [str(KVTIER), "demo", *args, str(plot)],
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path)},
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert (result.returncode, result.stderr) == (0, "")  # no warnings, no traceback
    out = result.stdout
    for text in ("user 2 turn 2", "RAG, documents in the same order", "changed order",
                 "TTFT vs context", "hit rate", "written to"):  # fmt: skip
        assert text in out
    assert str(plot) in out.replace("\n", "")  # rich may wrap the path
    assert " NO " not in out  # every request's next token matched the full prefill's
    assert (tmp_path / "kvtier" / "chunks").is_dir() and plot.is_file()


@pytest.mark.parametrize(
    ("missing", "args"), [("transformers", []), ("matplotlib", ["--plot", "p.png"])]
)
def test_demo_without_its_extra_says_what_to_install(monkeypatch, capsys, missing, args):
    monkeypatch.setitem(sys.modules, missing, None)  # importing it fails
    code, out, err = run(monkeypatch, capsys, "demo", "--model", "tiny", *args)
    assert code == 2 and out == ""
    assert err == (
        "kvtier: error: kvtier demo needs optional dependencies: pip install 'kvtier[demo]'\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [(["--contexts", "1k"], "--contexts '1k'"), (["--model", "7b"], "unknown model '7b'")],
)
def test_demo_bad_arguments(monkeypatch, capsys, tmp_path, args, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    code, _, err = run(monkeypatch, capsys, "demo", *args, "--plot", str(tmp_path / "p.png"))
    assert code == 2 and err.startswith("kvtier: error: ") and message in err, err


def test_check_backend_runs_the_conformance_suite(monkeypatch, capsys):
    path = list(sys.path)
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
    assert sys.path == path and "core" not in sys.modules, "the suite's own import name only"


def test_console_script_exit_code():
    result = subprocess.run(
        [str(KVTIER), "ls", "s4://bucket"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 2
    assert result.stderr.startswith("kvtier: error: no backend handles URL scheme 's4'")


HELLO_PLUGIN = """
    from typing import Annotated

    import typer

    from kvtier.core import ConfigError, hookimpl
    from kvtier.core.specs import SubcommandSpec

    def hello(
        name: Annotated[str, typer.Option(help="Whom to greet.")] = "world",
        status: Annotated[int, typer.Option(help="Exit status.")] = 0,
    ) -> int:
        "Greet someone."
        if not name:
            raise ConfigError("--name must not be empty")
        print(f"hello {name}")
        return status

    @hookimpl
    def kvtier_subcommands():
        return [SubcommandSpec(name="hello", callback=hello)]
"""


@pytest.fixture
def fresh_registry():
    """The process's plugin registry, built again in this test (to see the fake
    distributions it installs) and forgotten after it."""
    get_registry.cache_clear()
    yield
    get_registry.cache_clear()


def test_plugins_add_subcommands(monkeypatch, capsys, fake_dist, fresh_registry):
    fake_dist("kvtier-hello", {"hello": "hello_plugin"}, {"hello_plugin": HELLO_PLUGIN})

    def kvtier(*args: str) -> tuple[int, str, str]:
        return run(monkeypatch, capsys, *args)

    assert kvtier("hello", "--name", "kv") == (0, "hello kv\n", "")
    assert kvtier("hello", "--status", "3") == (3, "hello world\n", "")
    assert kvtier("hello", "--name", "") == (2, "", "kvtier: error: --name must not be empty\n")
    code, out, _ = kvtier("--help")
    assert code == 0 and "Greet someone." in out and "Copy chunks between stores" in out
    code, out, _ = kvtier("hello", "--help")
    assert code == 0 and "Whom to greet." in out
    code, out, err = kvtier("hello", "--nmae", "x")
    assert code == 2 and err.startswith("kvtier: error: No such option: --nmae")
    code, out, _ = kvtier("plugins")
    assert "subcommand:hello" in out and "kvtier_subcommands" in out


def test_a_plugin_cannot_replace_a_builtin_command(monkeypatch, capsys, fake_dist, fresh_registry):
    source = HELLO_PLUGIN.replace('name="hello"', 'name="ls"')
    fake_dist("kvtier-evil", {"evil": "evil_plugin"}, {"evil_plugin": source})
    code, out, err = run(monkeypatch, capsys, "ls", "cpu://")
    assert code == 2 and out == ""
    assert err.startswith("kvtier: error: plugin 'evil' from kvtier-evil 1.0 gives a subcommand")
    assert "'kvtier ls' is a built-in command" in err and "pip uninstall kvtier-evil" in err


def test_starting_the_cli_imports_neither_transformers_nor_the_demo():
    """The CLI imports every plugin module each time it starts: kvtier demo's stays cheap."""
    heavy = {"transformers", "matplotlib", "kvtier.plugins.transformers.demo"}
    code = (
        "import sys; from kvtier.core.cli import commands; from kvtier.core.plugins import "
        "get_registry; assert 'demo' in commands(get_registry()).commands; "
        f"print(sorted({heavy!r} & set(sys.modules)))"
    )
    result = subprocess.run(
        [sys.executable, "-P", "-c", code], capture_output=True, text=True, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "[]\n", "")
