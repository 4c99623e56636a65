"""Ages and pins of the ``redis`` tier (a mixin of its backend), both read from the
server's own expiry of each chunk.

Redis keeps no write time. But a tier with a ``ttl`` (and no ``refresh_ttl``) gives
each chunk that ``ttl`` when it is written, and nothing else changes it, so its age is
``ttl - PTTL``, read in one pipelined round trip (for ``kvtier purge --older-than``).
That holds only when every writer uses the same ``ttl``: give the purge the writers'
(``-o ttl=...``). A chunk left with more time than the ``ttl`` shows a writer with a
longer one, and is refused; one without an expiry (pinned, or written without a
``ttl``) has no age and is never purged by age. Without a ``ttl``, or with
``refresh_ttl`` (a read restarts it), the age is unknown and ``ages`` refuses.

A pin is the chunk's expiry removed (``PERSIST``): it never expires, and under a
``volatile-*`` ``maxmemory-policy`` (which evicts only keys with an expiry) it is never
evicted; ``noeviction`` evicts nothing anyway. Under an ``allkeys-*`` policy a pin
could not keep the server from evicting the chunk, so ``pin_many`` refuses. Unpinning
gives the chunk the tier's ``ttl`` again, from now (``PEXPIRE ... NX``: only chunks
without an expiry). Pins live in the server, so any process sees and may undo them;
``pinned_bytes`` bounds what *this* process pins. Pins need a ``ttl`` without
``refresh_ttl`` (the options check it): a hit's ``GETEX`` would give a pinned chunk its
expiry back. Overwriting a pinned chunk (``PutMode.OVERWRITE``) writes it with the
``ttl`` again, i.e. unpins it; ``CREATE`` leaves it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from kvtier.backends.redis import RedisOptions
from kvtier.backends.redis.resp import Reply
from kvtier.backends.redis.transport import Job
from kvtier.core.errors import BackendError, ConfigError

if TYPE_CHECKING:
    from kvtier.core.backend import Backend

    _Base = Backend
else:
    _Base = object

NO_EXPIRY = -1
"""``PTTL`` of a key without an expiry (``-2``: no such key)."""
EVICTS_ANY_KEY = "allkeys-"
"""Prefix of the ``maxmemory-policy`` values that evict keys without an expiry too."""


class RedisPins(_Base):
    """``ages``, ``pin_many`` and ``unpin_many`` of
    :class:`~kvtier.backends.redis.backend.RedisBackend` (see the module doc)."""

    options: RedisOptions
    _ttl_ms: int | None
    _pinned: dict[str, int]
    """Chunks this process pinned -> their sizes (within ``pinned_bytes``)."""

    if TYPE_CHECKING:

        def _name(self, key: str) -> str: ...
        async def _run(self, op: str, jobs: Sequence[Job]) -> list[list[Reply]]: ...
        def _failed(self, reply: Reply, op: str) -> BackendError: ...
        async def _info(self, op: str) -> list[dict[str, Any]]: ...

    async def ages(self, keys: list[str]) -> list[float | None]:
        """Seconds since each chunk was written (``ttl - PTTL``); ``None`` where absent
        or without an expiry. :class:`ConfigError` where the ``ttl`` cannot tell."""
        self._check_open()
        ttl_ms = self._ttl_ms
        if ttl_ms is None or self.options.refresh_ttl:
            why = "it has no ttl" if ttl_ms is None else "refresh_ttl restarts it on every read"
            raise ConfigError(
                f"{self.safe_url}: --older-than needs a store that records when chunks were "
                f"written; Redis keeps no write time and kvtier reads a chunk's age from the "
                f"tier's ttl, but {why}: give the writers' ttl (-o ttl=SECONDS), or select "
                "by --model, --namespace or --tenant"
            )
        if not keys:
            return []
        replies = await self._run("ages", [(n, [("PTTL", n)]) for n in map(self._name, keys)])
        out: list[float | None] = []
        for key, (left,) in zip(keys, replies, strict=True):
            if isinstance(left, Exception):
                raise self._failed(left, "ages")
            if int(left) > ttl_ms:
                raise ConfigError(
                    f"{self.safe_url}: chunk {key} expires in {int(left) / 1000:.0f} s, later "
                    f"than this tier's ttl ({ttl_ms / 1000:g} s) allows: its writers use a "
                    "longer ttl; give theirs (-o ttl=SECONDS) so that ages are right"
                )
            out.append(None if int(left) < 0 else (ttl_ms - int(left)) / 1000)
        return out

    async def pin_many(self, keys: list[str]) -> list[bool]:
        """Remove the expiry of stored chunks while this process's pinned bytes stay
        within ``pinned_bytes``; ``True`` where a chunk is pinned now."""
        self._check_open()
        policies = [str(info.get("maxmemory_policy", "")) for info in await self._info("pin")]
        evicting = [p for p in policies if p.startswith(EVICTS_ANY_KEY)]
        if evicting:
            raise ConfigError(
                f"{self.safe_url}: the server's maxmemory-policy is {evicting[0]}, which "
                "evicts chunks with or without an expiry, so a pin could not keep one; set "
                "a volatile-* policy (e.g. volatile-lru) to pin chunks in this tier"
            )
        sizes = await self._chunk_sizes(keys)
        room = self.options.pinned_bytes - sum(self._pinned.values())
        chosen: list[str] = []
        for key, size in zip(keys, sizes, strict=True):
            if size is None:
                self._pinned.pop(key, None)  # gone
            elif key in self._pinned:
                chosen.append(key)  # again: another process may have unpinned it
            elif size <= room:
                chosen.append(key)
                room -= size
        replies = await self._run(
            "pin", [(n, [("PERSIST", n), ("EXISTS", n)]) for n in map(self._name, chosen)]
        )
        size_of = dict(zip(keys, sizes, strict=True))
        for key, (persist, exists) in zip(chosen, replies, strict=True):
            for reply in (persist, exists):
                if isinstance(reply, Exception):
                    raise self._failed(reply, "pin")
            if exists:
                self._pinned[key] = size_of[key] or 0
        return [key in self._pinned for key in keys]

    async def unpin_many(self, keys: list[str]) -> list[bool]:
        """Give chunks without an expiry the tier's ``ttl`` again, from now; ``True``
        where one had none (was pinned, by any process)."""
        self._check_open()
        ttl_ms = self._ttl_ms
        assert ttl_ms is not None  # pinned_bytes needs a ttl (options)
        names = [self._name(key) for key in keys]
        replies = await self._run("unpin", [(n, [("PEXPIRE", n, ttl_ms, "NX")]) for n in names])
        out = []
        for key, (reply,) in zip(keys, replies, strict=True):
            if isinstance(reply, Exception):
                raise self._failed(reply, "unpin")
            self._pinned.pop(key, None)
            out.append(bool(reply))
        return out

    async def _chunk_sizes(self, keys: Sequence[str]) -> list[int | None]:
        """Each stored chunk's size (``STRLEN``, or a split hash's ``size``); ``None``
        where absent."""
        names = [self._name(key) for key in keys]
        replies = await self._run("pin", [(n, [("TYPE", n), ("STRLEN", n), ("HGET", n, "size")])
                                          for n in names])  # fmt: skip
        sizes: list[int | None] = []
        for kind, strlen, hsize in replies:
            kind = kind.decode() if isinstance(kind, bytes) else str(kind)
            if kind == "string" and isinstance(strlen, int):
                sizes.append(strlen)
            elif kind == "hash" and isinstance(hsize, (bytes, int)):
                sizes.append(int(hsize))
            else:
                sizes.append(None)
        return sizes
