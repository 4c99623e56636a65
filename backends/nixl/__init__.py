"""The ``nixl`` tier: RAM of this process that peers read directly through NIXL.

URL: ``nixl://`` or ``nixl://<group>``. Each kvtier instance with this tier holds its
own bounded RAM store (like ``cpu://``) whose pool memory is registered with a NIXL
agent (UCX backend). A shared index (Redis or Valkey) maps every stored chunk key to
the agent holding it and its address and length, so a peer in the same group that
misses a chunk locally reads it straight from the owner's memory (one-sided READ) and
verifies it. Groups are separate namespaces in one index. Example tier::

    - url: nixl://prefill-pool
      capacity: 20GiB
      options:
        index: redis://127.0.0.1:6379/0
        ttl: 10                    # a dead owner's entries vanish after this long
        transfer_timeout: 2        # a peer that does not answer in time is a miss

Security: by default UCX uses loopback only (``net_devices: lo``), so it listens on
127.0.0.1 and only processes of this host (allowed to ptrace this one: same user or
root) can read its memory. The index holds what a peer needs to read this process's
pool memory: protect it like the cache itself (password, TLS, private network).

This module registers the tier and validates its options without importing NIXL or
redis; the implementation (:mod:`kvtier.backends.nixl.backend`) needs
``pip install 'kvtier[nixl]'``.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvtier.core.config import ByteSize
from kvtier.core.hookspecs import hookimpl
from kvtier.core.specs import BackendSpec
from kvtier.core.urls import name_from_url, redact

INDEX_SCHEMES = ("redis", "rediss", "unix")
_DEVICES_RE = re.compile(r"[A-Za-z0-9_.:,-]+")


class NixlOptions(BaseModel):
    """Options of the ``nixl`` tier."""

    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # index: URL

    index: str
    """URL of the Redis/Valkey index shared by the group: ``redis://host:port/db``,
    ``rediss://...`` (TLS) or ``unix:///path/redis.sock``."""
    eviction: str = "lru"
    """Eviction policy of the local store: ``lru``, ``lfu`` or one a plugin registers."""
    ttl: float = Field(default=10.0, le=3600, allow_inf_nan=False)
    """Seconds this agent's index entries outlive its last heartbeat (sent every
    ``ttl / 3``): peers stop asking a dead process after at most this long. Not the
    chunks' lifetime: that is ``chunk_ttl``."""
    chunk_ttl: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds a chunk of this process's store lives after it was written: then a
    miss, removed when met and by a sweep (:mod:`kvtier.backends.expiring`); ``None``:
    until evicted. (``ttl`` is the index heartbeat's, not the chunks'.)"""
    pinned_bytes: ByteSize = 0
    """Bytes of this process's store that ``pin_many`` may pin (never evicted nor
    expired, so peers can read them while this process lives); at most the capacity."""
    transfer_timeout: float = Field(default=2.0, gt=0, le=600, allow_inf_nan=False)
    """Seconds a batch of peer reads may take; slower reads are misses. Keep it below
    the tier's ``timeout``."""
    concurrency: int = Field(default=2, ge=1, le=64)
    """Peer reads in flight at once (one NIXL transfer each). The tier runs twice as
    many worker threads, so that verifying what one read moved overlaps the next."""
    progress_thread: bool = False
    """Answer peers from NIXL's progress thread (at once, event driven) instead of a
    poller every 20 ms (about 1% of a core). Peers read this process's memory without
    its help (CMA on one host, RDMA across hosts) once connected; over TCP (other
    hosts, no RDMA) every transfer needs it: turn it on there. It slowed this
    process's own reads by ~20% on loopback."""
    net_devices: str = "lo"
    """UCX network devices of the agent (``UCX_NET_DEVICES`` while it is created):
    ``lo`` (default) keeps it on loopback, for peers on this host; name the NIC
    (``mlx5_0:1``, ``eth0``) or ``all`` for peers on other hosts."""

    @field_validator("ttl")
    @classmethod
    def _check_heartbeat(cls, value: float) -> float:
        if value < 0.5:
            raise ValueError(
                f"ttl is the index heartbeat's lifetime (at least 0.5 s), got {value}; "
                "for how long chunks live, set chunk_ttl"
            )
        return value

    @field_validator("index")
    @classmethod
    def _check_index(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in INDEX_SCHEMES or not (parts.hostname or parts.path):
            raise ValueError(
                "index must be a Redis/Valkey URL such as redis://127.0.0.1:6379/0, "
                f"rediss://host:6380/0 or unix:///run/redis.sock; got {redact(value)!r}"
            )
        return value

    @field_validator("net_devices")
    @classmethod
    def _check_devices(cls, value: str) -> str:
        if not _DEVICES_RE.fullmatch(value):
            raise ValueError(
                f"net_devices is a comma-separated list of UCX devices (lo, eth0, "
                f"mlx5_0:1) or 'all'; got {value!r}"
            )
        return value


def group_from_url(url: str) -> str:
    """The group of ``nixl://<group>`` (``"default"`` for ``nixl://``)."""
    hint = "; the index goes in options.index"
    return name_from_url(url, "nixl", what="group", hint=hint) or "default"


@hookimpl
def kvtier_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="nixl",
            schemes=("nixl",),
            cls="kvtier.backends.nixl.backend:NixlBackend",
            options=NixlOptions,
            check_url=group_from_url,
            extra="nixl",
            description="RAM shared with peer processes: direct NIXL reads, Redis index",
        )
    ]
