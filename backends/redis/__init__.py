"""The ``redis`` tier: chunks in a Redis or Valkey server, standalone or cluster.

URLs (the scheme picks the deployment)::

    redis://[user[:password]@]host[:port][/db]      one server (port 6379, db 0 by default)
    rediss://[user[:password]@]host[:port][/db]     the same over TLS
    unix://[user[:password]@]/path/to/valkey.sock   one server on a Unix socket
    redis+cluster://[user[:password]@]host:port[,host:port...]   a Redis Cluster

Everything else goes in the tier's ``options`` (:class:`RedisOptions`), e.g.::

    - url: redis+cluster://10.0.0.1:6379,10.0.0.2:6379
      options: {key_prefix: "kv:", ttl: 86400, refresh_ttl: true, tls: true,
                ssl_ca_certs: /etc/ssl/ca.pem, username: kvtier, password: "..."}

This module only registers the backend, and its URLs are checked by
:func:`~kvtier.backends.redis.url.parse_url`: redis-py is imported when a tier is built
(``kvtier.backends.redis.backend``), so without it a bad URL is still named, and a good
one says ``pip install 'kvtier[redis]'``.

The package: ``url`` (URLs, no redis-py), ``client`` (the redis-py client, checks at
open, error translation), ``transport`` (batches as pipelines; the version-checked fast
path), ``resp`` (its RESP2 packing and parsing into pool buffers), ``split`` (blobs
over the server's value size), ``listing`` (SCAN, sizes and ``INFO`` for listing and
stats), ``pins`` (ages and pins) and ``backend`` (the tier).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvtier.backends.redis.url import SCHEMES, parse_url
from kvtier.core.config import ByteSize, Secret
from kvtier.core.hookspecs import hookimpl
from kvtier.core.specs import BackendSpec


class RedisOptions(BaseModel):
    """Options of a ``redis`` tier."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    key_prefix: str = "kvtier:"
    """Prefix of every key this tier writes: chunk ``K`` is stored as ``<key_prefix>{K}``."""
    ttl: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds a chunk lives after it is written; ``None``: until deleted or evicted by
    the server's ``maxmemory-policy``."""
    refresh_ttl: bool = False
    """A hit restarts the chunk's ``ttl`` (``GETEX``)."""
    pinned_bytes: ByteSize = 0
    """Bytes of chunks this process may pin (their expiry removed: never expired, nor
    evicted under a ``volatile-*`` ``maxmemory-policy``); needs ``ttl`` without
    ``refresh_ttl`` (:mod:`~kvtier.backends.redis.pins`)."""
    username: str | None = None
    """ACL user (or give it in the URL)."""
    password: Secret | None = None
    """Password of the ACL user or ``requirepass`` (or give it in the URL)."""
    db: int | None = Field(default=None, ge=0)
    """Database number (or give it as the URL path); clusters have only db 0."""
    tls: bool = False
    """Use TLS; implied by ``rediss://``, the way to enable it for ``redis+cluster://``."""
    ssl_ca_certs: str | None = None
    """CA bundle (PEM file) that verifies the server's certificate."""
    ssl_certfile: str | None = None
    """Client certificate (PEM file) for servers that require one."""
    ssl_keyfile: str | None = None
    """Private key of ``ssl_certfile``."""
    ssl_cert_reqs: Literal["required", "optional", "none"] = "required"
    """Whether the server's certificate must verify."""
    ssl_check_hostname: bool = True
    """Whether the server's certificate must name the host in the URL."""
    max_connections: int = Field(default=16, ge=1, le=4096)
    """Connections this tier opens at most (per node in a cluster)."""
    parallel: int = Field(default=4, ge=1)
    """Connections one batch uses at once; each carries a pipeline of its share of the
    batch."""
    max_value_bytes: ByteSize | None = Field(default=None, ge=1)
    """Largest blob stored as one value; larger blobs are split into parts of this size
    and published atomically as one hash. ``None``: the server's ``proto-max-bulk-len``
    (512 MiB when the server does not say)."""
    socket_timeout: float = Field(default=30.0, gt=0, allow_inf_nan=False)
    """Seconds one read or write on a connection may block (the tier's ``timeout``
    bounds whole operations)."""
    connect_timeout: float = Field(default=5.0, gt=0, allow_inf_nan=False)
    """Seconds to open a connection."""
    retries: int = Field(default=1, ge=0, le=10)
    """Immediate retries of a command after a connection error (a pooled connection the
    server dropped fails once, then a fresh one is used)."""

    @field_validator("key_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if "{" in value or "}" in value:
            raise ValueError(
                f"key_prefix {value!r} must not contain '{{' or '}}': the tier wraps each "
                "chunk key in braces to use it as the cluster hash tag"
            )
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RedisOptions:
        if self.refresh_ttl and self.ttl is None:
            raise ValueError("refresh_ttl needs a ttl to refresh; set ttl (seconds)")
        if self.pinned_bytes and (self.ttl is None or self.refresh_ttl):
            raise ValueError(
                "pinned_bytes needs a ttl without refresh_ttl: a pin removes a chunk's "
                "expiry, which a tier without a ttl never sets and a hit's GETEX restores"
            )
        if self.parallel > self.max_connections:
            raise ValueError(
                f"parallel ({self.parallel}) exceeds max_connections ({self.max_connections}); "
                "raise max_connections or lower parallel"
            )
        return self


@hookimpl
def kvtier_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="redis",
            schemes=SCHEMES,
            cls="kvtier.backends.redis.backend:RedisBackend",
            options=RedisOptions,
            check_url=parse_url,
            extra="redis",
            description="Redis or Valkey server or cluster (redis-py asyncio)",
        )
    ]
