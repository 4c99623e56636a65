"""Running batches of commands on the server: routed, cut into parallel pipelines, and
sent either on the fast path or through redis-py's public pipeline API.

A batch is a list of jobs, each the commands of one key that must run in order on one
connection (a split value's parts and its publish script). Jobs go to the node that
holds their key and are cut into up to ``parallel`` slices per node, each slice one
pipeline on its own connection: one round trip per batch.

The fast path borrows connections from redis-py's pools (redis-py connects, logs in,
selects the database, follows the cluster) and then talks RESP itself: it puts a
:class:`Receiver` in front of the connection's ``StreamReaderProtocol``, sends values
from the caller's memory and receives large bulk replies straight into pool buffers,
one future per pipeline. It reads ``Connection._reader`` and ``._writer``, which
redis-py does not promise to keep, so it is used only with the redis-py releases in
:data:`FAST_PATH_RELEASES`. With any other release every batch goes through
``client.pipeline()`` (redis-py's parser; large replies are copied into pool
buffers). In a cluster, jobs the fast path cannot finish (a redirect, a lost node)
are run again through redis-py's cluster pipeline, which follows the new topology.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any, TypeAlias, cast

import redis
import redis.exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from kvtier.backends.redis.resp import Command, Reply, ReplyParser, pack, release_all
from kvtier.core.buffers import BufferPool

Client: TypeAlias = "Redis | RedisCluster"
Job: TypeAlias = "tuple[str, list[Command]]"
"""The key that routes it, and its commands."""

FAST_PATH_RELEASES = ("7.4", "8.1", "8.2")
"""redis-py releases (major.minor) the fast path is tested with."""
SEND_SLICE = 1 << 20
"""Large values go to the transport in slices of this size; before the next slice the
sender waits while the transport is above its high-water mark, so most of a value
goes to the socket from the caller's memory, not via a copy in the transport."""
_REROUTE = (rex.MovedError, rex.AskError, rex.TryAgainError, rex.ClusterDownError)
_LOST = (rex.ConnectionError, ConnectionError, OSError)


def fast_path_works(version: str | None = None) -> bool:
    """Whether the fast path is known to work with this redis-py ``version``."""
    version = redis.__version__ if version is None else version
    return ".".join(version.split(".")[:2]) in FAST_PATH_RELEASES


class Receiver(asyncio.BufferedProtocol):
    """Sits between a connection's transport and its ``StreamReaderProtocol``.

    Outside :meth:`exchange`, bytes flow on to the ``StreamReader`` (redis-py's own
    commands read them there). During one, a :class:`ReplyParser` takes them, and
    large values are received straight into pool buffers. Everything else is
    forwarded to the original protocol.
    """

    def __init__(self, inner: Any, reader: asyncio.StreamReader, pool: BufferPool) -> None:
        self.inner = inner
        self.reader = reader
        self.parser = ReplyParser(pool)
        self.done: asyncio.Future[None] | None = None
        self.progress = 0
        """Bytes received during exchanges, for the stall watchdog."""
        self.stalled = False
        self.watch: asyncio.TimerHandle | None = None
        self.ended = False
        """The server closed the connection (redis-py may not have noticed yet)."""

    # -- the protocol ------------------------------------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.parser.view if self.done is None else self.parser.buffer()

    def buffer_updated(self, nbytes: int) -> None:
        done = self.done
        if done is None:
            self.reader.feed_data(self.parser.view[:nbytes])
            return
        self.progress += nbytes
        try:
            complete = self.parser.received(nbytes)
        except (rex.RedisError, ValueError) as exc:
            self._fail(rex.InvalidResponse(f"unreadable reply from the server: {exc}"))
            return
        if complete:
            self.done = None
            if not done.done():
                done.set_result(None)

    def data_received(self, data: bytes) -> None:
        """For transports that do not call :meth:`get_buffer` (TLS on Python 3.10)."""
        view = memoryview(data)
        while view.nbytes:
            into = self.get_buffer(view.nbytes)
            count = min(into.nbytes, view.nbytes)
            into[:count] = view[:count]
            self.buffer_updated(count)
            view = view[count:]

    def eof_received(self) -> bool | None:
        """A server never half-closes: the connection is done (``False`` closes it)."""
        self.ended = True
        self._fail(rex.ConnectionError("the server closed the connection"))
        self.inner.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended = True
        self._fail(rex.ConnectionError("the server closed the connection"))
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def _fail(self, exc: Exception) -> None:
        done, self.done = self.done, None
        if done is not None and not done.done():
            done.set_exception(exc)

    # -- one pipeline --------------------------------------------------------------------

    async def exchange(
        self, writer: asyncio.StreamWriter, commands: Sequence[Command], stall_after: float
    ) -> list[Reply]:
        """Send ``commands`` and return their replies. Any failure or cancellation
        aborts the connection (nothing half-sent completes later, no view of the
        caller's memory is kept) and releases what was received."""
        transport = writer.transport
        if self.ended or transport.is_closing():
            raise rex.ConnectionError("the server closed the connection")
        if self.reader._buffer:  # type: ignore[attr-defined]  # what redis-py's parsers read
            raise rex.ConnectionError("the connection holds bytes nobody asked for")
        loop = asyncio.get_running_loop()
        self.parser.start(len(commands))
        done = self.done = loop.create_future()
        self.stalled = False
        self.watch = loop.call_later(stall_after, self._check, transport, stall_after, None)
        try:
            for piece in pack(commands):
                if isinstance(piece, bytes) or piece.nbytes <= SEND_SLICE:
                    transport.write(piece)
                    continue
                for start in range(0, piece.nbytes, SEND_SLICE):
                    transport.write(piece[start : start + SEND_SLICE])
                    if transport.get_write_buffer_size():
                        await writer.drain()
            await done
            return self.parser.take()
        except BaseException as exc:
            self.done = None
            self.parser.abandon()
            transport.abort()
            if done.done() and not done.cancelled():
                done.exception()  # retrieved: no "never retrieved" warning
            if self.stalled:
                raise rex.TimeoutError(f"no progress for {stall_after} s") from exc
            if isinstance(exc, OSError):
                raise rex.ConnectionError(f"the connection failed: {exc}") from exc
            raise
        finally:
            if self.watch is not None:
                self.watch.cancel()
                self.watch = None

    def _check(self, transport: asyncio.WriteTransport, every: float, last: Any) -> None:
        """Abort the connection if nothing moved either way since the last check."""
        mark = (self.progress, transport.get_write_buffer_size())
        if mark == last:
            self.stalled = True
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        self.watch = loop.call_later(every, self._check, transport, every, mark)


async def exchange(
    conn: Any, commands: Sequence[Command], pool: BufferPool, stall: float
) -> list[Reply]:
    """Run ``commands`` as one pipeline on redis-py connection ``conn`` (connected) on
    the fast path; see :meth:`Receiver.exchange`."""
    writer = conn._writer
    transport = writer.transport
    receiver = transport.get_protocol()
    if type(receiver) is not Receiver:
        receiver = Receiver(receiver, conn._reader, pool)
        transport.set_protocol(receiver)
    try:
        return await receiver.exchange(writer, commands, stall)
    except BaseException:
        await conn.disconnect(nowait=True)
        raise


class Transport:
    """Runs batches of jobs on one redis-py client (see the module doc).

    ``max_connections`` bounds the pipelines in flight (and so the connections in
    use, redis-py's own commands included: run them under :attr:`slots`).
    """

    def __init__(
        self,
        client: Client,
        pool: BufferPool,
        *,
        parallel: int,
        max_connections: int,
        retries: int,
        stall_after: float,
        fast: bool,
    ) -> None:
        self.client = client
        self.pool = pool
        self.parallel = parallel
        self.retries = retries
        self.stall_after = stall_after
        self.fast = fast
        self.slots = asyncio.Semaphore(max_connections)
        self.cluster = isinstance(client, RedisCluster)

    @property
    def path(self) -> str:
        """Which data path batches take: ``direct`` or ``redis-py``."""
        return "direct" if self.fast else "redis-py"

    async def run(self, jobs: Sequence[Job]) -> list[list[Reply]]:
        """The replies of each job's commands. Raises redis-py's exceptions for a
        connection that failed; an error reply is an exception object in place."""
        slices = self._slices(jobs)
        if len(slices) == 1:
            node, part = slices[0]
            results = [await self._slice(node, [jobs[i] for i in part])]
        else:
            ran = await asyncio.gather(
                *(self._slice(node, [jobs[i] for i in part]) for node, part in slices),
                return_exceptions=True,
            )
            results = [r for r in ran if not isinstance(r, BaseException)]
            if len(results) < len(ran):
                release_all(results)
                raise next(r for r in ran if isinstance(r, BaseException))
        out: list[list[Reply]] = [[]] * len(jobs)
        for (_, part), replies in zip(slices, results, strict=True):
            for i, reply in zip(part, replies, strict=True):
                out[i] = reply
        return out

    def _slices(self, jobs: Sequence[Job]) -> list[tuple[ClusterNode | None, list[int]]]:
        groups: dict[str, tuple[ClusterNode | None, list[int]]] = {}
        if not self.cluster or not self.fast:  # a cluster pipeline routes by itself
            groups[""] = (None, list(range(len(jobs))))
        else:
            cluster: Any = self.client
            for i, (key, _) in enumerate(jobs):
                node = cluster.get_node_from_key(key)
                groups.setdefault(node.name, (node, []))[1].append(i)
        slices = []
        for node, indexes in groups.values():
            n = len(indexes)
            k = min(self.parallel, n)
            slices += [(node, indexes[i * n // k : (i + 1) * n // k]) for i in range(k)]
        return slices

    async def _slice(self, node: ClusterNode | None, jobs: list[Job]) -> list[list[Reply]]:
        commands = [command for _, job in jobs for command in job]
        replies: list[Reply] | None = None
        async with self.slots:
            if not self.fast:
                replies = await self._stock(commands)
            elif node is None:
                replies = await self._direct(cast(Redis, self.client).connection_pool, commands)
            else:
                with contextlib.suppress(*_LOST):  # the cluster pipeline below finds
                    replies = await self._direct(node, commands)  # the node's successor
        out = []
        start = 0
        for _, job in jobs:
            out.append([] if replies is None else replies[start : start + len(job)])
            start += len(job)
        if self.cluster and self.fast:
            redo = [j for j, got in enumerate(out) if not got or any(map(_rerouted, got))]
            if redo:
                await self._again(jobs, out, redo)
        return out

    async def _again(self, jobs: list[Job], out: list[list[Reply]], redo: list[int]) -> None:
        """Run jobs ``redo`` again through the cluster pipeline, into ``out``."""
        release_all(out[j] for j in redo)
        for j in redo:
            out[j] = []
        try:
            async with self.slots:
                again = await self._stock([c for j in redo for c in jobs[j][1]])
        except BaseException:
            release_all(out)
            raise
        for j in redo:
            count = len(jobs[j][1])
            out[j], again = again[:count], again[count:]

    async def _direct(self, source: Any, commands: list[Command]) -> list[Reply]:
        """One pipeline on the fast path, on a connection from ``source`` (a pool or a
        cluster node), retried on a fresh connection after a connection error."""
        node = isinstance(source, ClusterNode)
        conn = source.acquire_connection() if node else await source.get_connection()
        failures = 0
        try:
            while True:
                try:
                    if not conn.is_connected:
                        await conn.connect()
                    return await exchange(conn, commands, self.pool, self.stall_after)
                except _LOST:
                    failures += 1
                    if failures > self.retries:
                        raise
        finally:
            if node:
                source.release(conn)
            else:
                await source.release(conn)

    async def _stock(self, commands: list[Command]) -> list[Reply]:
        """One pipeline through redis-py's public API. Values are copied first: a
        cancelled redis-py write may still be sent from the memory it was given."""
        pipe = self.client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*map(_owned, command))
        return [_plain(reply) for reply in await pipe.execute(raise_on_error=False)]

    async def aclose(self) -> None:
        await self.client.aclose()


def _owned(arg: Any) -> Any:
    return arg.tobytes() if type(arg) is memoryview else arg


def _plain(reply: Reply) -> Reply:
    """A reply as the fast path gives it: redis-py's callbacks turn arrays of field
    and value (HGETALL) into dicts."""
    if isinstance(reply, dict):
        return [item for pair in reply.items() for item in pair]
    return reply


def _rerouted(reply: Reply) -> bool:
    return isinstance(reply, _REROUTE)
