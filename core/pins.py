"""Pinning: chunks a tier keeps (never evicts nor expires), up to its pinned-bytes
budget.

A tier supports pins when its backend has ``pin_many(keys)`` and ``unpin_many(keys)``
(coroutines answering one bool per key) and a pinned-bytes budget
(``options.pinned_bytes``; a tier without one takes no part). Every built-in tier
has them; what a pin is and guarantees differs per store (docs/operations.md,
"Pinning"): a mark in the process's store (``cpu``, ``nixl``, ``file``), the key's
expiry removed (``redis``), a hard-pinned object (``mooncake``), a keep name
(``vineyard``), a marker object exempting the chunk from kvtier's ``ttl`` (``s3``).
A backend raises :class:`ConfigError` from ``pin_many`` when its store could not keep
a pin. :func:`pin` pins (or unpins) given keys, or every chunk of a namespace (a model
and tenant) that a tier holds now, in every tier that supports it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

from kvtier.core.errors import ConfigError

if TYPE_CHECKING:
    from kvtier.core.chain import TierChain


def check_budget(safe_url: str, pinned_bytes: int, capacity: int) -> None:
    """:class:`ConfigError` unless a bounded tier's ``pinned_bytes`` fits its capacity."""
    if pinned_bytes > capacity:
        raise ConfigError(
            f"tier {safe_url!r}: pinned_bytes ({pinned_bytes}) exceeds the capacity ({capacity})"
        )


async def pin(
    chain: TierChain, keys: Sequence[str] | None, namespace: str, *, unpin: bool = False
) -> dict[str, int]:
    """Pin (or unpin) ``keys`` (``None``: every chunk of ``namespace`` a tier holds) in
    each tier that supports pins; the chunks pinned (unpinned) per tier name. A tier
    that fails is skipped like any tier operation. A tier that refuses to pin (its
    store could not keep a pin, e.g. a Redis server whose eviction policy ignores
    expiries) is a :class:`ConfigError` naming it, raised once the other tiers are done
    (it does not count as an outage of the tier)."""
    done: dict[str, int] = {}
    refused: list[str] = []
    for tier in chain.tiers:
        call = getattr(tier.backend, "unpin_many" if unpin else "pin_many", None)
        if call is None or not getattr(tier.backend.options, "pinned_bytes", 0):
            continue  # cannot pin, or no budget to pin with
        asked = list(keys) if keys is not None else [
            key async for key in tier.backend.iter_keys(f"{namespace}.")
        ]  # fmt: skip
        if not asked:
            done[tier.name] = 0
            continue
        why: list[ConfigError] = []
        result = await tier.guarded("unpin" if unpin else "pin", _noting(call, why), asked)
        if why:
            refused.append(f"tier {tier.name}: {why[0]}")
            continue
        done[tier.name] = sum(result or ())
    if refused:
        raise ConfigError(f"pin refused ({'; '.join(refused)}); other tiers: {done}")
    return done


def _noting(
    call: Callable[[list[str]], Awaitable[list[bool]]], why: list[ConfigError]
) -> Callable[[list[str]], Awaitable[list[bool]]]:
    """``call``, answering ``[]`` and noting its :class:`ConfigError` into ``why``:
    a refusal is no outage of the tier (its guard would count it as one)."""

    async def attempt(keys: list[str]) -> list[bool]:
        try:
            return await call(keys)
        except ConfigError as exc:
            why.append(exc)
            return []

    return attempt
