"""Tests of the conformance suite itself: coverage of built-ins, teeth, and the live plugin."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from kvtier.core.plugins import BUILTIN_PLUGINS
from kvtier.core.testing.plugin import parse_option

pytest_plugins = ["pytester"]

TESTS = Path(__file__).parent
SCHEME_RE = re.compile(r"^([a-z][a-z0-9+.-]*)://")
PLUGIN = ("-p", "kvtier.core.testing.plugin")

# Backends with one deliberate bug each, and the conformance test that must catch it.
BROKEN_BACKENDS = """
from kvtier.backends.memory import MemoryBackend, MemoryOptions
from kvtier.core.backend import PutMode
from kvtier.core.errors import ConfigError
from kvtier.core.testing import BackendConformance


class WrongBytes(MemoryBackend):
    async def get_many(self, keys):
        out = []
        for buf in await super().get_many(keys):
            if buf is not None and buf.nbytes:
                copy = self.pool.copy_of(buf.view)
                copy.view[-1] ^= 1
                buf.release()
                buf = copy
            out.append(buf)
        return out


class RaisesOnMiss(MemoryBackend):
    async def get_many(self, keys):
        out = await super().get_many(keys)
        if any(buf is None for buf in out):
            raise KeyError("miss")
        return out


class Unordered(MemoryBackend):
    async def get_many(self, keys):
        return await super().get_many(sorted(keys))


class NoRetainOnGet(MemoryBackend):
    async def get_many(self, keys):
        out = await super().get_many(keys)
        for buf in out:
            if buf is not None:
                buf.release()
        return out


class CreateOverwrites(MemoryBackend):
    async def put_many(self, items, mode=PutMode.OVERWRITE):
        return await super().put_many(items, PutMode.OVERWRITE)


class SilentEviction(MemoryBackend):
    def _evicted(self, items):
        pass


class NeverCloses(MemoryBackend):
    async def close(self):
        pass


class SwallowsBadKeys(MemoryBackend):
    async def contains_many(self, keys):
        try:
            return await super().contains_many(keys)
        except ConfigError:
            return [False] * len(keys)


class MemorySuite(BackendConformance):
    url = "cpu://meta"
    capacity = 16 << 20
    backend_cls = MemoryBackend

    def create_backend(self, url, *, capacity, options, pool):
        return self.backend_cls(url, MemoryOptions(**options), capacity=capacity, pool=pool)


class TestReference(MemorySuite):
    pass
"""
CATCHES = {
    "WrongBytes": "test_round_trip",
    "RaisesOnMiss": "test_miss_is_not_an_error",
    "Unordered": "test_batch_results_in_input_order",
    "NoRetainOnGet": "test_returned_buffers_belong_to_caller",
    "CreateOverwrites": "test_create_keeps_existing_value",
    "SilentEviction": "test_eviction_keeps_within_capacity",
    "NeverCloses": "test_closed_backend_is_unavailable",
    "SwallowsBadKeys": "test_invalid_key_rejected",
}


@pytest.fixture(autouse=True)
def only_kvtier_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inner pytest runs load no installed plugin but kvtier's (passed as ``PLUGIN``)."""
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture
def broken_suite(pytester: pytest.Pytester) -> Path:
    """A test module with a conformance class per broken backend (``TestWrongBytes``...)."""
    classes = "".join(
        f"\n\nclass Test{name}(MemorySuite):\n    backend_cls = {name}\n" for name in CATCHES
    )
    return pytester.makepyfile(test_broken=BROKEN_BACKENDS + classes)


def _conformance_classes(tree: ast.Module) -> list[ast.ClassDef]:
    """Classes deriving, directly or through classes of the same module, from the suite."""
    found: dict[str, ast.ClassDef] = {}
    classes = [node for node in ast.walk(tree) if isinstance(node, ast.ClassDef)]
    changed = True
    while changed:
        changed = False
        for node in classes:
            bases = {ast.unparse(base).rsplit(".", 1)[-1] for base in node.bases}
            if node.name not in found and bases & {"BackendConformance", *found}:
                found[node.name] = node
                changed = True
    return list(found.values())


def _schemes(node: ast.ClassDef) -> set[str]:
    """URL schemes of the string literals (f-strings included) in a class body."""
    return {
        match[1]
        for sub in ast.walk(node)
        if isinstance(sub, ast.Constant)
        and isinstance(sub.value, str)
        and (match := SCHEME_RE.match(sub.value))
    }


def test_every_builtin_backend_has_a_conformance_subclass() -> None:
    """Each built-in backend is covered by a ``BackendConformance`` subclass in tests/:
    one in ``tests/test_<module>_backend.py``, or one whose body names its URL scheme."""
    by_file = {
        path.name: _conformance_classes(ast.parse(path.read_text()))
        for path in sorted(TESTS.glob("test_*.py"))
    }
    schemes = {s for classes in by_file.values() for node in classes for s in _schemes(node)}
    missing = []
    for plugin, module_name in BUILTIN_PLUGINS.items():
        hook = getattr(importlib.import_module(module_name), "kvtier_backends", None)
        for spec in hook() if hook is not None else ():
            files = {
                f"test_{module_name.rsplit('.', 1)[-1]}_backend.py",
                f"test_{spec.name}_backend.py",
            }
            if not (set(spec.schemes) & schemes or any(by_file.get(f) for f in files)):
                missing.append(
                    f"{spec.name} ({module_name}, plugin {plugin!r}): add "
                    f"'class Test...(BackendConformance)' to tests/{min(files)}"
                )
    assert not missing, "built-in backends without a conformance suite:\n" + "\n".join(missing)


def test_suite_passes_a_correct_backend(pytester: pytest.Pytester, broken_suite: Path) -> None:
    result = pytester.inline_run(
        f"{broken_suite.name}::TestReference", *PLUGIN, "--strict-markers", "-m", "not slow"
    )
    passed, _, failed = result.listoutcomes()
    assert not failed, [report.nodeid for report in failed]
    assert len(passed) >= 30


@pytest.mark.parametrize(("backend", "test"), CATCHES.items(), ids=list(CATCHES))
def test_suite_fails_a_broken_backend(
    pytester: pytest.Pytester, broken_suite: Path, backend: str, test: str
) -> None:
    result = pytester.inline_run(f"{broken_suite.name}::Test{backend}", *PLUGIN, "-k", test)
    _, _, failed = result.listoutcomes()
    assert failed, f"{test} passed against {backend}, a backend built to fail it"
    assert all(f"::{test}" in report.nodeid for report in failed), [r.nodeid for r in failed]


def test_live_suite_skips_without_url(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(*PLUGIN, "--pyargs", "kvtier.core.testing.live", "-rs")
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped", 0) >= 30 and not {"passed", "failed", "errors"} & set(outcomes)
    result.stdout.fnmatch_lines(["*no live backend given: pass --kvtier-backend-url URL*"])


def test_live_suite_runs_against_url(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        *PLUGIN, "--pyargs", "kvtier.core.testing.live", "--strict-markers",
        "--kvtier-backend-url=cpu://live", "--kvtier-backend-capacity=32MiB",
        "--kvtier-backend-option=eviction=lfu", "-m", "not slow",
    )  # fmt: skip
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed", 0) >= 30 and "failed" not in outcomes, outcomes


def test_live_options_are_validated(pytester: pytest.Pytester) -> None:
    result = pytester.runpytest(
        *PLUGIN, "--pyargs", "kvtier.core.testing.live", "--kvtier-backend-url=cpu://",
        "--kvtier-backend-capacity=64 parsecs",
    )  # fmt: skip
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(["*--kvtier-backend-capacity*"])


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("eviction=lfu", ("eviction", "lfu")), ("fsync=true", ("fsync", True)),
     ("n=8", ("n", 8)), ("path=/a=b", ("path", "/a=b")), ("empty=", ("empty", None))],
)  # fmt: skip
def test_parse_option(text: str, parsed: tuple[str, object]) -> None:
    assert parse_option(text) == parsed


@pytest.mark.parametrize("text", ["eviction", "=lfu", "x=[1"])
def test_parse_option_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="--kvtier-backend-option"):
        parse_option(text)
