"""The ``mooncake`` tier: chunks in a Mooncake Store, moved zero copy into pool buffers.

URL: ``mooncake://<master host>:<rpc port>`` (port 50051 when omitted). A Mooncake
Store is a master that places objects plus clients that lend memory to hold them
(their global segments) and move bytes directly between each other (TCP or RDMA).
Each process using this tier is such a client. Example tier::

    - url: mooncake://10.0.0.5:50051
      options:
        metadata_server: http://10.0.0.5:8080/metadata   # or etcd://..., P2PHANDSHAKE
        local_hostname: 10.0.0.7        # how other clients reach this one
        global_segment_size: 4GiB       # memory this process lends to the store
        replica_num: 1
        admin_url: http://10.0.0.5:9003 # the master's HTTP port: listing and stats

This module registers the tier and validates its options without importing Mooncake;
the implementation (:mod:`kvtier.backends.mooncake.backend`) needs
``pip install 'kvtier[mooncake]'``.
"""

from __future__ import annotations

import re
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kvtier.core.config import ByteSize
from kvtier.core.errors import ConfigError
from kvtier.core.hookspecs import hookimpl
from kvtier.core.specs import BackendSpec

DEFAULT_MASTER_PORT = 50051
P2P_HANDSHAKE = "P2PHANDSHAKE"
"""``metadata_server`` value for Mooncake's metadata exchange without a server."""
_METADATA_SCHEMES = ("http", "https", "etcd")
_HOST = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?|[0-9A-Fa-f:.]+")
"""A host name or an IPv4/IPv6 address, as ``local_hostname`` is given to Mooncake."""


class MooncakeOptions(BaseModel):
    """Options of the ``mooncake`` tier.

    The store's size is the sum of its clients' segments and its master evicts
    (approximate LRU at a high watermark): the tier's ``capacity`` is not used.
    """

    model_config = ConfigDict(extra="forbid")

    metadata_server: str
    """Where clients exchange transfer metadata: ``http://host:port/metadata`` (Mooncake's
    HTTP metadata server), ``etcd://host:port`` or ``P2PHANDSHAKE``."""
    local_hostname: str = Field(default="127.0.0.1", min_length=1)
    """Address other clients use to reach this process; the host's IP when the store
    spans hosts (the default only serves clients on this host)."""
    protocol: Literal["tcp", "rdma"] = "tcp"
    rdma_devices: str = ""
    """RDMA devices for ``protocol: rdma``, e.g. ``mlx5_0,mlx5_1``."""
    global_segment_size: ByteSize = 512 << 20
    """Memory this process lends to the store (its data leaves the store when this
    process closes the tier); 0: use only other clients' memory."""
    local_buffer_size: ByteSize = 0
    """Mooncake's staging buffer for copying calls; kvtier moves data zero copy."""
    replica_num: int = Field(default=1, ge=1, le=64)
    """Copies of each chunk, in different clients' segments."""
    soft_pin: bool = False
    """Soft-pin written chunks: the master evicts them after unpinned ones."""
    soft_pin_ttl: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds a soft pin lasts (needs ``soft_pin``); ``None``: the master's default."""
    pinned_bytes: ByteSize = 0
    """Bytes of chunks this process may pin (rewritten hard pinned: the master never
    evicts them; :mod:`~kvtier.backends.mooncake.pins`)."""
    ttl: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds a chunk lives after this process wrote or first met it: then a miss,
    removed when met and by a sweep (:mod:`kvtier.backends.expiring`); ``None``: forever."""
    admin_url: str | None = None
    """``http://host:port`` of the master's HTTP server (its ``-metrics_port``): needed
    by ``iter_keys`` and adds store-wide counters to ``stats()``."""
    threads: int = Field(default=4, ge=1, le=64)
    """Blocking client calls in flight at once (one thread each)."""
    connect_timeout: float = Field(default=5.0, gt=0, le=600, allow_inf_nan=False)
    """Seconds ``open()`` waits for the master and metadata server to accept a connection."""

    @field_validator("metadata_server")
    @classmethod
    def _check_metadata_server(cls, value: str) -> str:
        if value == P2P_HANDSHAKE:
            return value
        parts = urlsplit(value)
        if parts.scheme not in _METADATA_SCHEMES or not parts.hostname:
            raise ValueError(
                "metadata_server must be http://host:port/metadata (mooncake_http_metadata_"
                f"server), etcd://host:port or {P2P_HANDSHAKE}; got {value!r}"
            )
        parts.port  # noqa: B018  ValueError for a port out of range
        return value

    @field_validator("local_hostname")
    @classmethod
    def _check_local_hostname(cls, value: str) -> str:
        if not _HOST.fullmatch(value):
            raise ValueError(
                f"local_hostname must be an IP address or a host name (letters, digits, '-' "
                f"and '.'), got {value!r}"
            )
        return value

    @field_validator("admin_url")
    @classmethod
    def _check_admin_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/"):
            raise ValueError(
                f"admin_url must be http://host:port (the master's -metrics_port), got {value!r}"
            )
        parts.port  # noqa: B018  ValueError for a port out of range
        return value.rstrip("/")

    @model_validator(mode="after")
    def _check_pins(self) -> MooncakeOptions:
        if self.soft_pin_ttl is not None and not self.soft_pin:
            raise ValueError("soft_pin_ttl needs soft_pin: true")
        if self.rdma_devices and self.protocol != "rdma":
            raise ValueError("rdma_devices needs protocol: rdma")
        return self


def parse_mooncake_url(url: str) -> str:
    """The master address ``host:port`` of ``mooncake://host[:port]``; :class:`ConfigError`
    for anything else."""
    hint = "write it as mooncake://<master host>:<rpc port>, e.g. mooncake://127.0.0.1:50051"
    parts = urlsplit(url)
    if parts.scheme.lower() != "mooncake":
        raise ConfigError(f"{url!r} is not a mooncake URL; {hint}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or "@" in parts.netloc:
        raise ConfigError(
            f"{url!r} has a path, query, fragment or user; put settings in 'options': {hint}"
        )
    try:
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ConfigError(f"{url!r}: {exc}; {hint}") from None
    if not host:
        raise ConfigError(f"{url!r} names no master host; {hint}")
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{port if port is not None else DEFAULT_MASTER_PORT}"


@hookimpl
def kvtier_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="mooncake",
            schemes=("mooncake",),
            cls="kvtier.backends.mooncake.backend:MooncakeBackend",
            options=MooncakeOptions,
            check_url=parse_mooncake_url,
            extra="mooncake",
            description="a Mooncake Store (master + clients lending memory), zero copy",
        )
    ]
