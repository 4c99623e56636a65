"""Blobs larger than the server takes in one value: parts of a hash, published at once.

A blob over ``max_value_bytes`` is written as parts of a temp hash
``P{K}:tmp:<hex>`` ({n: parts, size: bytes, p0: ..., p1: ...}, expiring after an
hour should its writer die), then :data:`PUBLISH` renames it onto the chunk key in
one step, so a reader sees the old or the new value, never a mix. The parts and the
script travel in the batch's pipeline: one round trip, ``CREATE`` included.
"""

from __future__ import annotations

import math
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
    buffer from ``pool``; ``None`` if its parts are missing or do not add up."""
    items = iter(fields)
    table = dict(zip(items, items, strict=False))
    try:
        count, size = int(table[b"n"]), int(table[b"size"])
        parts = [table[b"p%d" % i] for i in range(count)]
    except (KeyError, ValueError, TypeError):
        return None
    views = [p.view if isinstance(p, Buffer) else memoryview(p) for p in parts]
    if sum(v.nbytes for v in views) != size or len(table) != count + 2:
        return None
    buf = pool.acquire(size)
    done = 0
    for view in views:
        buf.view[done : done + view.nbytes] = view
        done += view.nbytes
    return buf
