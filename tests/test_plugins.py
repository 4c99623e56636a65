"""The plugin manager: built-ins, entry points, conflicts, broken plugins, every hook."""

import inspect

import pytest

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
