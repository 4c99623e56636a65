"""``kvtier serve``: an HTTP control service over one config's tier chain.

``GET /health`` (per-tier availability, probed), ``GET /metrics`` (Prometheus),
``GET /stats``, ``POST /lookup`` (matched prefix tokens per tier), ``POST /admin/purge``
and ``GET /openapi.json``. With a token every endpoint but ``/health`` needs
``Authorization: Bearer <token>``; admin endpoints always need one (without a token
configured they are refused). Bodies are JSON validated by pydantic models: oversize
-> 413, malformed -> 422 naming the field. No endpoint returns chunk bytes.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from typing import Any

from pydantic import Field, StrictInt, ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvtier.core.blocking import BlockingPool
from kvtier.core.buffers import BufferPool
from kvtier.core.chain import TierChain
from kvtier.core.config import KVTierConfig
from kvtier.core.engine_stats import open_instances
from kvtier.core.errors import ConfigError, KVTierError
from kvtier.core.factory import build_tiers
from kvtier.core.keys import ChunkHasher, namespace_for
from kvtier.core.layout import KVLayout, ModelFingerprint, dtype_from_name
from kvtier.core.plugins import get_registry
from kvtier.core.purge import check_selection, purge
from kvtier.core.selection import ChunkFilter
from kvtier.plugins.ops import admin
from kvtier.plugins.ops.auth import token_matches
from kvtier.plugins.ops.bodies import Body, error

MAX_LOOKUP_TOKENS = 1 << 20
PROBE_KEY = "kvtier-health." + "0" * 32


class LookupRequest(Body):
    """Which leading tokens of a prompt each tier holds, for one model and tenant."""

    model: str = Field(min_length=1, max_length=256)
    tenant: str | None = Field(default=None, min_length=1, max_length=256)
    tokens: list[StrictInt] = Field(max_length=MAX_LOOKUP_TOKENS)


class PurgeRequest(Body):
    """Chunks to delete from every tier (or those named); one selector at least."""

    models: list[str] = Field(default_factory=list, max_length=64)
    namespaces: list[str] = Field(default_factory=list, max_length=64)
    tenants: list[str] = Field(default_factory=list, max_length=64)
    older_than_seconds: float | None = Field(default=None, gt=0)
    tiers: list[str] | None = None
    dry_run: bool = False


def _leading(present: list[bool]) -> int:
    """How many leading entries of ``present`` are true."""
    return next((i for i, ok in enumerate(present) if not ok), len(present))


class BodyTooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes whether or not it declares its length."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise BodyTooLarge
    return bytes(body)


class Service:
    """The app and the tier chain it opens for its lifetime."""

    def __init__(self, config: KVTierConfig, token: str | None) -> None:
        self.config = config
        self.token = token
        self.registry = get_registry(frozenset(config.plugins.disable))
        self.registry.pm.hook.kvtier_configure(config=config)
        pool = BufferPool(max_idle_bytes=0)
        tiers = build_tiers(config, self.registry, pool, emit=self.registry.emit)
        self._codec = BlockingPool("kvtier serve codec", 1, name="kvtier-serve")
        self.chain = TierChain(tiers, self.registry, pool, self.registry.emit, self._codec)
        self.app = Starlette(routes=self._routes(), lifespan=self._lifespan)

    @contextlib.asynccontextmanager
    async def _lifespan(self, app: Starlette) -> AsyncIterator[None]:
        await self.chain.open()
        try:
            yield
        finally:
            await self.chain.close()
            await self._codec.shutdown()

    def _routes(self) -> list[Route]:
        def route(
            path: str,
            call: Callable[..., Awaitable[Response]],
            method: str,
            *,
            admin: bool = False,
            body: type[Body] | None = None,
        ) -> Route:
            async def endpoint(request: Request) -> Response:
                denied = self._denied(request, admin=admin, path=path)
                if denied is not None:
                    return denied
                if body is None:
                    return await call()
                parsed = await self._parse(request, body)
                return parsed if isinstance(parsed, Response) else await call(parsed)

            return Route(path, endpoint, methods=[method])

        cfg = self.config
        quotas = partial(route, "/admin/quotas", admin=True)
        return [
            route("/health", self.health, "GET"),
            route("/metrics", self.metrics, "GET"),
            route("/stats", self.stats, "GET"),
            route("/lookup", self.lookup, "POST", body=LookupRequest),
            route("/admin/purge", self.purge, "POST", admin=True, body=PurgeRequest),
            quotas(partial(admin.quotas, cfg), "GET"),
            quotas(partial(admin.set_quota, cfg), "PUT", body=admin.QuotaRequest),
            quotas(partial(admin.remove_quota, cfg), "DELETE", body=admin.QuotaRemoval),
            route("/admin/pin", admin.pin, "POST", admin=True, body=admin.PinRequest),
            route("/openapi.json", self.openapi, "GET"),
        ]

    def _denied(self, request: Request, *, admin: bool, path: str) -> Response | None:
        if self.token is None:
            if admin:
                return error(403, "admin endpoints are off: start kvtier serve with a token")
            return None
        if path == "/health" and not admin:
            return None
        header = request.headers.get("authorization")
        if header is None:
            return error(401, "missing 'Authorization: Bearer <token>'")
        if not token_matches(header, self.token):
            return error(403, "wrong token")
        return None

    async def _parse(self, request: Request, model: type[Body]) -> Body | Response:
        try:
            raw = await _read_body(request, self.config.ops.serve.max_body_bytes)
        except BodyTooLarge:
            return error(413, f"body larger than {self.config.ops.serve.max_body_bytes} bytes")
        try:
            data = json.loads(raw)
        except ValueError as exc:
            return error(422, f"body is not JSON: {exc}")
        try:
            return model.model_validate(data)
        except ValidationError as exc:
            problems = [
                {"field": ".".join(map(str, e["loc"])) or "(body)", "message": e["msg"]}
                for e in exc.errors(include_input=False, include_url=False)[:20]
            ]
            first = problems[0]
            return error(422, f"field {first['field']!r}: {first['message']}", fields=problems)

    # -- endpoints ------------------------------------------------------------------

    async def health(self) -> Response:
        tiers = []
        for tier in self.chain.tiers:
            probed = await tier.guarded("contains", tier.backend.contains_many, [PROBE_KEY])
            tiers.append(
                {"name": tier.name, "url": tier.stats.url, "available": probed is not None}
            )
        ok = all(t["available"] for t in tiers)
        return JSONResponse(
            {"status": "ok" if ok else "degraded", "tiers": tiers}, status_code=200 if ok else 503
        )

    async def metrics(self) -> Response:
        try:
            from prometheus_client import CONTENT_TYPE_LATEST

            from kvtier.plugins.ops.metrics import scrape
        except ImportError:
            return error(404, "metrics need prometheus-client: pip install 'kvtier[metrics]'")
        return Response(scrape(), media_type=CONTENT_TYPE_LATEST)

    async def stats(self) -> Response:
        tiers = []
        for tier in self.chain.tiers:
            entry: dict[str, Any] = {"name": tier.name, "url": tier.stats.url}
            held = await tier.guarded("stats", tier.backend.stats)
            if held is not None:
                entry.update(
                    keys=held.keys,
                    bytes_used=held.bytes_used,
                    capacity_bytes=held.capacity_bytes,
                    evictions=held.evictions,
                )
            entry["available"] = held is not None
            tiers.append(entry)
        caches = [
            {"model": kv.model, "tenant": kv.config.tenant, **kv.stats().as_dict()}
            for kv in open_instances()
        ]
        return JSONResponse({"tiers": tiers, "caches": caches})

    async def lookup(self, request: LookupRequest) -> Response:
        entry = self.config.ops.serve.models.get(request.model)
        if entry is None:
            known = ", ".join(sorted(self.config.ops.serve.models)) or "none"
            return error(
                404, f"unknown model {request.model!r}; the config's ops.serve.models has: {known}"
            )
        try:
            layout = KVLayout(
                entry.num_layers, entry.num_kv_heads, entry.head_dim, dtype_from_name(entry.dtype)
            )
            fingerprint = ModelFingerprint(
                request.model, layout, entry.tp_rank, entry.tp_size, entry.revision
            )
            hasher = ChunkHasher(
                namespace_for(fingerprint, request.tenant),
                chunk_tokens=self.config.chunk_tokens,
                algorithm=self.config.hash,
                seed=self.config.hash_seed,
            )
            keys = hasher.key_strings(request.tokens)
        except ConfigError as exc:
            return error(422, str(exc))
        step = self.config.chunk_tokens
        matched: dict[str, int | None] = {}
        anywhere = [False] * len(keys)
        for tier in self.chain.tiers:
            present = await tier.guarded("contains", tier.backend.contains_many, keys)
            if present is None:
                matched[tier.name] = None  # unavailable
                continue
            matched[tier.name] = _leading(present) * step
            anywhere = [a or p for a, p in zip(anywhere, present, strict=True)]
        chain = _leading(anywhere) * step
        return JSONResponse(
            {
                "model": request.model,
                "tenant": request.tenant,
                "tokens": len(request.tokens),
                "chunk_tokens": step,
                "matched_tokens": matched,
                "chain_matched_tokens": chain,
            }
        )

    async def purge(self, request: PurgeRequest) -> Response:
        try:
            select = ChunkFilter(
                tuple(request.models), tuple(request.namespaces), tuple(request.tenants)
            )
            check_selection(select, request.older_than_seconds)
        except ConfigError as exc:
            return error(422, str(exc))
        names = [t.name for t in self.chain.tiers]
        unknown = sorted(set(request.tiers or ()) - set(names))
        if unknown:
            return error(404, f"unknown tiers {unknown}; this config has {names}")
        results: dict[str, Any] = {}
        for tier in self.chain.tiers:
            if request.tiers is not None and tier.name not in request.tiers:
                continue
            try:
                report = await purge(
                    tier.backend,
                    select,
                    older_than=request.older_than_seconds,
                    dry_run=request.dry_run,
                )
            except KVTierError as exc:  # e.g. older_than on a tier without write times
                results[tier.name] = {"error": str(exc)}
                continue
            results[tier.name] = {"matched": report.matched, "deleted": report.deleted}
        return JSONResponse({"dry_run": request.dry_run, "tiers": results})

    async def openapi(self) -> Response:
        return JSONResponse(openapi_schema())


def openapi_schema() -> dict[str, Any]:
    """The OpenAPI 3.1 description of the service."""

    def op(summary: str, body: type[Body] | None = None, admin: bool = False) -> dict[str, Any]:
        spec: dict[str, Any] = {"summary": summary, "responses": {"200": {"description": "OK"}}}
        if body is not None:
            spec["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": body.model_json_schema()}},
            }
            spec["responses"].update(
                {
                    "413": {"description": "body too large"},
                    "422": {"description": "invalid body; names the field"},
                }
            )
        if admin:
            spec["security"] = [{"bearer": []}]
            spec["responses"].update(
                {
                    "401": {"description": "no token"},
                    "403": {"description": "wrong token, or no token set"},
                }
            )
        return spec

    return {
        "openapi": "3.1.0",
        "info": {"title": "kvtier serve", "version": "1"},
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
        "paths": {
            "/health": {"get": op("Per-tier availability (probed); 503 when a tier is down.")},
            "/metrics": {"get": op("Prometheus text exposition.")},
            "/stats": {"get": op("Per-tier store stats and the open caches' counters.")},
            "/lookup": {"post": op("Leading tokens each tier holds.", LookupRequest)},
            "/admin/quotas": {
                "get": op(
                    "Per-tenant quotas and the bytes used by this process's caches.", admin=True
                ),
                "put": op("Set a tenant's quota in a tier.", admin.QuotaRequest, admin=True),
                "delete": op("Remove a tenant's quota.", admin.QuotaRemoval, admin=True),
            },
            "/admin/pin": {
                "post": op(
                    "Pin or unpin chunks of this process's caches.", admin.PinRequest, admin=True
                )
            },
            "/admin/purge": {
                "post": op(
                    "Delete a model's, namespace's or tenant's chunks.", PurgeRequest, admin=True
                )
            },
            "/openapi.json": {"get": op("This document.")},
        },
    }
