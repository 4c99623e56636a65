"""Admin endpoints of ``kvtier serve`` for quotas and pins (purge is in the service).

Quotas are the config's ``ops.tiers.<tier>.quotas``; a change applies to the service's
config (for caches opened later) and at once to every open ``KVTier`` of the process
that serves (a cache embedded with the service). Pins act on those caches too: a
process that only serves has no cache of its own, and caches in other processes (vLLM
workers) take their quotas from their config file.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import Field, StrictInt
from starlette.responses import JSONResponse, Response

from kvtier.core.config import ByteSize, KVTierConfig
from kvtier.core.engine_stats import open_instances
from kvtier.core.errors import ConfigError
from kvtier.core.keys import tenant_tag
from kvtier.core.opsconfig import TierLimits
from kvtier.plugins.ops.bodies import Body, error

Name = Field(min_length=1, max_length=256)


class QuotaRequest(Body):
    """Give a tenant a byte quota in a tier (``"2GiB"`` or an integer)."""

    tier: str = Name
    tenant: str = Name
    quota: ByteSize = Field(gt=0)


class QuotaRemoval(Body):
    """Remove a tenant's quota in a tier."""

    tier: str = Name
    tenant: str = Name


class PinRequest(Body):
    """Pin (or unpin) a prompt's chunks, or all of a model's and tenant's (no tokens)."""

    model: str = Name
    tenant: str | None = Field(default=None, min_length=1, max_length=256)
    tokens: list[StrictInt] | None = Field(default=None, max_length=1 << 20)
    unpin: bool = False


def _tier_error(config: KVTierConfig, tier: str) -> Response | None:
    names = [str(t.name) for t in config.tiers]
    return None if tier in names else error(404, f"unknown tier {tier!r}; tiers: {names}")


async def quotas(config: KVTierConfig) -> Response:
    """Every quota, with the bytes the process's open caches hold under it."""
    out: dict[str, Any] = {}
    for tier, limits in config.ops.tiers.items():
        out[tier] = {}
        for tenant, quota in limits.quotas.items():
            used = sum(
                kv.chain.quotas[tier].used(tenant_tag(tenant))
                for kv in open_instances()
                if tier in kv.chain.quotas
            )
            out[tier][tenant] = {"quota_bytes": quota, "used_bytes": used}
    return JSONResponse({"tiers": out})


async def set_quota(config: KVTierConfig, body: QuotaRequest) -> Response:
    denied = _tier_error(config, body.tier)
    if denied is not None:
        return denied
    limits = config.ops.tiers.setdefault(body.tier, TierLimits())
    capacity = next(t.capacity for t in config.tiers if t.name == body.tier)
    total = sum({**limits.quotas, body.tenant: body.quota}.values())
    if capacity is not None and total > capacity:
        return error(
            422,
            f"quotas of tier {body.tier!r} would add up to {total} bytes, "
            f"more than its capacity ({capacity})",
        )
    limits.quotas[body.tenant] = body.quota
    deleted = await _each_cache(body.tier, body.tenant, body.quota)
    return JSONResponse(
        {
            "tier": body.tier,
            "tenant": body.tenant,
            "quota_bytes": body.quota,
            "deleted_chunks": deleted,
        }
    )


async def remove_quota(config: KVTierConfig, body: QuotaRemoval) -> Response:
    denied = _tier_error(config, body.tier)
    if denied is not None:
        return denied
    limits = config.ops.tiers.get(body.tier)
    if limits is None or body.tenant not in limits.quotas:
        known = sorted(limits.quotas) if limits else []
        return error(
            404,
            f"tenant {body.tenant!r} has no quota in tier {body.tier!r}; "
            f"tenants with one there: {known}",
        )
    del limits.quotas[body.tenant]
    await _each_cache(body.tier, body.tenant, None)
    return JSONResponse({"tier": body.tier, "tenant": body.tenant, "quota_bytes": None})


async def _each_cache(tier: str, tenant: str, quota: int | None) -> int:
    """Apply a quota to every open cache of the process with that tier; chunks deleted."""
    deleted = 0
    for kv in open_instances():
        if any(t.name == tier for t in kv.chain.tiers):
            deleted += await asyncio.to_thread(kv.set_quota, tier, tenant, quota)
    return deleted


async def pin(body: PinRequest) -> Response:
    caches = [
        kv for kv in open_instances() if kv.model == body.model and kv.config.tenant == body.tenant
    ]
    if not caches:
        return error(
            404,
            f"no open cache of model {body.model!r} for tenant {body.tenant!r} "
            "in this process (pins act on the caches of the process that serves)",
        )
    done: dict[str, int] = {}
    for kv in caches:
        try:
            counts = await asyncio.to_thread(kv.pin, body.tokens, unpin=body.unpin)
        except ConfigError as exc:  # a tier refused: its store could not keep a pin
            return error(409, str(exc))
        for tier, count in counts.items():
            done[tier] = done.get(tier, 0) + count
    return JSONResponse({"unpinned" if body.unpin else "pinned": done})
