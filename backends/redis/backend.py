"""The ``redis`` tier on redis-py's asyncio client (standalone, Unix socket, TLS, cluster).

Storage layout (``P`` is ``key_prefix``, ``K`` a chunk key)::

    P{K}              the blob as one string, written by one SET: never two keys that
                      could disagree
    P{K}              or, for a blob larger than ``max_value_bytes``, one hash
                      {n: parts, size: bytes, p0: ..., p1: ...} moved into place by one
                      RENAME (:mod:`~kvtier.backends.redis.split`)
    P{K}:tmp:<hex>    a split blob being written; it expires after an hour if its writer
                      dies, and is never listed or read

The braces make ``K`` the cluster hash tag, so a chunk's temp key shares its slot.

Malformed values are misses and are removed: a chunk key holding a type kvtier never
writes (a list, a set...), or a hash whose parts do not add up (a part evicted, a
forged value). This is safe against writers: a value under a chunk key is only ever
put in place whole (one SET, or one RENAME of a complete temp hash), so no writer is
ever half way there, and a temp hash being assembled is never read. The reader's
verdict is checked again, and the value deleted, in one atomic script
(:data:`~kvtier.backends.redis.split.DISCARD`), so a value a writer put in place
since the read is never deleted. Removal is best effort (a failure is logged; the read
stays a miss) and counted as ``malformed_removed`` in ``stats().details``.

Every batch is one round trip (:mod:`~kvtier.backends.redis.transport`): a write,
``CREATE`` (SET NX) included, pipelines each blob's SET, or its parts and the script
that publishes them; a read pipelines GETs (``read_into_many``: GETRANGE and EXISTS of
each range), and only split blobs take a second trip.

Errors: an unreachable server, a timeout or a cluster without a live node is
:class:`BackendUnavailableError`; wrong credentials at ``open()`` are
:class:`ConfigError`; a write the server refuses because it is out of memory is a
``False`` result counted as ``rejected_oom``; anything else is :class:`BackendError`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis.exceptions as rex

from kvtier.backends.redis import RedisOptions
from kvtier.backends.redis.client import (
    CLIENT_ERRORS,
    DEFAULT_MAX_VALUE,
    check_options,
    check_server,
    is_wrongtype,
    make_client,
    open_error,
    server_max_value,
    translate,
)
from kvtier.backends.redis.listing import RedisListing
from kvtier.backends.redis.pins import RedisPins
from kvtier.backends.redis.resp import Command, Reply, release_all
from kvtier.backends.redis.split import DISCARD, INCOMPLETE, STORED, assemble, write_job
from kvtier.backends.redis.transport import Job, Transport, fast_path_works
from kvtier.backends.redis.url import parse_url
from kvtier.core.backend import Backend, Capabilities, PutMode, Read, copy_range
from kvtier.core.buffers import Buffer
from kvtier.core.errors import BackendError, BackendUnavailableError

log = logging.getLogger(__name__)


class RedisBackend(RedisPins, RedisListing, Backend):
    """A tier in a Redis or Valkey server or cluster; see the module doc for the layout.

    Shared by any number of processes; persistent as far as the server is. Not bounded
    by kvtier (a tier ``capacity`` is ignored): the server's ``maxmemory`` and
    ``maxmemory-policy`` decide what is evicted, and a write refused for memory is a
    ``False`` result. One instance serves one event loop.
    """

    capabilities = Capabilities(persistent=True, shared=True, bounded=False, listing=True,
                                create_mode=True, ranged_reads=True)  # fmt: skip
    options: RedisOptions
    options_model = RedisOptions

    def _configure(self) -> None:
        self.target = parse_url(self.url)
        check_options(self.url, self.target, self.options)
        self._prefix = self.options.key_prefix
        ttl = self.options.ttl
        self._ttl_ms = None if ttl is None else max(1, round(ttl * 1000))
        self._pinned: dict[str, int] = {}
        self._transport: Transport | None = None
        self._max_value = self.options.max_value_bytes or DEFAULT_MAX_VALUE
        self._counts = dict.fromkeys(
            (
                "hits",
                "misses",
                "rejected_oom",
                "rejected_incomplete",
                "split_writes",
                "malformed_removed",
            ),
            0,
        )

    # -- connecting -------------------------------------------------------------------

    async def _open(self) -> None:
        """Connect and check the server: its mode must match the URL's scheme, and the
        credentials must be accepted (:class:`ConfigError` otherwise)."""
        if self._transport is not None:
            return
        client = make_client(self.target, self.options)
        try:
            await check_server(self.url, self.target, client)
            if self.options.max_value_bytes is None:
                self._max_value = await server_max_value(client)
        except BaseException as exc:
            await client.aclose()
            if isinstance(exc, CLIENT_ERRORS):
                raise open_error(self.url, exc) from exc
            raise
        o = self.options
        self._transport = Transport(
            client,
            self.pool,
            parallel=o.parallel,
            max_connections=o.max_connections,
            retries=o.retries,
            stall_after=o.socket_timeout,
            fast=fast_path_works(),
        )

    async def _close(self) -> None:
        transport, self._transport = self._transport, None
        if transport is not None:
            await transport.aclose()

    def _connected(self) -> Transport:
        if self._transport is None:
            raise BackendUnavailableError(f"{self.safe_url}: not connected; call open()")
        return self._transport

    async def _run(self, op: str, jobs: Sequence[Job]) -> list[list[Reply]]:
        try:
            return await self._connected().run(jobs)
        except CLIENT_ERRORS as exc:
            raise translate(self.url, exc, op) from exc

    def _failed(self, reply: Reply, op: str) -> BackendError:
        if isinstance(reply, rex.NoPermissionError):
            return BackendError(
                f"{self.safe_url}: {op} denied by the server's ACL ({reply}); grant the "
                f"user the command and the key pattern {self._prefix}*"
            )
        return translate(self.url, reply, op)

    def _name(self, key: str) -> str:
        return f"{self._prefix}{{{key}}}"

    # -- reads ------------------------------------------------------------------------

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        names = [self._name(key) for key in keys]
        ttl = self._ttl_ms if self.options.refresh_ttl else None
        jobs: list[Job]
        if ttl is None:
            jobs = [(name, [("GET", name)]) for name in names]
        else:
            jobs = [(name, [("GETEX", name, "PX", ttl)]) for name in names]
        replies = await self._run("get", jobs)
        out: list[Buffer | None] = []
        split: list[int] = []
        try:
            for i, (reply,) in enumerate(replies):
                if isinstance(reply, Buffer):
                    out.append(reply)
                elif isinstance(reply, bytes):
                    out.append(self.pool.copy_of(reply))
                elif is_wrongtype(reply):
                    out.append(None)
                    split.append(i)
                elif isinstance(reply, Exception):
                    raise self._failed(reply, "get")
                else:
                    out.append(None)
            if split:
                blobs = await self._split_blobs([names[i] for i in split])
                for i, blob in zip(split, blobs, strict=True):
                    out[i] = blob
        except BaseException:
            release_all(replies[len(out) :])
            release_all(out)
            raise
        hits = sum(blob is not None for blob in out)
        self._counts["hits"] += hits
        self._counts["misses"] += len(out) - hits
        return out

    async def _read_into(self, reads: list[Read]) -> list[int | None]:
        """One round trip: each read's EXISTS and GETRANGE (which answers ``""`` for a
        missing key too), copied into ``out``. A split blob (a hash: WRONGTYPE) is read
        whole in a second trip and its ranges copied out."""
        ttl = self._ttl_ms if self.options.refresh_ttl else None
        jobs: list[Job] = []
        for key, offset, out in reads:
            name = self._name(key)
            job: list[Command] = [("EXISTS", name)]
            if out.nbytes:  # GETRANGE of an empty range would be the whole value (end -1)
                job.append(("GETRANGE", name, offset, offset + out.nbytes - 1))
            if ttl is not None:
                job.append(("PEXPIRE", name, ttl))
            jobs.append((name, job))
        replies = await self._run("get", jobs)
        counts: list[int | None] = []
        split: dict[str, list[int]] = {}  # name -> the reads of its split blob
        try:
            for i, ((key, _, out), (exists, *got)) in enumerate(zip(reads, replies, strict=True)):
                part = got[0] if out.nbytes else b""
                if is_wrongtype(part):
                    split.setdefault(self._name(key), []).append(i)
                    part = b""
                for reply in (exists, part):
                    if isinstance(reply, Exception):
                        raise self._failed(reply, "get")
                counts.append(copy_range(part, 0, out) or (0 if exists else None))
        finally:
            release_all(replies)
        if split:
            blobs = await self._split_blobs(list(split))
            try:
                for blob, indexes in zip(blobs, split.values(), strict=True):
                    for i in indexes:
                        key, offset, out = reads[i]
                        counts[i] = copy_range(blob, offset, out)
            finally:
                release_all(blobs)
        return counts

    async def _split_blobs(self, names: Sequence[str]) -> list[Buffer | None]:
        """:meth:`_get_split`, and those found malformed discarded."""
        blobs = await self._get_split(names)
        malformed = [name for name, blob in zip(names, blobs, strict=True) if blob is None]
        if malformed:
            try:
                await self._discard(malformed)
            except BaseException:
                release_all(blobs)
                raise
        return blobs

    async def _get_split(self, names: Sequence[str]) -> list[Buffer | None]:
        """The blobs of the split hashes ``names``; ``None`` for a value that is no
        split blob (of another type, or malformed) or is gone."""
        ttl = self._ttl_ms if self.options.refresh_ttl else None
        jobs: list[Job] = []
        for name in names:
            job: list[Command] = [("HGETALL", name)]
            if ttl is not None:
                job.append(("PEXPIRE", name, ttl))
            jobs.append((name, job))
        replies = await self._run("get", jobs)
        out: list[Buffer | None] = []
        try:
            for fields, *_ in replies:
                if isinstance(fields, Exception) and not is_wrongtype(fields):
                    raise self._failed(fields, "get")
                out.append(assemble(fields, self.pool) if isinstance(fields, list) else None)
        except BaseException:
            release_all(out)
            raise
        finally:
            release_all(replies)
        return out

    async def _discard(self, names: Sequence[str]) -> None:
        """Delete those of the values ``names`` (read as malformed) that the server
        still finds malformed, each checked and deleted atomically; best effort."""
        try:
            replies = await self._run("discard", [(n, [("EVAL", DISCARD, 1, n)]) for n in names])
        except BackendError as exc:
            log.warning("%s: could not remove malformed values: %s", self.safe_url, exc)
            return
        for name, (reply,) in zip(names, replies, strict=True):
            if isinstance(reply, Exception):
                log.warning(
                    "%s: could not remove malformed value %s: %s", self.safe_url, name, reply
                )
            elif reply == 1:
                log.warning("%s: removed malformed value %s", self.safe_url, name)
                self._counts["malformed_removed"] += 1

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        names = [self._name(key) for key in keys]
        replies = await self._run("contains", [(name, [("EXISTS", name)]) for name in names])
        return [self._flag(reply, "contains") for (reply,) in replies]

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        names = [self._name(key) for key in keys]
        replies = await self._run("delete", [(name, [("UNLINK", name)]) for name in names])
        return [self._flag(reply, "delete") for (reply,) in replies]

    def _flag(self, reply: Reply, op: str) -> bool:
        if isinstance(reply, Exception):
            raise self._failed(reply, op)
        return bool(reply)

    # -- writes -----------------------------------------------------------------------

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        """One round trip: a SET (``NX`` for ``CREATE``) per blob, or the parts and the
        publish script of a blob over ``max_value_bytes``."""
        jobs: list[Job] = []
        tail: tuple[Any, ...] = () if self._ttl_ms is None else ("PX", self._ttl_ms)
        if mode is PutMode.CREATE:
            tail += ("NX",)
        for key, buf in items:
            name = self._name(key)
            if buf.nbytes <= self._max_value:
                jobs.append((name, [("SET", name, buf.view, *tail)]))
            else:
                jobs.append((name, write_job(name, buf, self._max_value, mode, self._ttl_ms or 0)))
        replies = await self._run("put", jobs)
        results: list[bool] = []
        leftovers: list[str] = []
        for (_, job), got in zip(jobs, replies, strict=True):
            if len(job) == 1:
                results.append(self._stored(got[0]))
                continue
            stored, leftover = self._published(got)
            results.append(stored)
            if leftover:
                leftovers.append(str(job[0][1]))
        if leftovers:  # a publish script that did not run: drop its parts now
            await self._run("put", [(temp, [("UNLINK", temp)]) for temp in leftovers])
        return results

    def _stored(self, reply: Reply) -> bool:
        if isinstance(reply, rex.OutOfMemoryError):
            self._counts["rejected_oom"] += 1
            return False
        if isinstance(reply, Exception):
            raise self._failed(reply, "put")
        return reply is True or reply == b"OK"

    def _published(self, replies: list[Reply]) -> tuple[bool, bool]:
        """Whether a split blob was stored, and whether its temp hash may be left."""
        *writes, published = replies
        leftover = isinstance(published, Exception)
        failed = next((r for r in writes if isinstance(r, Exception)), None)
        if failed is None and leftover:
            failed = published
        if failed is not None:
            return self._stored(failed), leftover
        self._counts["split_writes"] += published == STORED
        self._counts["rejected_incomplete"] += published == INCOMPLETE
        return published == STORED, False
