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

Readers remove what they find malformed (:meth:`PeerIndex.drop_entries`,
:meth:`PeerIndex.drop_record`), each in one script that deletes only if the value is
still the one the reader found, so what an owner wrote since is never removed.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from kvtier.core.blob import MAX_BLOB_BYTES, OVERHEAD
from kvtier.core.errors import BackendError, BackendUnavailableError
from kvtier.core.urls import redact

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

# ARGV = prefix, then (agent, chunk key, value, below) for each entry: delete the entry
# if it still holds value and, where below >= 0, the agent's record generation is not
# at least below. Returns how many were deleted.
_DROP_ENTRIES = """
local prefix, removed = ARGV[1], 0
for i = 2, #ARGV, 4 do
  local chunks = prefix .. 'chunks:' .. ARGV[i]
  if redis.call('HGET', chunks, ARGV[i + 1]) == ARGV[i + 2] then
    local below = tonumber(ARGV[i + 3])
    local gen = tonumber(redis.call('HGET', prefix .. 'agent:' .. ARGV[i], 'gen') or '')
    if below < 0 or not gen or gen < below then
      removed = removed + redis.call('HDEL', chunks, ARGV[i + 1])
    end
  end
end
return removed
"""

# ARGV = prefix, agent, then for gen and md: '1' and the value found, or '0' (missing).
# Deletes the agent's record if it still holds exactly that; returns 1 if it did.
_DROP_RECORD = """
local record = ARGV[1] .. 'agent:' .. ARGV[2]
local found = redis.call('HMGET', record, 'gen', 'md')
for i = 1, 2 do
  local present, value = ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  if (present == '1' and found[i] ~= value) or (present == '0' and found[i]) then
    return 0
  end
end
return redis.call('DEL', record)
"""
_NUMBER = re.compile(r"0|[1-9][0-9]{0,19}")
"""A field of an index entry: a decimal number as :attr:`Location.entry` writes it."""


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

    @property
    def readable(self) -> bool:
        """Whether a peer could read a blob there: an owner publishes no other."""
        return OVERHEAD <= self.nbytes <= MAX_BLOB_BYTES

    @classmethod
    def parse(cls, agent: str, entry: str) -> Location | None:
        """The location an index value names; ``None`` if the value is malformed: not
        as :attr:`entry` writes it, or no blob fits its length."""
        fields = entry.split(":")
        if len(fields) != 3 or not all(_NUMBER.fullmatch(f) for f in fields):
            return None
        gen, address, nbytes = map(int, fields)
        location = cls(agent, gen, address, nbytes)
        return location if location.readable else None


@dataclass(frozen=True)
class Entry:
    """An index entry a reader found malformed: ``agent``'s ``value`` for ``key``, to be
    removed while it holds ``value`` and, if ``below`` >= 0, while the agent's record
    generation is below ``below`` (no metadata the agent published covers it)."""

    agent: str
    key: str
    value: bytes
    below: int = -1

    @classmethod
    def of(cls, key: str, location: Location, *, below: int = -1) -> Entry:
        return cls(location.agent, key, location.entry.encode(), below)


@dataclass(frozen=True)
class Record:
    """An agent's record as the index holds it (``None`` for a missing field)."""

    agent: str
    gen: bytes | None
    md: bytes | None

    @property
    def parsed(self) -> tuple[int, bytes] | None:
        """``(generation, metadata)``; ``None`` if the record is malformed."""
        if self.gen is None or self.md is None or not _NUMBER.fullmatch(self.gen.decode("latin-1")):
            return None
        return int(self.gen), self.md


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
        self._drop_entries = self._client.register_script(_DROP_ENTRIES)
        self._drop_record = self._client.register_script(_DROP_RECORD)

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

    async def locate(self, keys: Sequence[str]) -> tuple[list[Location | None], list[Entry]]:
        """For each key, a live agent other than this one that holds it, or ``None``;
        and the entries found that name no location (malformed)."""
        out: list[Location | None] = []
        malformed: list[Entry] = []
        for start in range(0, len(keys), LOOKUP_BATCH):
            batch = keys[start : start + LOOKUP_BATCH]
            with _translated(self.url, "lookup"):
                found = await self._locate(args=[self.prefix, self.agent, *batch])
            for key, value in zip(batch, found, strict=True):
                location = None
                if value is not None:
                    agent, _, entry = bytes(value).partition(b" ")
                    name = agent.decode("utf-8", "replace")
                    location = Location.parse(name, entry.decode("latin-1"))
                    if location is None:
                        malformed.append(Entry(name, key, entry))
                out.append(location)
        return out, malformed

    async def metadata(self, agents: Sequence[str]) -> dict[str, Record]:
        """The record of each agent that has one."""
        pipe = self._client.pipeline(transaction=False)
        for agent in agents:
            pipe.hmget(self.agent_key(agent), ["gen", "md"])
        with _translated(self.url, "reading agent metadata"):
            records = await pipe.execute()
        return {
            agent: Record(agent, gen, md)
            for agent, (gen, md) in zip(agents, records, strict=True)
            if gen is not None or md is not None
        }

    async def drop_entries(self, entries: Sequence[Entry]) -> int:
        """Delete the malformed ``entries`` that are still as found (see
        :class:`Entry`); how many were deleted."""
        args: list[Any] = [self.prefix]
        for e in entries:
            args += [e.agent, e.key, e.value, e.below]
        with _translated(self.url, "removing malformed entries"):
            return int(await self._drop_entries(args=args))

    async def drop_record(self, record: Record) -> bool:
        """Delete a malformed agent record if it is still as found. The agent, if alive,
        publishes its record and entries again at its next heartbeat."""
        args: list[Any] = [self.prefix, record.agent]
        for value in (record.gen, record.md):
            args += ["0", ""] if value is None else ["1", value]
        with _translated(self.url, "removing a malformed agent record"):
            return bool(await self._drop_record(args=args))

    async def withdraw(self) -> None:
        """Remove this agent's record and entries."""
        pipe = self._client.pipeline(transaction=True)
        pipe.delete(self._record, self._chunks)
        pipe.srem(self._agents, self.agent)
        with _translated(self.url, "withdrawing"):
            await pipe.execute()

    async def close(self) -> None:
        await self._client.aclose()
