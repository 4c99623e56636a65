"""The ``cpu`` tier: blobs kept in this process's RAM, zero copy, bounded by capacity.

URL: ``cpu://`` or ``cpu://<name>`` (the name only labels the tier). ``put_many`` keeps
the very :class:`~kvtier.core.buffers.Buffer` it is given (one ``retain()``, no copy)
and ``get_many`` hands it back retained, so a hit costs a dictionary lookup. Overwrite,
delete, eviction and ``close()`` drop only this tier's reference: a reader still
holding a returned buffer keeps valid bytes. When a blob does not fit, the eviction
policy picks victims until it does; a blob larger than the whole capacity is rejected
(``False``). Capacity counts ``Buffer.nbytes``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

from kvtier.backends.ram import RamStore, iterate
from kvtier.core.backend import Backend, BackendStats, Capabilities, PutMode
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.errors import ConfigError
from kvtier.core.hookspecs import hookimpl
from kvtier.core.plugins import PluginRegistry
from kvtier.core.specs import BackendSpec

_NAME_RE = re.compile(r"[A-Za-z0-9_-]*")


class MemoryOptions(BaseModel):
    """Options of a ``cpu`` tier."""

    model_config = ConfigDict(extra="forbid")

    eviction: str = "lru"
    """Eviction policy: ``lru``, ``lfu`` or one a plugin registers."""


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if (
        parts.scheme != "cpu"
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or not _NAME_RE.fullmatch(parts.netloc)
    ):
        raise ConfigError(
            f"invalid cpu tier URL {url!r}: write 'cpu://' or 'cpu://<name>' "
            "(a name of letters, digits, '-' and '_')"
        )


class MemoryBackend(Backend):
    """In-process RAM tier: a :class:`~kvtier.backends.ram.RamStore` (thread safe).

    Evicted blobs are handed to ``demotion_sink`` (for a ``write_policy: back`` tier
    below) before this tier lets go of them. :attr:`store` holds the blobs.
    """

    capabilities = Capabilities(
        persistent=False,
        shared=False,
        bounded=True,
        listing=True,
        create_mode=True,
        hands_over_evictions=True,
        verified_reads=True,
    )
    options: MemoryOptions

    def __init__(
        self,
        url: str,
        options: MemoryOptions,
        *,
        capacity: int | None = None,
        pool: BufferPool | None = None,
        registry: PluginRegistry | None = None,
    ) -> None:
        super().__init__(url, options, capacity=capacity, pool=pool, registry=registry)
        _check_url(url)
        if capacity is None:
            raise ConfigError(
                f"the cpu tier {url!r} needs a capacity: set e.g. 'capacity: 2GiB' on the tier"
            )
        if capacity <= 0:
            raise ConfigError(f"the cpu tier {url!r} needs a positive capacity, got {capacity}")
        policy = self.registry.eviction_policy(options.eviction).load()()
        self.store = RamStore(capacity, policy, self._evicted)
        """The blobs; :attr:`RamStore.blobs` is the mapping itself."""

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        return self.store.get_many(keys)

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        return self.store.put_many(items, mode)

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        return self.store.contains_many(keys)

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        return self.store.delete_many(keys)

    def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        """A snapshot of the stored keys taken at the call."""
        return iterate(self.store.keys(prefix))

    async def _stats(self) -> BackendStats:
        return self.store.stats(eviction=self.options.eviction)

    async def _close(self) -> None:
        """Release every stored buffer."""
        self.store.clear()


@hookimpl
def kvtier_backends() -> list[BackendSpec]:
    return [
        BackendSpec(
            name="cpu",
            schemes=("cpu",),
            cls=MemoryBackend,
            options=MemoryOptions,
            description="in-process RAM, zero copy, bounded by capacity",
        )
    ]
