"""Listing and stats of the ``redis`` tier (a mixin of its backend): SCAN of the tier's
keys on every primary, the blobs' sizes, and the servers' ``INFO``."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Any

from redis.asyncio.cluster import RedisCluster

from kvtier.backends.redis import RedisOptions
from kvtier.backends.redis.client import CLIENT_ERRORS, is_wrongtype, translate
from kvtier.backends.redis.resp import Reply
from kvtier.backends.redis.transport import Job, Transport
from kvtier.core.backend import BackendStats
from kvtier.core.keys import is_valid_key

if TYPE_CHECKING:
    from kvtier.core.backend import Backend

    _Base = Backend
else:
    _Base = object

SCAN_COUNT = 1000
"""Keys one SCAN call looks at."""
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


class RedisListing(_Base):
    """``_iter_keys`` and ``_stats`` of :class:`~kvtier.backends.redis.backend.RedisBackend`,
    and ``_info`` for its pins."""

    options: RedisOptions
    _prefix: str
    _max_value: int
    _counts: dict[str, int]
    _pinned: dict[str, int]

    if TYPE_CHECKING:

        def _connected(self) -> Transport: ...
        async def _run(self, op: str, jobs: Sequence[Job]) -> list[list[Reply]]: ...

    async def _info(self, op: str) -> list[dict[str, Any]]:
        """``INFO memory stats`` of each primary."""
        transport = self._connected()
        try:
            async with transport.slots:
                client: Any = transport.client
                if isinstance(client, RedisCluster):
                    found = await client.info("memory", "stats", target_nodes=client.PRIMARIES)
                    return list(found.values())
                return [await client.info("memory", "stats")]
        except CLIENT_ERRORS as exc:
            raise translate(self.url, exc, op) from exc

    async def _scan(self, match: str) -> AsyncIterator[list[bytes]]:
        """Pages of key names matching ``match``, from every primary of a cluster."""
        transport = self._connected()
        client: Any = transport.client
        nodes: list[Any] = client.get_primaries() if transport.cluster else [None]
        for node in nodes:
            cursor: Any = 0
            while True:
                try:
                    async with transport.slots:
                        if node is None:
                            reply = await client.scan(cursor, match=match, count=SCAN_COUNT)
                        else:
                            reply = await client.scan(
                                cursor, match=match, count=SCAN_COUNT, target_nodes=node
                            )
                    cursor, page = reply
                    if node is not None:
                        cursor = cursor[node.name]
                except CLIENT_ERRORS as exc:
                    raise translate(self.url, exc, "scan") from exc
                yield page
                if cursor == 0:
                    break

    def _match(self, prefix: str) -> str:
        return f"{_glob_escape(self._prefix)}{{{_glob_escape(prefix)}*}}"

    def _key_of(self, name: bytes) -> str | None:
        text = name.decode("utf-8", "replace")
        key = text[len(self._prefix) + 1 : -1]
        return key if is_valid_key(key) else None

    async def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        """Every stored key starting with ``prefix`` (SCAN; a key written or deleted while
        the scan runs may or may not appear)."""
        seen: set[str] = set()
        async for page in self._scan(self._match(prefix)):
            for name in page:
                key = self._key_of(name)
                if key is not None and key not in seen:
                    seen.add(key)
                    yield key

    async def _stats(self) -> BackendStats:
        """Local counters plus a SCAN of this tier's keys (``keys`` and ``bytes_used``:
        O(keys) round trips / 1000) and the server's memory figures."""
        transport = self._connected()
        seen: set[bytes] = set()
        nbytes = 0
        async for page in self._scan(self._match("")):
            fresh = [n for n in page if n not in seen and self._key_of(n) is not None]
            seen.update(fresh)
            nbytes += await self._sizes(fresh)
        infos = await self._info("stats")
        maxmemory = [int(i.get("maxmemory", 0)) for i in infos]
        details: dict[str, Any] = {
            **self._counts,
            "nodes": len(infos),
            "server_used_memory": sum(int(i.get("used_memory", 0)) for i in infos),
            "server_evicted_keys": sum(int(i.get("evicted_keys", 0)) for i in infos),
            "max_value_bytes": self._max_value,
            "data_path": transport.path,
            **({"pinned_bytes": sum(self._pinned.values())} if self.options.pinned_bytes else {}),
        }
        return BackendStats(
            keys=len(seen),
            bytes_used=nbytes,
            capacity_bytes=sum(maxmemory) if all(maxmemory) else None,
            details=details,
        )

    async def _sizes(self, names: Sequence[bytes]) -> int:
        """Total blob bytes of ``names`` (STRLEN, or a split hash's ``size``)."""
        if not names:
            return 0
        texts = [name.decode() for name in names]
        replies = await self._run("stats", [(n, [("STRLEN", n)]) for n in texts])
        split = [n for n, (reply,) in zip(texts, replies, strict=True) if is_wrongtype(reply)]
        sizes = []
        if split:
            sizes = await self._run("stats", [(n, [("HGET", n, "size")]) for n in split])
        total = 0
        for (reply,) in [*replies, *sizes]:
            if isinstance(reply, (int, bytes)):
                total += int(reply)
        return total


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)
