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
import threading
from collections.abc import AsyncIterator, Iterable
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict

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


async def _iterate(keys: Iterable[str]) -> AsyncIterator[str]:
    for key in keys:
        yield key


class MemoryBackend(Backend):
    """In-process RAM tier; thread safe (one lock around the index and policy).

    Evicted blobs are handed to ``demotion_sink`` (for a ``write_policy: back`` tier
    below) before this tier lets go of them.
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
        self._capacity = capacity
        self._eviction = options.eviction
        self._policy = self.registry.eviction_policy(options.eviction).load()()
        self._blobs: dict[str, Buffer] = {}
        self._lock = threading.Lock()
        self._bytes = 0
        self._evictions = 0
        self._rejected = 0
        self._hits = 0
        self._misses = 0

    def _drop(self, key: str) -> int:
        """Forget stored ``key`` and release its buffer; returns its size. Call under the lock."""
        buf = self._blobs.pop(key)
        self._policy.remove(key)
        self._bytes -= buf.nbytes
        buf.release()
        return buf.nbytes

    async def _get_unique(self, keys: list[str]) -> list[Buffer | None]:
        out: list[Buffer | None] = []
        with self._lock:
            for key in keys:
                buf = self._blobs.get(key)
                if buf is None:
                    self._misses += 1
                    out.append(None)
                else:
                    self._hits += 1
                    self._policy.touch(key)
                    out.append(buf.retain())
        return out

    async def _put_unique(self, items: list[tuple[str, Buffer]], mode: PutMode) -> list[bool]:
        results: list[bool] = []
        evicted: list[tuple[str, int]] = []
        handed: list[Buffer] = []
        with self._lock:
            for key, buf in items:
                exists = key in self._blobs
                if exists and mode is PutMode.CREATE:
                    results.append(False)
                    continue
                if buf.nbytes > self._capacity:
                    self._rejected += 1
                    results.append(False)
                    continue
                buf.retain()
                if exists:
                    self._drop(key)
                while self._bytes + buf.nbytes > self._capacity:
                    victim = self._policy.victim()
                    assert victim is not None, "policy is empty while bytes are in use"
                    handed.append(self._blobs[victim].retain())
                    evicted.append((victim, self._drop(victim)))
                self._blobs[key] = buf
                self._bytes += buf.nbytes
                self._policy.insert(key)
                results.append(True)
            self._evictions += len(evicted)
        self._evicted(evicted, handed)
        return results

    async def _contains_unique(self, keys: list[str]) -> list[bool]:
        with self._lock:
            return [key in self._blobs for key in keys]

    async def _delete_unique(self, keys: list[str]) -> list[bool]:
        with self._lock:
            results = []
            for key in keys:
                exists = key in self._blobs
                if exists:
                    self._drop(key)
                results.append(exists)
            return results

    def _iter_keys(self, prefix: str) -> AsyncIterator[str]:
        """A snapshot of the stored keys taken at the call."""
        with self._lock:
            return _iterate([key for key in self._blobs if key.startswith(prefix)])

    async def _stats(self) -> BackendStats:
        with self._lock:
            return BackendStats(
                keys=len(self._blobs),
                bytes_used=self._bytes,
                capacity_bytes=self._capacity,
                evictions=self._evictions,
                details={
                    "eviction": self._eviction,
                    "hits": self._hits,
                    "misses": self._misses,
                    "rejected": self._rejected,
                },
            )

    async def _close(self) -> None:
        """Release every stored buffer."""
        with self._lock:
            blobs, self._blobs = self._blobs, {}
            for key in blobs:
                self._policy.remove(key)
            self._bytes = 0
        for buf in blobs.values():
            buf.release()


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
