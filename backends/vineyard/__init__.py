"""The ``vineyard`` tier: chunks in a Vineyard (v6d) server's shared memory.

URLs::

    vineyard:///run/vineyard.sock   vineyardd's IPC socket: this host; reads are zero copy
    vineyard://10.0.0.5:9600        vineyardd's RPC endpoint: any host; bytes are copied

Every process on a host that opens the same socket shares the tier: a chunk one vLLM
worker stores is a hit for the scheduler and every other worker. Example tier::

    - url: vineyard:///run/vineyard.sock
      capacity: 8GiB                 # this tier's chunks in vineyardd, all processes together
      options: {key_prefix: "kvtier/llama3/"}

Start vineyardd with ``--socket=PATH --size=SIZE --meta=local`` (``--meta=etcd`` with
``--etcd_endpoint`` for several hosts) and, unless remote hosts use RPC, ``--rpc=false``:
vineyardd has no option to bind its RPC port to one address, and listens on every
interface otherwise.

This module registers the tier and checks its URL and options without importing
vineyard; the implementation needs ``pip install 'kvtier[vineyard]'``. The package:
``url`` (URLs), ``client`` (connecting, errors), ``names`` (the naming scheme),
``objects`` (one chunk as vineyard objects), ``leases`` (zero-copy views and the pins
that keep them valid), ``reclaim`` (deleting what nobody reads, eviction) and
``backend`` (the tier).
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from kvtier.backends.vineyard.url import parse_url
from kvtier.core.config import ByteSize
from kvtier.core.hookspecs import hookimpl
from kvtier.core.specs import BackendSpec

_PREFIX_RE = re.compile(r"[A-Za-z0-9_.\-/]{1,128}")


class VineyardOptions(BaseModel):
    """Options of a ``vineyard`` tier."""

    model_config = ConfigDict(extra="forbid")

    key_prefix: str = "kvtier/"
    """Namespace of this tier's names in vineyardd: chunk ``K`` is the object named
    ``<key_prefix>k/K``. Tiers (or tenants) sharing a vineyardd use different prefixes,
    and each counts its own chunks against its ``capacity``."""
    threads: int = Field(default=4, ge=1, le=64)
    """Blocking client calls in flight at once (one thread each)."""
    connect_timeout: float = Field(default=5.0, gt=0, le=600, allow_inf_nan=False)
    """Seconds to reach vineyardd's socket or RPC port."""
    evict_to: float = Field(default=0.9, gt=0, le=1, allow_inf_nan=False)
    """When a write would take the tier over its capacity, the oldest chunks are
    deleted until it is at most this fraction of it (one listing per eviction round)."""
    reclaim_after: float = Field(default=60.0, gt=0, allow_inf_nan=False)
    """Seconds after which a chunk object no name reaches (a writer died between writing
    and naming it) is deleted by the next sweep."""
    pinned_bytes: ByteSize = 0
    """Bytes of this tier's chunks that may be pinned, all processes together (never
    evicted nor expired; :mod:`~kvtier.backends.vineyard.pins`); at most the capacity."""
    ttl: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Seconds a chunk lives after this process wrote or first met it: then a miss,
    removed when met and by a sweep (:mod:`kvtier.backends.expiring`); ``None``: forever."""
    rpc_compression: bool = False
    """Let vineyard compress bytes sent over RPC (KV data compresses poorly)."""

    @field_validator("key_prefix")
    @classmethod
    def _plain_prefix(cls, value: str) -> str:
        if not _PREFIX_RE.fullmatch(value) or not value.endswith("/"):
            raise ValueError(
                f"key_prefix {value!r} must be 1-128 letters, digits, '_', '.', '-' or '/' "
                "and end with '/' (it heads names that are matched with wildcards)"
            )
        return value


@hookimpl
def kvtier_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="vineyard",
            schemes=("vineyard",),
            cls="kvtier.backends.vineyard.backend:VineyardBackend",
            options=VineyardOptions,
            check_url=parse_url,
            extra="vineyard",
            description="Vineyard (v6d) shared memory: zero-copy reads on the host, RPC across",
        )
    ]
