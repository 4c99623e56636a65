"""The plugin manager: built-ins, entry points, conflicts, broken plugins, every hook."""

import ast
import inspect
import re
from pathlib import Path

import pytest

import kvtier.core
from kvtier.core import hookspecs
from kvtier.core.errors import ConfigError, PluginError
from kvtier.core.plugins import BUILTIN_PLUGINS, PluginRegistry

BACKEND_PLUGIN = """
    from pydantic import BaseModel, ConfigDict
    from kvtier.core import hookimpl
    from kvtier.core.specs import BackendSpec, CodecSpec, EvictionPolicySpec
    from kvtier.core.eviction import LRUPolicy

    class Opts(BaseModel):
        model_config = ConfigDict(extra="forbid")
        color: str = "red"

    class FifoPolicy(LRUPolicy):
        def touch(self, key):
            pass

    @hookimpl
    def kvtier_backends():
        return [BackendSpec(name="ramdisk", schemes=("ramdisk",),
                            cls="kvtier.backends.memory:MemoryBackend", options=Opts)]

    @hookimpl
    def kvtier_codecs():
        return [CodecSpec(name="fancy", cls="kvtier.core.codecs:missing")]

    @hookimpl
    def kvtier_eviction_policies():
        return [EvictionPolicySpec(name="fifo", cls=FifoPolicy)]
"""


def test_builtins_are_plugins():
    registry = PluginRegistry(entry_points=False)
    names = {info.name for info in registry.plugins()}
    assert names == set(BUILTIN_PLUGINS)
    assert {"cpu", "file"} <= set(registry.schemes)
    assert {"raw", "int8", "int4", "fp8", "shuffle", "zstd"} <= set(registry.codecs)
    assert {"lru", "lfu"} <= set(registry.eviction_policies)
    assert all(info.distribution == "kvtier" for info in registry.plugins())


def test_entry_point_plugin_is_loaded_and_listed(fake_dist):
    fake_dist(
        "kvtier-ramdisk",
        {"ramdisk": "ramdisk_plugin"},
        {"ramdisk_plugin": BACKEND_PLUGIN},
        version="2.5",
    )
    registry = PluginRegistry()
    assert registry.backend_for_url("ramdisk://x").name == "ramdisk"
    assert "fifo" in registry.eviction_policies
    info = next(i for i in registry.plugins() if i.name == "ramdisk")
    assert (info.distribution, info.version) == ("kvtier-ramdisk", "2.5")
    assert set(info.provides) == {"backend:ramdisk", "codec:fancy", "evictionpolicy:fifo"}
    assert "kvtier_backends" in info.hooks


def test_scheme_conflict_names_both_distributions(fake_dist):
    source = BACKEND_PLUGIN.replace('schemes=("ramdisk",)', 'schemes=("ramdisk", "cpu")')
    fake_dist("kvtier-evil", {"evil": "evil_plugin"}, {"evil_plugin": source})
    with pytest.raises(PluginError) as info:
        PluginRegistry()
    message = str(info.value)
    assert "URL scheme 'cpu'" in message
    assert "from kvtier " in message and "from kvtier-evil 1.0" in message


def test_name_conflict_between_two_third_party_plugins(fake_dist):
    fake_dist("dist-one", {"one": "plugin_one"}, {"plugin_one": BACKEND_PLUGIN})
    fake_dist(
        "dist-two",
        {"two": "plugin_two"},
        {"plugin_two": BACKEND_PLUGIN.replace('schemes=("ramdisk",)', 'schemes=("rd2",)')},
    )
    with pytest.raises(PluginError, match=r"backend name 'ramdisk' is claimed twice") as info:
        PluginRegistry()
    assert "from dist-one 1.0" in str(info.value) and "from dist-two 1.0" in str(info.value)


def test_broken_plugin_is_an_error_with_a_fix_and_can_be_disabled(fake_dist):
    fake_dist(
        "kvtier-broken",
        {"broken": "broken_plugin"},
        {"broken_plugin": "import does_not_exist_anywhere\n"},
    )
    with pytest.raises(PluginError) as info:
        PluginRegistry()
    message = str(info.value)
    assert "kvtier-broken" in message and "ModuleNotFoundError" in message
    assert "pip uninstall kvtier-broken" in message and "disable: [broken]" in message
    assert "broken" not in {i.name for i in PluginRegistry(disabled=["broken"]).plugins()}


def test_plugin_breaking_the_hook_contract(fake_dist):
    fake_dist(
        "kvtier-wrong",
        {"wrong": "wrong_plugin"},
        {
            "wrong_plugin": """
        from kvtier.core import hookimpl
        @hookimpl
        def kvtier_backends():
            return ["not a spec"]
    """
        },
    )
    with pytest.raises(PluginError, match="must return BackendSpec objects"):
        PluginRegistry()


def test_plugin_with_unknown_hook_fails_check_pending(fake_dist):
    fake_dist(
        "kvtier-typo",
        {"typo": "typo_plugin"},
        {
            "typo_plugin": """
        from kvtier.core import hookimpl
        @hookimpl
        def kvtier_backend():
            return []
    """
        },
    )
    with pytest.raises(Exception, match="kvtier_backend"):
        PluginRegistry()


SUBCOMMAND_PLUGIN = """
    from kvtier.core import hookimpl
    from kvtier.core.specs import SubcommandSpec

    def hello() -> None:
        "Greet."

    @hookimpl
    def kvtier_subcommands():
        return [SubcommandSpec(name="hello", callback=hello)]
"""


def test_subcommands_are_collected_and_claimed_once(fake_dist):
    fake_dist("dist-one", {"one": "sub_one"}, {"sub_one": SUBCOMMAND_PLUGIN})
    registry = PluginRegistry()
    assert registry.subcommands["hello"].callback.__doc__ == "Greet."
    info = next(i for i in registry.plugins() if i.name == "one")
    assert info.provides == ("subcommand:hello",) and info.hooks == ("kvtier_subcommands",)
    fake_dist("dist-two", {"two": "sub_two"}, {"sub_two": SUBCOMMAND_PLUGIN})
    with pytest.raises(PluginError, match="subcommand name 'hello' is claimed twice") as raised:
        PluginRegistry()
    assert "from dist-one 1.0" in str(raised.value) and "from dist-two 1.0" in str(raised.value)


def test_the_transformers_plugin_gives_kvtier_demo_through_its_entry_point():
    registry = PluginRegistry()
    info = next(i for i in registry.plugins() if i.name == "transformers")
    assert (info.distribution, info.provides) == ("kvtier", ("subcommand:demo",))
    assert registry.subcommands["demo"].callback.__module__ == "kvtier.plugins.transformers.plugin"
    assert "demo" not in PluginRegistry(entry_points=False).subcommands


def test_builtins_can_be_disabled():
    registry = PluginRegistry(disabled=["file"], entry_points=False)
    with pytest.raises(ConfigError, match="no backend handles URL scheme 'file'"):
        registry.backend_for_url("file:///tmp/x")


def test_unknown_names_suggest_the_closest():
    registry = PluginRegistry(entry_points=False)
    with pytest.raises(ConfigError, match="did you mean 'file'"):
        registry.backend_for_url("fiel:///x")
    with pytest.raises(ConfigError, match="has no scheme"):
        registry.backend_for_url("/var/cache")
    with pytest.raises(ConfigError, match="did you mean 'zstd'"):
        registry.codec("zstdd")
    with pytest.raises(ConfigError, match="did you mean 'lru'"):
        registry.eviction_policy("lru2")


def test_missing_extra_names_the_extra():
    from kvtier.core.errors import MissingExtraError
    from kvtier.core.specs import BackendSpec

    spec = BackendSpec(name="s3", schemes=("s3",), cls="kvtier_no_such_module:S3", extra="s3")
    with pytest.raises(MissingExtraError, match=r"pip install 'kvtier\[s3\]'"):
        spec.load()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (
            "raise ImportError('libfoo.so.2: cannot open shared object file: No such file')",
            r"kvtier\[s3\] is installed but does not load: libfoo\.so\.2: cannot open .*"
            r"install the system library libfoo\.so\.2 \(Debian/Ubuntu: apt-get install libfoo2\)",
        ),
        ("import kvtier_absent_dependency", r"pip install 'kvtier\[s3\]' \(missing module "),
    ],
    ids=["system library", "python module"],
)
def test_a_missing_extra_names_the_real_missing_piece(tmp_path, monkeypatch, body, message):
    from kvtier.core.errors import MissingExtraError
    from kvtier.core.specs import BackendSpec

    (tmp_path / "kvtier_broken_client.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    spec = BackendSpec(name="s3", schemes=("s3",), cls="kvtier_broken_client:S3", extra="s3")
    with pytest.raises(MissingExtraError, match=message):
        spec.load()


def test_every_hook_is_documented_with_an_example():
    hooks = [
        f
        for name, f in inspect.getmembers(hookspecs, inspect.isfunction)
        if name.startswith("kvtier_")
    ]
    assert {h.__name__ for h in hooks} == {
        "kvtier_backends",
        "kvtier_codecs",
        "kvtier_eviction_policies",
        "kvtier_configure",
        "kvtier_tier_event",
        "kvtier_subcommands",
    }
    for hook in hooks:
        assert hook.__doc__ and "Example::" in hook.__doc__, hook.__name__
        signature = inspect.signature(hook)
        assert signature.return_annotation is not inspect.Signature.empty, hook.__name__
        assert all(p.annotation is not p.empty for p in signature.parameters.values())


EXTENSION_PLUGIN = """
    import numpy as np
    from kvtier.core import hookimpl
    from kvtier.core.codec import ByteCodec
    from kvtier.core.errors import ChunkCorruptedError
    from kvtier.core.eviction import LRUPolicy
    from kvtier.core.specs import CodecSpec, EvictionPolicySpec

    class InvertCodec(ByteCodec):
        name = "invert"

        def encode(self, data, itemsize):
            return np.bitwise_not(np.frombuffer(data, np.uint8)).tobytes(), {"v": 1}

        def decode(self, data, params, nbytes):
            if params != {"v": 1} or len(data) != nbytes:
                raise ChunkCorruptedError("invert: bad parameters or size")
            return np.bitwise_not(np.frombuffer(data, np.uint8)).tobytes()

    class FIFOPolicy(LRUPolicy):
        def touch(self, key):
            pass

    @hookimpl
    def kvtier_codecs():
        return [CodecSpec(name="invert", cls=InvertCodec)]

    @hookimpl
    def kvtier_eviction_policies():
        return [EvictionPolicySpec(name="fifo", cls=FIFOPolicy)]
"""


def test_third_party_codec_and_eviction_policy_work_in_a_tier(fake_dist):
    import torch

    from kvtier.core import KVLayout, KVTier
    from kvtier.core.blob import verify

    fake_dist("kvtier-ext", {"ext": "ext_plugin"}, {"ext_plugin": EXTENSION_PLUGIN})
    layout = KVLayout(num_layers=1, num_kv_heads=1, head_dim=64, dtype=torch.float32)
    chunk_bytes = 8 * layout.bytes_per_token()
    tier = {"url": "cpu://", "capacity": 3 * (chunk_bytes + 1024), "codec": "raw+invert",
            "options": {"eviction": "fifo"}}  # fmt: skip
    tokens, kv = torch.arange(32), torch.randn(layout.chunk_shape(32))
    with KVTier.open({"chunk_tokens": 8, "tiers": [tier]}, model="m", layout=layout,
                     registry=PluginRegistry()) as cache:  # fmt: skip
        keys = [str(k) for k in cache.hasher.keys(tokens)]
        backend = cache.chain.tiers[0].backend
        cache.store(tokens[:24], kv[:, :, :24])
        cache.flush()
        n, got = cache.retrieve(tokens[:24])
        assert n == 24 and torch.equal(got, kv[:, :, :24]), "the plugin codec round-trips"
        (blob,) = cache._io.run(backend.get_many([keys[1]]))
        with blob:
            assert [name for name, _ in verify(blob.view).stages] == ["raw", "invert"]
        cache.retrieve(tokens[:8])  # chunk 0 is now the most recently used
        cache.store(tokens, kv)  # only chunk 3 is new: one eviction
        cache.flush()
        present = cache._io.run(backend.contains_many(keys))
        assert present == [False, True, True, True], "fifo evicts the oldest, not the LRU"


MODULE_REF = r"kvtier(\.\w+)+(:\w+)?"
"""A string naming a module, or a class in one, for a dynamic import."""


def _imported_modules(path: Path, package: str) -> list[tuple[int, str]]:
    """Every module that ``path`` (a module of ``package``) names in an import statement,
    anywhere in it (function bodies and ``TYPE_CHECKING`` blocks included), relative
    imports resolved, and every string constant that names a module for a dynamic
    import (``"pkg.mod"`` or ``"pkg.mod:Class"``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = package.split(".")[: len(package.split(".")) + 1 - node.level]
            module = ".".join([*(parts if node.level else []), *filter(None, [node.module])])
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Constant) and re.fullmatch(MODULE_REF, str(node.value)):
            found.append((node.lineno, str(node.value).partition(":")[0]))
    return found


def test_core_never_imports_plugins():
    """kvtier.core is the bottom layer: integrations (kvtier.plugins) build on it, and
    it reaches them only through hooks and entry points, never by importing them."""
    core = Path(kvtier.core.__file__).parent
    offenders = []
    for path in sorted(core.rglob("*.py")):
        parts = path.relative_to(core).with_suffix("").parts
        package = ".".join(["kvtier.core", *parts[:-1]])
        for line, module in _imported_modules(path, package):
            if module == "kvtier.plugins" or module.startswith("kvtier.plugins."):
                offenders.append(f"core/{path.relative_to(core)}:{line} imports {module}")
    assert not offenders, "\n".join(offenders)


def test_the_import_scan_sees_every_kind_of_import(tmp_path):
    """The layering test would catch each way a core module could import a plugin."""
    source = tmp_path / "mod.py"
    source.write_text(
        "from typing import TYPE_CHECKING\n"
        "import kvtier.plugins.vllm\n"
        "if TYPE_CHECKING:\n"
        "    from kvtier.plugins import transformers\n"
        "def f():\n"
        "    from ...plugins.transformers import cache\n"
        "    from ... import plugins\n"
        "    from .. import plugins as core_plugins\n"
        "SPEC = 'kvtier.plugins.transformers.plugin:demo'\n"
    )
    found = {module for _, module in _imported_modules(source, "kvtier.core.testing")}
    assert "kvtier.core.plugins" in found  # core's own plugin manager, not kvtier.plugins
    assert {
        "kvtier.plugins.vllm",
        "kvtier.plugins.transformers",
        "kvtier.plugins.transformers.cache",
        "kvtier.plugins",
        "kvtier.plugins.transformers.plugin",
    } <= found
