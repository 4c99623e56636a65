"""Per-tenant byte quotas in a tier: each tenant with a quota has its own LRU.

The tier chain keeps one :class:`TenantLedger` per tier that has quotas. Before a
write it asks :meth:`TenantLedger.admit` which of the tenant's own least recently used
chunks to delete so that the new ones fit the tenant's quota (a chunk larger than the
whole quota is refused and counted). A tenant thus never grows past its quota, and
while the quotas add up to no more than the tier's capacity, one tenant's stores never
make the tier evict another tenant's chunks. Tenants without a quota share the tier's
own eviction policy as before.

The ledger counts the chunks this process wrote or read while the quota was in force
(since the cache opened, for a quota in the config; chunks already in a shared tier,
or written by other processes, are not counted until this process reads them).
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

from kvtier.core.config import KVTierConfig
from kvtier.core.errors import ConfigError
from kvtier.core.keys import tenant_tag
from kvtier.core.specs import EventKind, TierEvent

if TYPE_CHECKING:
    from kvtier.core.chain import TierChain
    from kvtier.core.tier import Tier

_TENANT_RE = re.compile(r"-[0-9a-f]{16}-(t[0-9a-f]{12})\.[0-9a-f]+\Z")


def tenant_of(key: str) -> str | None:
    """The tenant tag in a chunk key (``t`` + 12 hex digits), ``None`` for no tenant."""
    match = _TENANT_RE.search(key)
    return match[1] if match else None


class TenantLedger:
    """Bytes each quota'd tenant holds in one tier, in its own LRU order."""

    def __init__(self, quotas: Mapping[str, int]) -> None:
        self.quotas = dict(quotas)
        """Tenant tag -> bytes."""
        self._chunks: dict[str, OrderedDict[str, int]] = {tag: OrderedDict() for tag in quotas}
        self._used = dict.fromkeys(quotas, 0)
        self.over_quota = 0
        """Chunks refused: larger than their tenant's whole quota."""
        self.quota_evictions = 0
        """Chunks deleted to keep their tenant within its quota."""

    def used(self, tag: str) -> int:
        return self._used.get(tag, 0)

    def set_quota(self, tag: str, nbytes: int | None) -> list[str]:
        """Give tenant ``tag`` a quota of ``nbytes`` (``None``: none any more); returns
        the tenant's least recently used chunks to delete so that it fits."""
        if nbytes is None:
            self.quotas.pop(tag, None)
            self._chunks.pop(tag, None)
            self._used.pop(tag, None)
            return []
        self.quotas[tag] = nbytes
        chunks = self._chunks.setdefault(tag, OrderedDict())
        self._used.setdefault(tag, 0)
        victims = []
        while self._used[tag] > nbytes:
            victim, size = chunks.popitem(last=False)
            self._used[tag] -= size
            victims.append(victim)
        self.quota_evictions += len(victims)
        return victims

    def admit(self, items: Sequence[tuple[str, int]]) -> tuple[list[bool], list[str]]:
        """Which of ``(key, nbytes)`` may be written, and the chunks to delete first (the
        tenants' own least recently used). The admitted keys count as held from now on;
        :meth:`settle` forgets those the write did not store."""
        admitted: list[bool] = []
        victims: list[str] = []
        for key, nbytes in items:
            tag = tenant_of(key)
            if tag not in self.quotas:
                admitted.append(True)
                continue
            assert tag is not None
            chunks = self._chunks[tag]
            if key in chunks:
                chunks.move_to_end(key)
                admitted.append(True)
                continue
            if nbytes > self.quotas[tag]:
                self.over_quota += 1
                admitted.append(False)
                continue
            while self._used[tag] + nbytes > self.quotas[tag]:
                victim, size = chunks.popitem(last=False)
                self._used[tag] -= size
                victims.append(victim)
            chunks[key] = nbytes
            self._used[tag] += nbytes
            admitted.append(True)
        self.quota_evictions += len(victims)
        return admitted, victims

    def settle(self, keys: Sequence[str], stored: Sequence[bool]) -> None:
        """Forget the admitted keys a write did not store (unless held before)."""
        self.forget([key for key, ok in zip(keys, stored, strict=True) if not ok])

    def touch(self, keys: Sequence[str], sizes: Sequence[int]) -> None:
        """Chunks were read: most recently used now (and held, if not known yet)."""
        for key, nbytes in zip(keys, sizes, strict=True):
            tag = tenant_of(key)
            if tag not in self.quotas:
                continue
            assert tag is not None
            chunks = self._chunks[tag]
            if key not in chunks:
                chunks[key] = nbytes
                self._used[tag] += nbytes
            chunks.move_to_end(key)

    def forget(self, keys: Sequence[str]) -> None:
        """Chunks left the tier (evicted, deleted, corrupt, not stored)."""
        for key in keys:
            tag = tenant_of(key)
            if tag in self.quotas:
                assert tag is not None
                size = self._chunks[tag].pop(key, None)
                if size is not None:
                    self._used[tag] -= size


def ledgers(config: KVTierConfig) -> dict[str, TenantLedger]:
    """A ledger for each tier that ``config.ops.tiers`` gives quotas; :class:`ConfigError`
    for a tier name the chain lacks, or quotas adding up to more than its capacity."""
    tiers = {str(t.name): t for t in config.tiers}
    out: dict[str, TenantLedger] = {}
    for name, limits in config.ops.tiers.items():
        if name not in tiers:
            raise ConfigError(
                f"ops.tiers names tier {name!r}, but the chain's tiers are {sorted(tiers)}"
            )
        if not limits.quotas:
            continue
        capacity = tiers[name].capacity
        total = sum(limits.quotas.values())
        if capacity is not None and total > capacity:
            raise ConfigError(
                f"ops.tiers.{name}.quotas add up to {total} bytes, more than the tier's "
                f"capacity ({capacity}); then one tenant could evict another's chunks"
            )
        out[name] = TenantLedger({tenant_tag(t): size for t, size in limits.quotas.items()})
    return out


async def quota_for(chain: TierChain, tier_name: str, tenant: str, nbytes: int | None) -> int:
    """Set (``None``: remove) ``tenant``'s quota in ``chain``'s tier ``tier_name`` and
    delete its chunks beyond it; how many were deleted. On the chain's I/O loop."""
    tier = next((t for t in chain.tiers if t.name == tier_name), None)
    if tier is None:
        raise ConfigError(
            f"no tier {tier_name!r} in this cache; its tiers are {[t.name for t in chain.tiers]}"
        )
    ledger = chain.quotas.setdefault(tier_name, TenantLedger({}))
    victims = ledger.set_quota(tenant_tag(tenant), nbytes)
    await evict(tier, victims, chain.emit)
    return len(victims)


async def evict(tier: Tier, victims: list[str], emit: Callable[[TierEvent], None]) -> None:
    """Delete ``victims`` from ``tier`` to keep their tenants within their quotas,
    counted and reported as evictions."""
    if victims:
        await tier.guarded("delete", tier.backend.delete_many, victims, count=len(victims))
        tier.stats.evictions += len(victims)
        emit(TierEvent(EventKind.EVICTED, tier.name, len(victims), keys=tuple(victims),
                       detail="tenant quota"))  # fmt: skip
