"""``KVTierConnector``: kvtier as a vLLM v1 KV connector (vLLM 0.32).

vLLM builds one instance per role: the scheduler's asks kvtier how much of each
prompt it holds and plans every step's loads and saves (:mod:`.scheduler`); each
worker's copies the KV between the paged cache and kvtier (:mod:`.worker`). This
module only translates between vLLM's objects and those two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

try:
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (
        KVConnectorBase_V1,
        KVConnectorMetadata,
        KVConnectorRole,
    )
    from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
    from vllm.v1.kv_cache_interface import FullAttentionSpec, MLAAttentionSpec
except ImportError as exc:  # pragma: no cover - depends on the environment
    from kvtier.core.errors import MissingExtraError

    raise MissingExtraError("kvtier's vLLM connector", "vllm") from exc

import torch

from kvtier.core.engine import KVTier
from kvtier.core.errors import ConfigError
from kvtier.core.keys import ExtraKeys
from kvtier.core.layout import KVLayout
from kvtier.plugins.events.vllm import SchedulerEvents, worker_events
from kvtier.plugins.vllm import shared
from kvtier.plugins.vllm.logs import route_to_vllm
from kvtier.plugins.vllm.lookup import LocalLookups, Lookups, Pending, tier_limits
from kvtier.plugins.vllm.metadata import StepPlan
from kvtier.plugins.vllm.prom import KVTierPromMetrics
from kvtier.plugins.vllm.roles import Handoff, role_for
from kvtier.plugins.vllm.rpc import LookupServer, RemoteLookups, lookup_address
from kvtier.plugins.vllm.scheduler import Scheduled, SchedulerSide, check_chunk_size
from kvtier.plugins.vllm.settings import load_settings
from kvtier.plugins.vllm.worker import WorkerSide

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

log = logging.getLogger(__name__)


class KVTierConnectorMetadata(KVConnectorMetadata):  # type: ignore[misc]
    """One step's :class:`StepPlan`, from the scheduler side to the workers."""

    def __init__(self, plan: StepPlan) -> None:
        self.plan = plan


class KVTierConnectorStats(KVConnectorStats):  # type: ignore[misc]
    """The workers' counters (:data:`kvtier.plugins.vllm.worker.COUNTERS`), summed."""

    def reset(self) -> None:
        self.data: dict[str, Any] = {}

    def aggregate(self, other: KVConnectorStats) -> KVTierConnectorStats:
        for name, value in other.data.items():
            self.data[name] = self.data.get(name, 0) + value
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


class KVTierConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """Load with ``--kv-transfer-config '{"kv_connector": "KVTierConnector",
    "kv_connector_module_path": "kvtier.plugins.vllm", "kv_role": "kv_both",
    "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"config":
    "kvtier.yaml"}}'``; see :mod:`kvtier.plugins.vllm.settings` for the extra keys."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        route_to_vllm()
        settings = load_settings(self._kv_transfer_config.kv_connector_extra_config)
        self.kv_role = role_for(
            self._kv_transfer_config.kv_role, settings.config.store_partial_chunks
        )
        parallel = vllm_config.parallel_config
        _check_parallelism(parallel)
        self.layer_names, layout = _kv_layout(kv_cache_config)
        block_size = vllm_config.cache_config.block_size
        check_chunk_size(settings.config.chunk_tokens, block_size)
        model = settings.model or _model_id(vllm_config)
        tp_size = parallel.tensor_parallel_size
        tp_rank = 0
        if role == KVConnectorRole.WORKER:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            tp_rank = get_tensor_model_parallel_rank()
        if self._kv_transfer_config.kv_load_failure_policy != "recompute":
            log.warning(
                "kvtier: kv_load_failure_policy is %r: a chunk evicted or corrupted between "
                "lookup and load fails its request; set it to 'recompute'",
                self._kv_transfer_config.kv_load_failure_policy,
            )
        self.settings = settings
        self.engine = _engine_tag(vllm_config)
        """This engine's name for its lookup servers (engine id and data parallel rank)."""
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.kvtier: KVTier | None = None
        """The worker's tier chain (``.stats()`` for counters); ``None`` on the scheduler
        side, which opens no tier and asks the workers (:mod:`.lookup`)."""
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        self._server: LookupServer | None = None
        self._lookups: Lookups | None = None
        self._events = SchedulerEvents(workers=tp_size)
        """The workers' KV events until vLLM publishes them (``take_events``)."""
        self._handoff = Handoff(settings.lookup.handoff_wait)
        """Requests waiting for the chunks their prefill instance announced."""
        if role == KVConnectorRole.SCHEDULER:
            budget = settings.lookup
            self._scheduler = SchedulerSide(
                _Deferred(self._connect_lookups),
                chunk_tokens=settings.config.chunk_tokens,
                block_size=block_size,
                wait=budget.wait,
                give_up=budget.give_up,
                load_async=settings.load_async,
                role=self.kv_role,
            )
        else:
            self.kvtier = shared.acquire(
                self.kv_role.kvtier_config(settings.config),
                model=model,
                layout=layout,
                tp_rank=tp_rank,
                tp_size=tp_size,
            )
            self._worker = WorkerSide(
                self.kvtier, self.layer_names, layerwise=settings.layerwise_loads
            )
            limits = tier_limits(self.kvtier, settings.lookup.local, settings.lookup.remote)
            shared.add_worker(self.engine, tp_rank, self.kvtier)
            self._server = LookupServer(self.kvtier, lookup_address(self.engine, tp_rank), limits)
        self._closed = False

    def _connect_lookups(self) -> Lookups:
        """Where the scheduler side's lookups go (decided at the first lookup, when the
        workers are up): the workers' ``KVTier`` if they all run in this process, else
        their lookup servers."""
        if self._lookups is None:
            local = shared.workers(self.engine)
            budget = self.settings.lookup
            if len(local) == self.tp_size == 1:
                kv = local[0]
                self._lookups = LocalLookups(kv, tier_limits(kv, budget.local, budget.remote))
                log.info("kvtier: lookups go to the worker's tier chain in this process")
            else:
                addresses = [lookup_address(self.engine, r) for r in range(self.tp_size)]
                self._lookups = RemoteLookups(addresses)
                log.info("kvtier: lookups go to the workers' lookup servers %s", addresses)
        return self._lookups

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a cache: a dropped save is a later miss, never a lost request

    @classmethod
    def requires_piecewise_for_cudagraph(cls, extra_config: dict[str, Any]) -> bool:
        return True  # wait_for_layer_load / save_kv_layer run between layers

    # Asked by vLLM versions other than 0.32 (docs/vllm.md, "Versions"); answered
    # here so that kvtier's answer never follows a changed default.

    @property
    def prefer_cross_layer_blocks(self) -> bool:
        return False  # the kernels read one cache per layer (register_kv_caches)

    @property
    def supports_eagle_prefix_cache_hashing(self) -> bool:
        return False  # a chunk's key never includes the token after the chunk

    supports_lookahead_block_hashes = supports_eagle_prefix_cache_hashing

    @property
    def totals(self) -> dict[str, int]:
        """The worker's counters since start (empty on the scheduler side)."""
        return dict(self._worker.totals) if self._worker else {}

    # -- scheduler side ---------------------------------------------------------------

    @property
    def scheduler(self) -> SchedulerSide:
        assert self._scheduler is not None, "a scheduler-side method ran on a worker"
        return self._scheduler

    def get_num_new_matched_tokens(
        self, request: Request, num_computed_tokens: int
    ) -> tuple[int | None, bool]:
        if not _cacheable(request) or not self.kv_role.loads:
            return 0, False
        tokens = request.all_token_ids
        n = self.scheduler.match(
            request.request_id, tokens, _extra_keys(request), num_computed_tokens
        )
        loadable = self.kv_role.loadable(len(tokens), self.settings.config.chunk_tokens)
        params = request.kv_transfer_params
        if n is not None and not self._handoff.ready(
            request.request_id, params, num_computed_tokens + n, loadable
        ):
            return None, False  # a hand-off whose chunks are on their way: ask again
        return n, bool(n) and self.scheduler.is_async(request.request_id)

    def get_external_cache_hit_sources(
        self, request: Request, num_external_tokens: int
    ) -> dict[Any, int]:
        """vLLM's per-source split of a hit (its cache-hit metrics): tokens from the
        workers' ``cpu`` tier are host memory, the rest come from tiers outside the
        worker process (file, redis, s3, ...), reported as external."""
        from vllm.v1.metrics.cache_hit_source import CacheHitSource

        host, other = self.scheduler.hit_sources(request.request_id, num_external_tokens)
        split = {CacheHitSource.HOST: host, CacheHitSource.EXTERNAL_UNSPECIFIED: other}
        return {source: n for source, n in split.items() if n}

    def update_state_after_alloc(
        self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int
    ) -> None:
        if not _cacheable(request):
            return
        self.scheduler.allocated(
            request.request_id,
            request.all_token_ids,
            _extra_keys(request),
            blocks.get_block_ids()[0],
            num_external_tokens,
        )

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVTierConnectorMetadata:
        counts = scheduler_output.num_scheduled_tokens
        scheduled = [
            Scheduled(r.req_id, r.block_ids[0], True, r.num_computed_tokens, counts[r.req_id])
            for r in scheduler_output.scheduled_new_reqs
        ]
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            new = cached.new_block_ids[i]
            scheduled.append(
                Scheduled(
                    req_id,
                    new[0] if new is not None else [],
                    new is not None and req_id in cached.resumed_req_ids,
                    cached.num_computed_tokens[i],
                    counts.get(req_id, 0),
                )
            )
        return KVTierConnectorMetadata(self.scheduler.build(scheduled))

    def update_connector_output(self, connector_output: KVConnectorOutput) -> None:
        if connector_output.invalid_block_ids:
            self.scheduler.load_failed(set(connector_output.invalid_block_ids))
        self.scheduler.step_done(connector_output.finished_recving or ())
        self._events.update(connector_output)

    def take_events(self) -> list[Any]:
        return self._events.take()

    def request_finished(
        self, request: Request, block_ids: list[int]
    ) -> tuple[bool, dict[str, Any] | None]:
        stored = self.scheduler.stored(request.request_id)
        self.scheduler.finished(request.request_id)
        self._handoff.forget(request.request_id)
        # Saves copied the blocks during the step: none is held. A producer tells the
        # decode instance what it stored (see :mod:`.roles`).
        return False, self.kv_role.finished_params(stored)

    # -- worker side ------------------------------------------------------------------

    @property
    def worker(self) -> WorkerSide:
        assert self._worker is not None, "a worker-side method ran on the scheduler"
        return self._worker

    def _plan(self) -> StepPlan:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVTierConnectorMetadata)
        return meta.plan

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        context = self._vllm_config.compilation_config.static_forward_context
        backends = {context[name].attn_backend.get_name() for name in self.layer_names}
        if len(backends) != 1:
            raise ConfigError(f"kvtier needs one attention backend for all layers, got {backends}")
        self.worker.register(kv_caches, backends.pop())

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        self.worker.start_load(self._plan())

    def wait_for_layer_load(self, layer_name: str) -> None:
        self.worker.wait_layer(layer_name)

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        self.worker.save_layer(layer_name, self._plan())

    def wait_for_save(self) -> None:
        self.worker.finish_step(self._plan())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        return None, self.worker.take_received() or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self.worker.take_load_errors()

    def get_kv_connector_kv_cache_events(self) -> Any:
        return worker_events(self.kvtier) if self.kvtier is not None else None

    def get_kv_connector_stats(self) -> KVTierConnectorStats | None:
        data = self._worker.take_stats() if self._worker else None
        return KVTierConnectorStats(data=data) if data else None

    @classmethod
    def build_prom_metrics(
        cls,
        vllm_config: VllmConfig,
        metric_types: dict[type, type],
        labelnames: list[str],
        per_engine_labelvalues: dict[int, list[object]],
    ) -> KVTierPromMetrics:
        """The counters in vLLM's ``/metrics`` (:mod:`.prom`)."""
        return KVTierPromMetrics(vllm_config, metric_types, labelnames, per_engine_labelvalues)

    @classmethod
    def build_kv_connector_stats(
        cls, data: dict[str, Any] | None = None
    ) -> KVTierConnectorStats | None:
        return KVTierConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        """Stop the lookup server and the worker's load thread; flush queued saves and
        close kvtier."""
        if self._closed:
            return
        self._closed = True
        if self._lookups is not None:
            self._lookups.close()
        if self._server is not None:
            self._server.close()
            shared.remove_worker(self.engine, self.tp_rank)
        if self._worker is not None:
            self._worker.close()
        if self.kvtier is not None:
            shared.release(self.kvtier)


def _check_parallelism(parallel: Any) -> None:
    for name in (
        "pipeline_parallel_size",
        "decode_context_parallel_size",
        "prefill_context_parallel_size",
    ):
        if getattr(parallel, name, 1) != 1:
            raise ConfigError(
                f"kvtier's vLLM connector supports tensor parallelism only; {name} is "
                f"{getattr(parallel, name)}"
            )


def _kv_layout(kv_cache_config: KVCacheConfig) -> tuple[list[str], KVLayout]:
    """The attention layers and kvtier's layout of their KV, from vLLM's cache config."""
    groups = kv_cache_config.kv_cache_groups
    spec = groups[0].kv_cache_spec if len(groups) == 1 else None
    if (
        spec is None
        or not isinstance(spec, FullAttentionSpec)
        or isinstance(spec, MLAAttentionSpec)
        or spec.head_size_v != spec.head_size
    ):
        kinds = [type(g.kv_cache_spec).__name__ for g in groups]
        raise ConfigError(
            f"kvtier's vLLM connector supports models whose layers all use full "
            f"attention with equal key and value sizes; this model's KV cache groups are "
            f"{kinds}"
        )
    layers = list(groups[0].layer_names)
    layout = KVLayout(
        num_layers=len(layers),
        num_kv_heads=spec.num_kv_heads,
        head_dim=spec.head_size,
        dtype=spec.dtype,
    )
    return layers, layout


class _Deferred:
    """Lookups whose target is chosen at the first lookup."""

    def __init__(self, connect: Callable[[], Lookups]) -> None:
        self.connect = connect

    def submit(
        self, tokens: Sequence[int], extra_keys: tuple[ExtraKeys, ...], held: int = 0
    ) -> Pending:
        return self.connect().submit(tokens, extra_keys, held)

    def close(self) -> None:
        pass


def _engine_tag(vllm_config: VllmConfig) -> str:
    """The engine's id (shared by its scheduler and its workers: they get one config),
    with the data parallel rank, so that engines of one deployment differ."""
    engine_id = vllm_config.kv_transfer_config.engine_id
    dp_rank = getattr(vllm_config.parallel_config, "data_parallel_rank", 0)
    return f"{engine_id}-dp{dp_rank}"


def _model_id(vllm_config: VllmConfig) -> str:
    model = vllm_config.model_config
    return f"{model.model}@{model.revision}" if model.revision else str(model.model)


def _cacheable(request: Request) -> bool:
    """Requests whose KV is a function of their token ids (not of prompt embeddings)."""
    return request.prompt_embeds is None and bool(request.prompt_token_ids)


def _extra_keys(request: Request) -> tuple[ExtraKeys, ...]:
    """What besides the tokens determines the KV: mixed into the first chunk's key, so
    tenants (``cache_salt``), LoRA adapters and multimodal inputs never share chunks."""
    lora = request.lora_request
    parts = (
        ("cache_salt", request.cache_salt),
        ("lora", lora.lora_name if lora is not None else None),
        ("mm", tuple(f.identifier for f in request.mm_features)),
    )
    extra = tuple((name, value) for name, value in parts if value)
    return (extra,) if extra else ()
