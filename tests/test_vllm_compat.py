"""kvtier's connector against the vLLM installed, hook by hook: every method it
implements is one vLLM's ``KVConnectorBase_V1`` declares (same parameters, same
kind), none is left abstract, every field of vLLM's objects it reads exists, and the
hooks that other vLLM versions ask (docs/vllm.md, "Versions") answer as kvtier
means. Run against another vLLM, a failure names the hook or field that changed."""

from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Any

import needs
import pytest

if not needs.HAS_VLLM:
    needs.missing_vllm()

import vllm
from vllm.config import (
    CacheConfig,
    CompilationConfig,
    KVTransferConfig,
    ModelConfig,
    ParallelConfig,
)
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, supports_hma
from vllm.sampling_params import SamplingParams
from vllm.v1.core.kv_cache_manager import KVCacheBlocks
from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput
from vllm.v1.request import Request

from kvtier.plugins.vllm.connector import KVTierConnector

ASKED_BY_OTHER_VERSIONS = {
    "prefer_cross_layer_blocks",  # vLLMs with cross-layer KV blocks (older ones, 003df29)
    "supports_eagle_prefix_cache_hashing",  # the source read at 003df29
    "supports_lookahead_block_hashes",  # its successor on vLLM's main after 0.32
}
"""Hooks kvtier answers that vLLM 0.32 does not ask."""

KVTIER_OWN = {"scheduler", "worker", "totals"}
"""Public names of the connector that are kvtier's, not vLLM's hooks."""

HOOKS = sorted(n for n in vars(KVTierConnector) if not n.startswith("_") and n not in KVTIER_OWN)


def _kind(cls: type, name: str) -> str:
    attr = inspect.getattr_static(cls, name)
    if isinstance(attr, property):
        return "property"
    if isinstance(attr, classmethod):
        return "classmethod"
    return "method" if callable(attr) else "attribute"


def _parameters(cls: type, name: str) -> list[str]:
    attr = inspect.getattr_static(cls, name)
    if isinstance(attr, property):
        return []
    return list(inspect.signature(getattr(cls, name)).parameters)


def test_the_vllm_installed_is_the_one_asked_for():
    """``.ci/run`` names the vLLM it layers over another's dependencies
    (``KVTEST_VLLM_VERSION``): a wrong layering must not test the other vLLM."""
    wanted = os.environ.get("KVTEST_VLLM_VERSION")
    if wanted is None:
        pytest.skip("KVTEST_VLLM_VERSION is not set: any vLLM is checked")
    assert vllm.__version__ == wanted, f"vLLM {vllm.__version__} from {vllm.__file__}"


@pytest.mark.parametrize("name", HOOKS)
def test_each_hook_is_one_vllm_declares_with_the_same_parameters(name):
    if not hasattr(KVConnectorBase_V1, name):
        assert name in ASKED_BY_OTHER_VERSIONS, (
            f"KVTierConnector.{name} is not a hook of this vLLM's KVConnectorBase_V1: "
            f"vLLM never calls it (renamed or removed?)"
        )
        return
    expected = _kind(KVConnectorBase_V1, name)
    assert _kind(KVTierConnector, name) == expected or (
        name in ASKED_BY_OTHER_VERSIONS and expected == "property"
    ), f"{name}: vLLM declares a {expected}"
    assert _parameters(KVTierConnector, name) == _parameters(KVConnectorBase_V1, name)


def test_no_abstract_hook_is_left_unimplemented():
    assert not KVTierConnector.__abstractmethods__


def test_every_field_the_connector_reads_exists():
    reads: dict[type, set[str]] = {
        KVTransferConfig: {
            "kv_role",
            "kv_connector_extra_config",
            "kv_load_failure_policy",
            "engine_id",
        },
        ParallelConfig: {
            "tensor_parallel_size",
            "pipeline_parallel_size",
            "decode_context_parallel_size",
            "prefill_context_parallel_size",
            "data_parallel_rank",
        },
        CacheConfig: {"block_size"},
        ModelConfig: {"model", "revision"},
        CompilationConfig: {"static_forward_context"},
        KVCacheConfig: {"kv_cache_groups"},
        KVCacheGroupSpec: {"kv_cache_spec", "layer_names"},
        FullAttentionSpec: {"num_kv_heads", "head_size", "head_size_v", "dtype"},
        SchedulerOutput: {"num_scheduled_tokens", "scheduled_new_reqs", "scheduled_cached_reqs"},
        NewRequestData: {"req_id", "block_ids", "num_computed_tokens"},
        CachedRequestData: {"req_ids", "new_block_ids", "resumed_req_ids", "num_computed_tokens"},
        KVConnectorOutput: {"invalid_block_ids", "finished_recving", "kv_cache_events"},
    }
    missing = {
        cls.__name__: sorted(names - {f.name for f in dataclasses.fields(cls)})
        for cls, names in reads.items()
    }
    assert not {name: fields for name, fields in missing.items() if fields}
    assert callable(KVCacheBlocks.get_block_ids)


def test_every_request_attribute_the_connector_reads_exists():
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=1), None, cache_salt="t")
    for name in (
        "request_id",
        "all_token_ids",
        "prompt_token_ids",
        "prompt_embeds",
        "kv_transfer_params",
        "cache_salt",
        "lora_request",
        "mm_features",
    ):
        assert hasattr(request, name), name


def _bare_connector(worker: Any = None) -> KVTierConnector:
    """A connector with no vLLM config: enough for hooks that read no engine state."""
    connector = KVTierConnector.__new__(KVTierConnector)
    connector._worker = worker
    return connector


def test_kvtier_declines_what_its_cache_keys_and_kernels_cannot_honour():
    connector = _bare_connector()
    assert connector.prefer_cross_layer_blocks is False  # one cache per layer
    assert connector.supports_eagle_prefix_cache_hashing is False
    assert connector.supports_lookahead_block_hashes is False
    assert connector.requires_kv_delivery is False  # saves are copied inside the step
    assert not supports_hma(KVTierConnector)  # one KV cache group: vLLM turns HMA off


class _Worker:
    """The worker side's completion reports, as the connector takes them."""

    def take_received(self) -> set[str]:
        return {"loaded"}

    def take_load_errors(self) -> set[int]:
        return {7}


def test_async_loads_complete_through_whichever_call_vllm_makes():
    """vLLM 0.32 collects completions with ``get_transfer_results``, whose default
    wraps ``get_finished``; the source read at 003df29 calls ``get_finished``."""
    connector = _bare_connector(_Worker())
    if hasattr(KVConnectorBase_V1, "get_transfer_results"):
        results = connector.get_transfer_results({"done"})
        assert results.finished_recving == {"loaded"}
        assert not results.finished_sending and not results.failed_recving
    else:
        assert connector.get_finished({"done"}) == (None, {"loaded"})
    assert connector.get_block_ids_with_load_errors() == {7}
