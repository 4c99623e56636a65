"""The ``redis`` tier on redis-py's asyncio client (standalone, Unix socket, TLS, cluster).

Storage layout (``P`` is ``key_prefix``, ``K`` a chunk key)::

    P{K}              the blob as one string, written by one SET: never two keys that
                      could disagree
    P{K}              or, for a blob larger than ``max_value_bytes``, one hash
                      {n: parts, size: bytes, p0: ..., p1: ...} moved into place by one
                      RENAME, so a reader sees the old or the new value, never a mix
    P{K}:tmp:<hex>    a split blob being written; it expires after an hour if its writer
                      dies, and is never listed or read

The braces make ``K`` the cluster hash tag, so a chunk's temp key shares its slot.
A split blob whose parts do not add up (a part evicted, say) is a miss.

Data path: a batch is cut into ``parallel`` slices, each sent as one pipeline on its
own connection. Bulk replies of 64 KiB or more are received by the socket straight
into buffers of the tier's pool (``_DirectReceiver``), and large values go to the
socket in 1 MiB slices of the caller's buffer. redis-py's defaults allocate fresh
``bytes`` for both (a page fault per 4 KiB) and copy a reply several times on its way.
The hooks used (``_AsyncRESP2Parser._read`` and ``on_connect``,
``Connection._send_packed_command``, ``StreamReader._buffer``, ``set_protocol`` on the
transport) exist from redis-py 5.0.1 on; tested with redis-py 8.1 on CPython 3.11.

Errors: an unreachable server, a timeout or a cluster without a live node is
:class:`BackendUnavailableError`; wrong credentials at ``open()`` are
:class:`ConfigError`; a write the server refuses because it is out of memory is a
``False`` result counted as ``rejected_oom``; anything else is :class:`BackendError`.
"""

from __future__ import annotations

import asyncio
import math
import re
import secrets
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias
from urllib.parse import SplitResult, unquote, urlsplit

import redis.exceptions as rex
from redis._parsers.resp2 import _AsyncRESP2Parser
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (
    Connection,
    ConnectionPool,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kvtier.backends.redis import RedisOptions
from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.errors import BackendError, BackendUnavailableError, ConfigError
from kvtier.core.keys import is_valid_key, validate_keys
from kvtier.core.plugins import PluginRegistry

Client: TypeAlias = "Redis | RedisCluster"
Reply: TypeAlias = Any
"""One pipeline reply: bytes, a pooled Buffer, an int, None or a ResponseError."""

POOLED_MIN = 64 << 10
"""Bulk replies from this size on are read into pool buffers."""
RECV_SCRATCH = 256 << 10
"""Bytes a connection receives at once outside large bulk replies."""
SEND_SLICE = 1 << 20
"""Large values go to the socket in slices of this size, straight from the caller's buffer."""
DEFAULT_MAX_VALUE = 512 << 20
"""Redis' default ``proto-max-bulk-len``, assumed when ``CONFIG GET`` is not allowed."""
TEMP_TTL_MS = 3_600_000
"""Lifetime of a split blob's temp hash, should its writer die before publishing it."""
SCAN_COUNT = 1000
"""Keys one SCAN call looks at."""
_FORMS = {
    "redis": "redis://[user[:password]@]host[:port][/db]",
    "rediss": "rediss://[user[:password]@]host[:port][/db]",
    "unix": "unix://[user[:password]@]/path/to/valkey.sock",
    "redis+cluster": "redis+cluster://[user[:password]@]host:port[,host:port...]",
}
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")
CLIENT_ERRORS = (rex.RedisError, rex.RedisClusterException, OSError)
"""What redis-py raises; RedisClusterException is not a RedisError."""

# Publishes a split blob: KEYS = temp hash, chunk key; ARGV = mode, ttl in ms (0: none),
# expected field count. Returns 1 stored, 0 refused (CREATE and the key exists), -1 the
# temp hash is incomplete (a part was evicted or never written).
_PUBLISH = """
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


# -- URLs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where a tier's server is, parsed from its URL."""

    scheme: str
    nodes: tuple[tuple[str, int], ...] = ()
    """``(host, port)`` of the server, or the cluster's seed nodes."""
    path: str | None = None
    """Unix socket path."""
    db: int | None = None
    username: str | None = None
    password: str | None = None

    @property
    def cluster(self) -> bool:
        return self.scheme == "redis+cluster"


def redacted(url: str) -> str:
    """``url`` with its password replaced by ``***``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:***@{host}").geturl()


def _bad(url: str, scheme: str, problem: str) -> ConfigError:
    form = _FORMS.get(scheme, " or ".join(_FORMS.values()))
    return ConfigError(
        f"invalid redis tier URL {redacted(url)!r}: {problem}; write it as {form} "
        "and put everything else in the tier's 'options'"
    )


def _host_port(url: str, scheme: str, text: str, default_port: int | None) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6 address]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise _bad(url, scheme, f"{text!r} names no host")
    if not port_text:
        if default_port is None:
            raise _bad(url, scheme, f"cluster node {text!r} needs a port")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, scheme, f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def _credentials(parts: SplitResult) -> tuple[str | None, str | None]:
    userinfo, at, _ = parts.netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) if colon else None


def parse_url(url: str) -> Target:
    """The server a ``redis``/``rediss``/``unix``/``redis+cluster`` URL names;
    :class:`ConfigError` naming the problem and the URL's form otherwise."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in _FORMS:
        raise _bad(url, scheme, f"unknown scheme {scheme!r}")
    if parts.query or parts.fragment:
        raise _bad(url, scheme, "it has a query or fragment")
    username, password = _credentials(parts)
    location = parts.netloc.rpartition("@")[2]
    if scheme == "unix":
        if location or not parts.path.startswith("/"):
            raise _bad(url, scheme, "the socket path must be absolute (three slashes)")
        return Target(scheme, path=unquote(parts.path), username=username, password=password)
    if not location:
        raise _bad(url, scheme, "it names no host")
    db_text = parts.path.strip("/")
    if db_text and not db_text.isdigit():
        raise _bad(url, scheme, f"the path {parts.path!r} is not a database number")
    db = int(db_text) if db_text else None
    if scheme == "redis+cluster":
        if db:
            raise _bad(url, scheme, "a cluster has only database 0")
        nodes = tuple(_host_port(url, scheme, n, None) for n in location.split(","))
    else:
        if "," in location:
            raise _bad(url, scheme, "several hosts are a cluster: use redis+cluster://")
        nodes = (_host_port(url, scheme, location, 6379),)
    return Target(scheme, nodes=nodes, db=db, username=username, password=password)


# -- the data path -------------------------------------------------------------------


class _DirectReceiver(asyncio.BufferedProtocol):
    """Sits between a connection's transport and its ``StreamReaderProtocol``.

    Bytes flow to the ``StreamReader`` as before, except while :meth:`readinto` waits:
    then the transport receives them straight into the caller's memory (the kernel's
    copy is the only one). Everything else is forwarded to the original protocol.
    """

    def __init__(self, inner: Any, reader: asyncio.StreamReader) -> None:
        self.inner = inner
        self.reader = reader
        self.scratch = memoryview(bytearray(RECV_SCRATCH))
        self.target: memoryview | None = None
        self.filled: asyncio.Future[None] | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.scratch if self.target is None else self.target

    def buffer_updated(self, nbytes: int) -> None:
        if self.target is None:
            self.reader.feed_data(self.scratch[:nbytes])
            return
        self.target = self.target[nbytes:]
        if not self.target.nbytes:
            self._finish(None)

    def _finish(self, exc: Exception | None) -> None:
        filled, self.target, self.filled = self.filled, None, None
        if filled is not None and not filled.done():
            if exc is None:
                filled.set_result(None)
            else:
                filled.set_exception(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(rex.ConnectionError("the server closed the connection"))
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        self._finish(rex.ConnectionError("the server closed the connection"))
        return bool(self.inner.eof_received())

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    async def readinto(self, view: memoryview) -> None:
        """Fill ``view``: first with what the reader holds, then from the socket."""
        # redis-py's own parsers look at StreamReader._buffer the same way.
        held = min(len(self.reader._buffer), view.nbytes)  # type: ignore[attr-defined]
        if held:
            view[:held] = await self.reader.readexactly(held)
        if held == view.nbytes:
            return
        if self.reader.at_eof() or self.reader.exception() is not None:
            raise rex.ConnectionError("the server closed the connection")
        self.target = view[held:]
        self.filled = asyncio.get_running_loop().create_future()
        try:
            await self.filled
        finally:
            self.target = self.filled = None


class _PooledParser(_AsyncRESP2Parser):
    """RESP2 parser that reads large bulk strings into pool buffers.

    A bulk reply of ``POOLED_MIN`` bytes or more is received straight into a
    :class:`Buffer` leased from ``pool`` (the receiver releases it) instead of
    ``bytes``. redis-py never resumes an interrupted parse: it drops the connection,
    and this parser releases the lease.
    """

    pool: ClassVar[BufferPool]
    _receiver: _DirectReceiver | None = None

    def on_connect(self, connection: Any) -> None:
        super().on_connect(connection)  # type: ignore[no-untyped-call]
        transport = connection._writer.transport
        self._receiver = _DirectReceiver(transport.get_protocol(), connection._reader)
        transport.set_protocol(self._receiver)

    async def _read(self, length: int) -> Any:
        receiver = self._receiver
        if length < POOLED_MIN or len(self._buffer) > self._pos or receiver is None:
            return await super()._read(length)
        stream = self._stream
        assert stream is not None
        buf = self.pool.acquire(length)
        try:
            await receiver.readinto(buf.view)
            if await stream.readexactly(2) != b"\r\n":
                raise rex.InvalidResponse("a bulk string does not end with CRLF")
        except asyncio.IncompleteReadError:
            buf.release()
            raise rex.ConnectionError("the server closed the connection") from None
        except BaseException:
            buf.release()
            raise
        return buf


async def _send_sliced(writer: asyncio.StreamWriter, command: Iterable[bytes]) -> None:
    """Write a packed command, large values in ``SEND_SLICE`` pieces straight from the
    caller's memory. An interrupted write aborts the connection, so that the transport
    neither completes the command later nor keeps a view of the caller's buffer."""
    try:
        for part in command:
            view = memoryview(part)
            if view.nbytes <= SEND_SLICE:
                writer.write(view)
                continue
            for start in range(0, view.nbytes, SEND_SLICE):
                writer.write(view[start : start + SEND_SLICE])
                await writer.drain()
        await writer.drain()
    except BaseException:
        writer.transport.abort()
        raise


class _TCPConnection(Connection):
    async def _send_packed_command(self, command: Iterable[bytes]) -> None:
        assert self._writer is not None
        await _send_sliced(self._writer, command)


class _UnixConnection(UnixDomainSocketConnection):
    async def _send_packed_command(self, command: Iterable[bytes]) -> None:
        assert self._writer is not None
        await _send_sliced(self._writer, command)


class _TLSConnection(SSLConnection):
    async def _send_packed_command(self, command: Iterable[bytes]) -> None:
        assert self._writer is not None
        await _send_sliced(self._writer, command)


def _release_all(replies: Iterable[Reply]) -> None:
    """Release every pooled buffer in (nested) replies."""
    for reply in replies:
        if isinstance(reply, Buffer):
            reply.release()
        elif isinstance(reply, dict):
            _release_all(reply.values())
        elif isinstance(reply, list):
            _release_all(reply)


def _is_wrongtype(reply: Reply) -> bool:
    return isinstance(reply, rex.ResponseError) and str(reply).startswith("WRONGTYPE")


def _glob_escape(text: str) -> str:
    return _GLOB_SPECIAL.sub(r"\\\1", text)


# -- the backend ---------------------------------------------------------------------


class RedisBackend(Backend):
    """A tier in a Redis or Valkey server or cluster; see the module doc for the layout.

    Shared by any number of processes; persistent as far as the server is. Not bounded
    by kvtier (a tier ``capacity`` is ignored): the server's ``maxmemory`` and
    ``maxmemory-policy`` decide what is evicted, and a write refused for memory is a
    ``False`` result. One instance serves one event loop.
    """

    capabilities = Capabilities(
        persistent=True, shared=True, bounded=False, listing=True, create_mode=True
    )
    options: RedisOptions

    def __init__(
        self,
        url: str,
        options: RedisOptions,
        *,
        capacity: int | None = None,
        pool: BufferPool | None = None,
        registry: PluginRegistry | None = None,
    ) -> None:
        super().__init__(url, options, capacity=capacity, pool=pool, registry=registry)
        self.target = parse_url(url)
        self._check_options()
        self.tls = self.target.scheme == "rediss" or options.tls
        self._prefix = options.key_prefix
        self._ttl_ms = None if options.ttl is None else max(1, round(options.ttl * 1000))
        self._client: Client | None = None
        self._publish: Any = None
        self._max_value = options.max_value_bytes or DEFAULT_MAX_VALUE
        self._slots = asyncio.Semaphore(options.max_connections)
        self._counts = dict.fromkeys(
            ("hits", "misses", "rejected_oom", "rejected_incomplete", "split_writes"), 0
        )

    def _check_options(self) -> None:
        t, o, where = self.target, self.options, f"redis tier {redacted(self.url)!r}"
        if t.username is not None and o.username is not None:
            raise ConfigError(f"{where}: give the username once, in the URL or in options")
        if t.password is not None and o.password is not None:
            raise ConfigError(f"{where}: give the password once, in the URL or in options")
        if t.db is not None and o.db is not None and t.db != o.db:
            raise ConfigError(f"{where}: the URL says db {t.db}, options say db {o.db}")
        if t.cluster and o.db:
            raise ConfigError(f"{where}: a cluster has only database 0; remove options.db")
        if t.scheme == "unix" and o.tls:
            raise ConfigError(f"{where}: TLS over a Unix socket is not supported")
        ssl_set = [
            name
            for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
            if getattr(o, name) is not None
        ]
        if ssl_set and not (t.scheme == "rediss" or o.tls):
            raise ConfigError(
                f"{where}: {', '.join(ssl_set)} set but the connection does not use TLS; "
                "write rediss://... or set 'tls: true'"
            )

    # -- connecting -------------------------------------------------------------------

    def _connection_kwargs(self) -> dict[str, Any]:
        t, o = self.target, self.options
        parser = type("PooledParser", (_PooledParser,), {"pool": self.pool})
        kwargs: dict[str, Any] = {
            "username": t.username or o.username,
            "password": t.password or (o.password and o.password.get_secret_value()),
            "socket_timeout": o.socket_timeout,
            "socket_connect_timeout": o.connect_timeout,
            "protocol": 2,  # RESP3 would swap in redis-py's own parser
            "parser_class": parser,
            "client_name": "kvtier",
        }
        if self.tls:
            kwargs.update(
                ssl_ca_certs=o.ssl_ca_certs,
                ssl_certfile=o.ssl_certfile,
                ssl_keyfile=o.ssl_keyfile,
                ssl_cert_reqs=o.ssl_cert_reqs,
                ssl_check_hostname=o.ssl_check_hostname,
            )
        return kwargs

    def _make_client(self) -> Client:
        t, o = self.target, self.options
        kwargs = self._connection_kwargs()
        retry = Retry(NoBackoff(), o.retries)
        if t.cluster:
            parser = kwargs.pop("parser_class")
            client = RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in t.nodes],
                max_connections=o.max_connections,
                retry=retry,
                ssl=self.tls,
                **kwargs,
            )
            # Nodes found by discovery are built from these (startup nodes only discover).
            client.connection_kwargs.update(
                parser_class=parser,
                connection_class=_TLSConnection if self.tls else _TCPConnection,
            )
            return client
        if t.scheme == "unix":
            kwargs.update(connection_class=_UnixConnection, path=t.path)
        else:
            host, port = t.nodes[0]
            kwargs.update(host=host, port=port)
            kwargs["connection_class"] = _TLSConnection if self.tls else _TCPConnection
        pool = ConnectionPool(
            db=t.db or o.db or 0, max_connections=o.max_connections, retry=retry, **kwargs
        )
        return Redis.from_pool(pool)

    async def open(self) -> None:
        """Connect and check the server: its mode must match the URL's scheme, and the
        credentials must be accepted (:class:`ConfigError` otherwise)."""
        self._check_open()
        if self._client is not None:
            return
        client = self._make_client()
        try:
            if isinstance(client, RedisCluster):
                await client.initialize()
            await client.ping()
            if not isinstance(client, RedisCluster):
                info = await client.info("cluster")
                if info.get("cluster_enabled"):
                    raise ConfigError(
                        f"{redacted(self.url)} is a cluster node: write the tier URL as "
                        f"redis+cluster://{self.target.nodes[0][0]}:{self.target.nodes[0][1]}"
                    )
            if self.options.max_value_bytes is None:
                self._max_value = await self._server_max_value(client)
        except BaseException as exc:
            await client.aclose()
            if isinstance(exc, CLIENT_ERRORS):
                raise self._open_error(exc) from exc
            raise
        self._client = client
        self._publish = client.register_script(_PUBLISH)

    async def _server_max_value(self, client: Client) -> int:
        """The server's ``proto-max-bulk-len`` (the smallest of a cluster's nodes)."""
        found: Any
        try:
            if isinstance(client, RedisCluster):
                found = await client.config_get(
                    "proto-max-bulk-len", target_nodes=RedisCluster.PRIMARIES
                )
                values = [int(v["proto-max-bulk-len"]) for v in found.values()]
            else:
                found = await client.config_get("proto-max-bulk-len")
                values = [int(found["proto-max-bulk-len"])]
        except (rex.ResponseError, KeyError, ValueError):  # CONFIG denied or renamed
            return DEFAULT_MAX_VALUE
        return min(values)

    def _open_error(self, exc: Exception) -> ConfigError | BackendError:
        where = redacted(self.url)
        if isinstance(exc, (rex.AuthenticationError, rex.AuthenticationWrongNumberOfArgsError)):
            return ConfigError(
                f"{where}: the server refused the credentials ({exc}); set the right "
                "username and password in the URL or in options.username/options.password"
            )
        if isinstance(exc, rex.NoPermissionError):
            return ConfigError(f"{where}: the ACL user lacks a permission the tier needs: {exc}")
        if isinstance(exc, rex.RedisClusterException) and "not enabled" in str(exc):
            return ConfigError(
                f"{where}: the server is not a cluster; write the tier URL as redis://host:port"
            )
        return self._error(exc, "open")

    async def close(self) -> None:
        await super().close()
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def _connected(self) -> Client:
        self._check_open()
        if self._client is None:
            raise BackendUnavailableError(f"{redacted(self.url)}: not connected; call open()")
        return self._client

    def _error(self, exc: BaseException, op: str) -> BackendError:
        where = f"{redacted(self.url)}: {op}"
        unreachable = (
            rex.ConnectionError,
            rex.TimeoutError,
            rex.BusyLoadingError,
            rex.ClusterDownError,
            rex.TryAgainError,
            rex.MasterDownError,
            rex.ReadOnlyError,
            rex.RedisClusterException,
            OSError,
        )
        if isinstance(exc, unreachable):
            return BackendUnavailableError(f"{where} failed, the server is unavailable: {exc}")
        return BackendError(f"{where} failed: {type(exc).__name__}: {exc}")

    # -- batches ----------------------------------------------------------------------

    def _name(self, key: str) -> str:
        return f"{self._prefix}{{{key}}}"

    def _slices(self, n: int) -> list[range]:
        k = min(self.options.parallel, n)
        return [range(i * n // k, (i + 1) * n // k) for i in range(k)]

    async def _pipeline(self, op: str, queue: Callable[[Any], None]) -> list[Reply]:
        """Run the commands ``queue(pipe)`` adds as one pipeline; per-command errors come
        back as exception objects, connection errors raise (translated)."""
        client = self._connected()
        try:
            async with self._slots:
                pipe = client.pipeline(transaction=False)
                queue(pipe)
                return list(await pipe.execute(raise_on_error=False))
        except CLIENT_ERRORS as exc:
            raise self._error(exc, op) from exc

    async def _batch(self, op: str, count: int, add: Callable[[Any, int], None]) -> list[Reply]:
        """``count`` replies: ``add(pipe, i)`` queues command ``i``; the batch runs as up
        to ``parallel`` pipelines at once."""
        if not count:
            return []

        def queue(indexes: range) -> Callable[[Any], None]:
            def fill(pipe: Any) -> None:
                for i in indexes:
                    add(pipe, i)

            return fill

        slices = self._slices(count)
        results = await asyncio.gather(
            *(self._pipeline(op, queue(s)) for s in slices), return_exceptions=True
        )
        done = [r for r in results if not isinstance(r, BaseException)]
        if len(done) < len(results):
            _release_all(done)
            raise next(r for r in results if isinstance(r, BaseException))
        return [reply for replies in done for reply in replies]

    def _failed(self, reply: Reply, op: str) -> BackendError:
        if isinstance(reply, rex.NoPermissionError):
            return BackendError(
                f"{redacted(self.url)}: {op} denied by the server's ACL ({reply}); grant the "
                f"user the command and the key pattern {self._prefix}*"
            )
        return self._error(reply, op)

    # -- reads ------------------------------------------------------------------------

    async def get_many(self, keys: Sequence[str]) -> list[Buffer | None]:
        validate_keys(keys)
        self._connected()
        names = [self._name(key) for key in keys]
        ttl = self._ttl_ms if self.options.refresh_ttl else None

        def add(pipe: Any, i: int) -> None:
            if ttl is None:
                pipe.get(names[i])
            else:
                pipe.getex(names[i], px=ttl)

        replies = await self._batch("get", len(names), add)
        out: list[Buffer | None] = []
        split: list[int] = []
        try:
            for i, reply in enumerate(replies):
                out.append(None)
                if isinstance(reply, Buffer):
                    out[i] = reply
                elif isinstance(reply, bytes):
                    out[i] = self.pool.copy_of(reply)
                elif _is_wrongtype(reply):
                    split.append(i)
                elif isinstance(reply, Exception):
                    raise self._failed(reply, "get")
            if split:
                blobs = await self._get_split([names[i] for i in split])
                for i, blob in zip(split, blobs, strict=True):
                    out[i] = blob
        except BaseException:
            _release_all(replies[len(out) :])
            _release_all(out)
            raise
        hits = sum(blob is not None for blob in out)
        self._counts["hits"] += hits
        self._counts["misses"] += len(out) - hits
        return out

    async def _get_split(self, names: Sequence[str]) -> list[Buffer | None]:
        ttl = self._ttl_ms if self.options.refresh_ttl else None

        def queue(pipe: Any) -> None:
            for name in names:
                pipe.hgetall(name)
                if ttl is not None:
                    pipe.pexpire(name, ttl)

        replies = await self._pipeline("get", queue)
        step = 1 if ttl is None else 2
        out: list[Buffer | None] = []
        try:
            for fields in replies[::step]:
                if isinstance(fields, Exception) and not _is_wrongtype(fields):
                    raise self._failed(fields, "get")
                out.append(self._assemble(fields) if isinstance(fields, dict) else None)
        finally:
            _release_all(replies)
        return out

    def _assemble(self, fields: dict[bytes, Reply]) -> Buffer | None:
        """The blob a split hash holds, copied into one pool buffer; ``None`` if its
        parts are missing or do not add up."""
        try:
            count, size = int(fields[b"n"]), int(fields[b"size"])
            parts = [fields[b"p%d" % i] for i in range(count)]
        except (KeyError, ValueError, TypeError):
            return None
        views = [p.view if isinstance(p, Buffer) else memoryview(p) for p in parts]
        if sum(v.nbytes for v in views) != size or len(fields) != count + 2:
            return None
        buf = self.pool.acquire(size)
        done = 0
        for view in views:
            buf.view[done : done + view.nbytes] = view
            done += view.nbytes
        return buf

    async def contains_many(self, keys: Sequence[str]) -> list[bool]:
        validate_keys(keys)
        self._connected()
        names = [self._name(key) for key in keys]
        replies = await self._batch(
            "contains", len(names), lambda pipe, i: pipe.execute_command("EXISTS", names[i])
        )
        return [self._flag(reply, "contains") for reply in replies]

    async def delete_many(self, keys: Sequence[str]) -> list[bool]:
        validate_keys(keys)
        self._connected()
        names = [self._name(key) for key in keys]
        replies = await self._batch(
            "delete", len(names), lambda pipe, i: pipe.execute_command("UNLINK", names[i])
        )
        return [self._flag(reply, "delete") for reply in replies]

    def _flag(self, reply: Reply, op: str) -> bool:
        if isinstance(reply, Exception):
            raise self._failed(reply, op)
        return bool(reply)

    # -- writes -----------------------------------------------------------------------

    async def put_many(
        self, items: Sequence[tuple[str, Buffer]], mode: PutMode = PutMode.OVERWRITE
    ) -> list[bool]:
        validate_keys(key for key, _ in items)
        self._connected()
        whole = [i for i, (_, buf) in enumerate(items) if buf.nbytes <= self._max_value]
        split = [i for i, (_, buf) in enumerate(items) if buf.nbytes > self._max_value]
        names = [self._name(items[i][0]) for i in whole]
        nx = mode is PutMode.CREATE

        def add(pipe: Any, j: int) -> None:
            pipe.set(names[j], items[whole[j]][1].view, px=self._ttl_ms, nx=nx)

        results = [False] * len(items)
        for i, reply in zip(whole, await self._batch("put", len(names), add), strict=True):
            results[i] = self._stored(reply)
        for i in split:
            key, buf = items[i]
            results[i] = await self._put_split(self._name(key), buf, mode)
        return results

    def _stored(self, reply: Reply) -> bool:
        if isinstance(reply, rex.OutOfMemoryError):
            self._counts["rejected_oom"] += 1
            return False
        if isinstance(reply, Exception):
            raise self._failed(reply, "put")
        return reply is True

    async def _put_split(self, name: str, buf: Buffer, mode: PutMode) -> bool:
        """Write ``buf`` as parts of a temp hash in ``name``'s slot, then publish it."""
        temp = f"{name}:tmp:{secrets.token_hex(8)}"
        step = self._max_value
        count = max(1, math.ceil(buf.nbytes / step))

        def queue(pipe: Any) -> None:
            pipe.hset(temp, mapping={"n": count, "size": buf.nbytes})
            pipe.pexpire(temp, TEMP_TTL_MS)
            for i in range(count):
                pipe.hset(temp, f"p{i}", buf.view[i * step : (i + 1) * step])

        replies = await self._pipeline("put", queue)
        failed = next((r for r in replies if isinstance(r, Exception)), None)
        if failed is not None:
            await self._pipeline("put", lambda pipe: pipe.execute_command("UNLINK", temp))
            return self._stored(failed)
        client = self._connected()
        try:
            async with self._slots:
                args = [mode.value, self._ttl_ms or 0, count + 2]
                published = await self._publish(keys=[temp, name], args=args, client=client)
        except rex.OutOfMemoryError:
            self._counts["rejected_oom"] += 1
            return False
        except CLIENT_ERRORS as exc:
            raise self._error(exc, "put") from exc
        self._counts["split_writes"] += published == 1
        self._counts["rejected_incomplete"] += published == -1
        return bool(published == 1)

    # -- listing and stats ------------------------------------------------------------

    async def _scan(self, match: str) -> AsyncIterator[list[bytes]]:
        """Pages of key names matching ``match``, from every primary of a cluster."""
        client = self._connected()
        nodes: list[Any] = client.get_primaries() if isinstance(client, RedisCluster) else [None]
        for node in nodes:
            cursor: Any = 0
            while True:
                reply: Any
                try:
                    async with self._slots:
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
                    raise self._error(exc, "scan") from exc
                yield page
                if cursor == 0:
                    break

    def _match(self, prefix: str) -> str:
        return f"{_glob_escape(self._prefix)}{{{_glob_escape(prefix)}*}}"

    def _key_of(self, name: bytes) -> str | None:
        text = name.decode("utf-8", "replace")
        key = text[len(self._prefix) + 1 : -1]
        return key if is_valid_key(key) else None

    async def iter_keys(self, prefix: str = "") -> AsyncIterator[str]:
        """Every stored key starting with ``prefix`` (SCAN; a key written or deleted while
        the scan runs may or may not appear)."""
        seen: set[str] = set()
        async for page in self._scan(self._match(prefix)):
            for name in page:
                key = self._key_of(name)
                if key is not None and key not in seen:
                    seen.add(key)
                    yield key

    async def stats(self) -> BackendStats:
        """Local counters plus a SCAN of this tier's keys (``keys`` and ``bytes_used``:
        O(keys) round trips / 1000) and the server's memory figures."""
        client = self._connected()
        seen: set[bytes] = set()
        nbytes = 0
        async for page in self._scan(self._match("")):
            fresh = [n for n in page if n not in seen and self._key_of(n) is not None]
            seen.update(fresh)
            nbytes += await self._sizes(fresh)
        try:
            async with self._slots:
                infos = await self._info(client)
        except CLIENT_ERRORS as exc:
            raise self._error(exc, "stats") from exc
        maxmemory = [int(i.get("maxmemory", 0)) for i in infos]
        details: dict[str, Any] = {
            **self._counts,
            "nodes": len(infos),
            "server_used_memory": sum(int(i.get("used_memory", 0)) for i in infos),
            "server_evicted_keys": sum(int(i.get("evicted_keys", 0)) for i in infos),
            "max_value_bytes": self._max_value,
        }
        return BackendStats(
            keys=len(seen),
            bytes_used=nbytes,
            capacity_bytes=sum(maxmemory) if all(maxmemory) else None,
            details=details,
        )

    async def _sizes(self, names: Sequence[bytes]) -> int:
        """Total blob bytes of ``names`` (STRLEN, or a split hash's ``size``)."""
        replies = await self._batch("stats", len(names), lambda pipe, i: pipe.strlen(names[i]))
        split = [names[i] for i, r in enumerate(replies) if _is_wrongtype(r)]
        sizes = await self._batch("stats", len(split), lambda pipe, i: pipe.hget(split[i], "size"))
        total = 0
        for reply in [*replies, *sizes]:
            if isinstance(reply, (int, bytes)):
                total += int(reply)
        return total

    @staticmethod
    async def _info(client: Client) -> list[dict[str, Any]]:
        if isinstance(client, RedisCluster):
            found = await client.info("memory", "stats", target_nodes=RedisCluster.PRIMARIES)
            return list(found.values())
        return [await client.info("memory", "stats")]
