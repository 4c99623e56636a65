"""Blobs larger than the server takes in one value: parts of a hash, published at once.

A blob over ``max_value_bytes`` is written as parts of a temp hash
``P{K}:tmp:<hex>`` ({n: parts, size: bytes, p0: ..., p1: ...}, expiring after an
hour should its writer die), then :data:`PUBLISH` renames it onto the chunk key in
one step, so a reader sees the old or the new value, never a mix. The parts and the
script travel in the batch's pipeline: one round trip, ``CREATE`` included.

So a hash under a chunk key is always whole: one whose fields do not add up (a part
evicted, or a forged value) is malformed, never a write in progress, and
:data:`DISCARD` removes it, as it removes a value of a type kvtier never writes.
"""

from __future__ import annotations

import math
import re
import secrets

from kvtier.backends.redis.resp import Command, Reply
from kvtier.core.backend import PutMode
from kvtier.core.buffers import Buffer, BufferPool

TEMP_TTL_MS = 3_600_000
"""Lifetime of a temp hash, should its writer die before publishing it."""

# KEYS = temp hash, chunk key; ARGV = mode, ttl in ms (0: none), expected field count.
# Returns 1 stored, 0 refused (CREATE and the key exists), -1 the temp hash is
# incomplete (a part was evicted or never written).
PUBLISH = """
if redis.call('HLEN', KEYS[1]) ~= tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
  return -1
end
if ARGV[1] == 'create' and redis.call('EXISTS', KEYS[2]) == 1 then
  redis.call('DEL', KEYS[1])
  return 0
end
redis.call('RENAME', KEYS[1], KEYS[2])
if tonumber(ARGV[2]) > 0 then
  redis.call('PEXPIRE', KEYS[2], ARGV[2])
else
  redis.call('PERSIST', KEYS[2])
end
return 1
"""
STORED, REFUSED, INCOMPLETE = 1, 0, -1
"""What :data:`PUBLISH` returns."""

# KEYS = chunk key. Deletes the value if it is malformed, checked in one atomic step
# (so a value a writer put in place meanwhile is never taken for the one a reader
# found): neither a string nor a hash, or a hash that is not {n, size, p0..p<n-1>}
# with n >= 1 and parts adding up to size (the rules of :func:`assemble`). Returns 1
# if it deleted the value, else 0. The loop is bounded by the hash's field count.
DISCARD = """
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind == 'string' or kind == 'none' then return 0 end
if kind == 'hash' then
  local n, size = unpack(redis.call('HMGET', KEYS[1], 'n', 'size'))
  if n and size and #n <= 15 and #size <= 15 and n:match('^%d+$') and size:match('^%d+$') then
    local count = tonumber(n)
    if count >= 1 and redis.call('HLEN', KEYS[1]) == count + 2 then
      local total = 0
      for i = 0, count - 1 do
        if redis.call('HEXISTS', KEYS[1], 'p' .. i) == 0 then
          total = -1
          break
        end
        total = total + redis.call('HSTRLEN', KEYS[1], 'p' .. i)
      end
      if total == tonumber(size) then return 0 end
    end
  end
end
redis.call('DEL', KEYS[1])
return 1
"""
_COUNT = re.compile(rb"[0-9]{1,15}")


def write_job(name: str, buf: Buffer, part_bytes: int, mode: PutMode, ttl_ms: int) -> list[Command]:
    """The commands that write ``buf`` as parts of at most ``part_bytes`` under
    ``name`` (``ttl_ms`` 0: no expiry); the last one is :data:`PUBLISH`, and the
    temp key is the second argument of each."""
    temp = f"{name}:tmp:{secrets.token_hex(8)}"
    count = max(1, math.ceil(buf.nbytes / part_bytes))
    job: list[Command] = [
        ("HSET", temp, "n", count, "size", buf.nbytes),
        ("PEXPIRE", temp, TEMP_TTL_MS),
    ]
    for i in range(count):
        job.append(("HSET", temp, f"p{i}", buf.view[i * part_bytes : (i + 1) * part_bytes]))
    job.append(("EVAL", PUBLISH, 2, temp, name, mode.value, ttl_ms, count + 2))
    return job


def assemble(fields: list[Reply], pool: BufferPool) -> Buffer | None:
    """The blob a split hash holds (HGETALL's field, value, ... list), copied into one
    buffer from ``pool``; ``None`` if it is malformed (by the rules of
    :data:`DISCARD`): fields missing, extra or not adding up."""
    items = iter(fields)
    table = dict(zip(items, items, strict=False))
    count, size = _number(table.get(b"n")), _number(table.get(b"size"))
    if count is None or size is None or count < 1 or len(table) != count + 2:
        return None
    try:
        parts = [table[b"p%d" % i] for i in range(count)]
    except KeyError:
        return None
    views = [p.view if isinstance(p, Buffer) else memoryview(p) for p in parts]
    if sum(v.nbytes for v in views) != size:
        return None
    buf = pool.acquire(size)
    done = 0
    for view in views:
        buf.view[done : done + view.nbytes] = view
        done += view.nbytes
    return buf


def _number(value: Reply) -> int | None:
    """``n`` or ``size`` of a split hash, if it is a number :data:`DISCARD` accepts."""
    if isinstance(value, bytes) and _COUNT.fullmatch(value):
        return int(value)
    return None
