"""The peer index of the ``nixl`` tier: which agent holds which chunk, in Redis/Valkey.

Keys under ``kvtier:nixl:<group>:``::

    agents          SET of agent names (readers drop names whose record is gone)
    agent:<name>    HASH {gen, md}: the agent's NIXL metadata and its generation
    chunks:<name>   HASH chunk key -> "<gen>:<address>:<nbytes>"

Both per-agent keys expire ``ttl`` seconds after the owner's last heartbeat, so the
entries of a process that died vanish on their own and nothing is left without a TTL.
An entry's ``gen`` is the metadata generation that first covered its memory: a reader
whose copy of the owner's metadata is older reloads it. Lookups run as one Lua script
(one round trip per batch); it reads keys it is not given, so the index must be a
single Redis/Valkey server or a replicated one, not Redis Cluster.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvtier.backends.nixl import redact
from kvtier.core.errors import BackendError, BackendUnavailableError

IO_TIMEOUT_S = 2.0
"""Seconds to connect to the index or wait for one reply."""
LOOKUP_BATCH = 1000
"""Keys per lookup script call (Lua's unpack has a stack limit)."""

_LOCATE = """
local prefix, me = ARGV[1], ARGV[2]
local n = #ARGV - 2
local out, left = {}, n
for i = 1, n do out[i] = false end
for _, agent in ipairs(redis.call('SMEMBERS', prefix .. 'agents')) do
  if left == 0 then break end
  if agent ~= me then
    if redis.call('EXISTS', prefix .. 'agent:' .. agent) == 0 then
      redis.call('SREM', prefix .. 'agents', agent)
    else
      local found = redis.call('HMGET', prefix .. 'chunks:' .. agent, unpack(ARGV, 3))
      for i = 1, n do
        if not out[i] and found[i] then
          out[i] = agent .. ' ' .. found[i]
          left = left - 1
        end
      end
    end
  end
end
return out
"""


@dataclass(frozen=True)
class Location:
    """Where a peer agent holds a chunk: ``nbytes`` at ``address`` in its memory,
    covered by its metadata from generation ``gen`` on."""

    agent: str
    gen: int
    address: int
    nbytes: int

    @property
    def entry(self) -> str:
        """The index value of this location (the agent is the hash's name)."""
        return f"{self.gen}:{self.address}:{self.nbytes}"

    @classmethod
    def parse(cls, agent: str, entry: str) -> Location | None:
        """The location an index value names; ``None`` if the value is malformed."""
        fields = entry.split(":")
        if len(fields) != 3 or not all(f.isdigit() for f in fields):
            return None
        gen, address, nbytes = map(int, fields)
        return cls(agent, gen, address, nbytes)


@contextlib.contextmanager
def _translated(url: str, action: str) -> Iterator[None]:
    """Turn client errors into kvtier's: unreachable -> unavailable, else a backend error."""
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, OSError) as exc:
        raise BackendUnavailableError(f"nixl index {url} unreachable ({action}): {exc}") from exc
    except RedisError as exc:
        raise BackendError(f"nixl index {url}: {action} failed: {exc}") from exc


class PeerIndex:
    """One agent's view of a group's index. Bound to the event loop that first uses it."""

    def __init__(self, url: str, group: str, agent: str, ttl: float) -> None:
        self.url = redact(url)
        self.agent = agent
        self.ttl_ms = int(ttl * 1000)
        self.prefix = f"kvtier:nixl:{group}:"
        self._agents = self.prefix + "agents"
        self._record = self.agent_key(agent)
        self._chunks = self.chunks_key(agent)
        self._client = aioredis.Redis.from_url(
            url,
            socket_timeout=IO_TIMEOUT_S,
            socket_connect_timeout=IO_TIMEOUT_S,
            retry=Retry(NoBackoff(), 1),  # one retry on a fresh connection after a restart
            decode_responses=False,
        )
        self._locate = self._client.register_script(_LOCATE)

    def agent_key(self, agent: str) -> str:
        """The key of ``agent``'s record (metadata and generation)."""
        return f"{self.prefix}agent:{agent}"

    def chunks_key(self, agent: str) -> str:
        """The key of the hash of ``agent``'s chunk entries."""
        return f"{self.prefix}chunks:{agent}"

    async def ping(self) -> None:
        with _translated(self.url, "ping"):
            await self._client.ping()

    async def publish(
        self,
        sets: Mapping[str, str],
        deletes: Sequence[str],
        metadata: tuple[int, bytes] | None,
        *,
        full: bool,
    ) -> bool:
        """Apply entry changes atomically and renew the TTLs.

        ``full`` replaces every entry of this agent with ``sets``; ``metadata``
        (generation, bytes) replaces its record. Returns ``False`` when the record is
        missing afterwards (the index lost it): the caller must publish in full again.
        """
        pipe = self._client.pipeline(transaction=True)
        if full:
            pipe.delete(self._chunks)
        if metadata is not None:
            gen, md = metadata
            pipe.hset(self._record, mapping={"gen": gen, "md": md})
        if sets:
            entries: dict[Any, Any] = dict(sets)  # redis-py's mapping type is invariant
            pipe.hset(self._chunks, mapping=entries)
        if deletes:
            pipe.hdel(self._chunks, *deletes)
        pipe.pexpire(self._record, self.ttl_ms)
        pipe.pexpire(self._chunks, self.ttl_ms)
        pipe.sadd(self._agents, self.agent)
        with _translated(self.url, "publishing entries"):
            results = await pipe.execute()
        return bool(results[-3])

    async def heartbeat(self) -> bool:
        """Renew this agent's TTLs; ``False`` when its record is missing."""
        pipe = self._client.pipeline(transaction=False)
        pipe.pexpire(self._record, self.ttl_ms)
        pipe.pexpire(self._chunks, self.ttl_ms)
        pipe.sadd(self._agents, self.agent)
        with _translated(self.url, "heartbeat"):
            alive, _, _ = await pipe.execute()
        return bool(alive)

    async def locate(self, keys: Sequence[str]) -> list[Location | None]:
        """For each key, a live agent other than this one that holds it, or ``None``."""
        out: list[Location | None] = []
        for start in range(0, len(keys), LOOKUP_BATCH):
            batch = keys[start : start + LOOKUP_BATCH]
            with _translated(self.url, "lookup"):
                found = await self._locate(args=[self.prefix, self.agent, *batch])
            for value in found:
                if value is None:
                    out.append(None)
                    continue
                agent, _, entry = bytes(value).decode("ascii", "replace").partition(" ")
                out.append(Location.parse(agent, entry))
        return out

    async def metadata(self, agents: Sequence[str]) -> dict[str, tuple[int, bytes]]:
        """``(generation, metadata)`` of each agent whose record exists."""
        pipe = self._client.pipeline(transaction=False)
        for agent in agents:
            pipe.hmget(self.agent_key(agent), ["gen", "md"])
        with _translated(self.url, "reading agent metadata"):
            records = await pipe.execute()
        out = {}
        for agent, (gen, md) in zip(agents, records, strict=True):
            if gen is not None and md is not None and gen.isdigit():
                out[agent] = (int(gen), bytes(md))
        return out

    async def withdraw(self) -> None:
        """Remove this agent's record and entries."""
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self._record, self._chunks)
        pipe.srem(self._agents, self.agent)
        with _translated(self.url, "withdrawing"):
            await pipe.execute()

    async def close(self) -> None:
        await self._client.aclose()
