"""The redis-py client of a tier: built from the URL and options, checked at open, and
its exceptions translated into kvtier's errors."""

from __future__ import annotations

from typing import Any

import redis.exceptions as rex
from redis.asyncio import Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import ConnectionPool, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from kvtier.backends.redis import RedisOptions
from kvtier.backends.redis.transport import Client
from kvtier.backends.redis.url import Target
from kvtier.core.errors import BackendError, BackendUnavailableError, ConfigError
from kvtier.core.urls import redact

DEFAULT_MAX_VALUE = 512 << 20
"""Redis' default ``proto-max-bulk-len``, assumed when ``CONFIG GET`` is not allowed."""
CLIENT_ERRORS = (rex.RedisError, rex.RedisClusterException, OSError)
"""What redis-py raises; RedisClusterException is not a RedisError."""
_UNREACHABLE = (
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


def check_options(url: str, target: Target, options: RedisOptions) -> None:
    """:class:`ConfigError` for options that contradict the URL or each other."""
    t, o, where = target, options, f"redis tier {redact(url)!r}"
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
    if ssl_set and not uses_tls(t, o):
        raise ConfigError(
            f"{where}: {', '.join(ssl_set)} set but the connection does not use TLS; "
            "write rediss://... or set 'tls: true'"
        )


def uses_tls(target: Target, options: RedisOptions) -> bool:
    return target.scheme == "rediss" or options.tls


def make_client(target: Target, options: RedisOptions) -> Client:
    """An unconnected redis-py asyncio client (RESP2, redis-py's default connection
    classes) for ``target``."""
    t, o = target, options
    tls = uses_tls(t, o)
    kwargs: dict[str, Any] = {
        "username": t.username or o.username,
        "password": t.password or (o.password and o.password.get_secret_value()),
        "socket_timeout": o.socket_timeout,
        "socket_connect_timeout": o.connect_timeout,
        "protocol": 2,  # the fast path parses RESP2
        "client_name": "kvtier",
    }
    if tls:
        kwargs.update(
            ssl_ca_certs=o.ssl_ca_certs,
            ssl_certfile=o.ssl_certfile,
            ssl_keyfile=o.ssl_keyfile,
            ssl_cert_reqs=o.ssl_cert_reqs,
            ssl_check_hostname=o.ssl_check_hostname,
        )
    retry = Retry(NoBackoff(), o.retries)
    if t.cluster:
        return RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in t.nodes],
            max_connections=o.max_connections,
            retry=retry,
            ssl=tls,
            **kwargs,
        )
    if t.scheme == "unix":
        kwargs.update(connection_class=UnixDomainSocketConnection, path=t.path)
    else:
        host, port = t.nodes[0]
        kwargs.update(host=host, port=port)
        if tls:
            kwargs.update(connection_class=SSLConnection)
    pool = ConnectionPool(
        db=t.db or o.db or 0, max_connections=o.max_connections, retry=retry, **kwargs
    )
    return Redis.from_pool(pool)


async def check_server(url: str, target: Target, client: Client) -> None:
    """Connect, and check that the server's mode matches the URL's scheme."""
    if isinstance(client, RedisCluster):
        await client.initialize()
    await client.ping()
    if not isinstance(client, RedisCluster):
        info = await client.info("cluster")
        if info.get("cluster_enabled"):
            host, port = target.nodes[0]
            raise ConfigError(
                f"{redact(url)} is a cluster node: write the tier URL as "
                f"redis+cluster://{host}:{port}"
            )


async def server_max_value(client: Client) -> int:
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


def open_error(url: str, exc: Exception) -> ConfigError | BackendError:
    """What a client error at ``open()`` means: wrong credentials or permissions are
    configuration errors."""
    where = redact(url)
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
    return translate(url, exc, "open")


def translate(url: str, exc: BaseException, op: str) -> BackendError:
    """A redis-py exception (raised or an error reply) as kvtier's error."""
    where = f"{redact(url)}: {op}"
    if isinstance(exc, _UNREACHABLE):
        return BackendUnavailableError(f"{where} failed, the server is unavailable: {exc}")
    return BackendError(f"{where} failed: {type(exc).__name__}: {exc}")


def is_wrongtype(reply: object) -> bool:
    """Whether ``reply`` is the server's WRONGTYPE error: the key holds another type
    (a split blob's hash, where a string was asked for)."""
    return isinstance(reply, rex.ResponseError) and str(reply).startswith("WRONGTYPE")
