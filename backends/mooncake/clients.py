"""The process's Mooncake clients: one per settings, shared by the backends that use it.

A Mooncake client is heavy (a transfer engine, polling threads, the segment of memory
it lends to the store), so backends with the same :class:`Settings` share one,
counted by :func:`acquire_client` / :func:`release_client`; the last release closes
it (about 2 s: the library joins its threads holding the GIL). Each backend registers
its :class:`~kvtier.core.buffers.BufferPool`'s memory with the client through a
:class:`PoolRegistrar`, so transfers move bytes straight from and into pool buffers;
memory registered by several backends is registered once and counted.
"""

from __future__ import annotations

import logging
import socket
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from mooncake.store import MooncakeDistributedStore

from kvtier.backends.mooncake import P2P_HANDSHAKE
from kvtier.backends.mooncake.codes import HEALTH_MASTER_UNREACHABLE
from kvtier.core.buffers import Buffer, address_of
from kvtier.core.errors import BackendUnavailableError

log = logging.getLogger(__name__)

_DEFAULT_PORTS = {"http": 80, "https": 443, "etcd": 2379}


@dataclass(frozen=True)
class Settings:
    """What identifies a Mooncake client; backends with equal settings share one."""

    master: str
    metadata_server: str
    local_hostname: str
    protocol: str
    rdma_devices: str
    global_segment_size: int
    local_buffer_size: int


class SharedClient:
    """A connected Mooncake client (``store``) and the memory registered with it."""

    def __init__(self, settings: Settings, store: Any) -> None:
        self.settings = settings
        self.store = store
        self.users = 0
        self._regions: dict[int, list[int]] = {}  # address -> [nbytes, registrations]
        self._lock = threading.RLock()  # a GC finalizer may deregister while held

    def register(self, address: int, nbytes: int) -> None:
        with self._lock:
            region = self._regions.get(address)
            if region is not None:
                region[1] += 1
                return
            code = self.store.register_buffer(address, nbytes)
            if code != 0:
                log.warning("mooncake: registering %d bytes failed (code %d)", nbytes, code)
                return
            self._regions[address] = [nbytes, 1]

    def deregister(self, address: int) -> None:
        with self._lock:
            region = self._regions.get(address)
            if region is None:
                return
            region[1] -= 1
            if region[1] == 0:
                del self._regions[address]
                self.store.unregister_buffer(address)

    def address(self, buf: Buffer) -> int | None:
        """The address of ``buf`` if it lies in registered memory (transfers need no
        copy), else ``None``."""
        try:
            address = address_of(buf.block)
        except TypeError:  # read-only memory: not a pool block
            return None
        with self._lock:
            return address if address in self._regions else None

    def healthy(self) -> Any:
        """The client's store; raises at once if its heartbeat lost the master."""
        if self.store.health_check() == HEALTH_MASTER_UNREACHABLE:
            raise BackendUnavailableError(
                f"mooncake: the master at {self.settings.master} does not answer"
            )
        return self.store


@dataclass
class PoolRegistrar:
    """Registers a pool's blocks with a client (a :class:`MemoryRegistrar`)."""

    client: SharedClient

    def register(self, address: int, nbytes: int) -> None:
        self.client.register(address, nbytes)

    def deregister(self, address: int, nbytes: int) -> None:
        self.client.deregister(address)


_clients: dict[Settings, SharedClient] = {}
_clients_lock = threading.Lock()


def acquire_client(settings: Settings, timeout: float) -> SharedClient:
    """This process's client for ``settings``, connected now if there is none (blocking);
    :class:`BackendUnavailableError` if the master or metadata server cannot be reached
    within ``timeout`` seconds."""
    with _clients_lock:
        client = _clients.get(settings)
        if client is None:
            client = SharedClient(settings, _connect(settings, timeout))
            _clients[settings] = client
        client.users += 1
        return client


def release_client(client: SharedClient) -> None:
    """Stop using ``client``; the last user closes it (blocking)."""
    with _clients_lock:
        client.users -= 1
        if client.users:
            return
        del _clients[client.settings]
    client.store.close()


def _connect(settings: Settings, timeout: float) -> Any:
    _probe(settings.master, "master", timeout)
    if settings.metadata_server != P2P_HANDSHAKE:
        _probe(settings.metadata_server, "metadata server", timeout)
    store = MooncakeDistributedStore()
    code = store.setup(
        settings.local_hostname,
        settings.metadata_server,
        settings.global_segment_size,
        settings.local_buffer_size,
        settings.protocol,
        settings.rdma_devices,
        settings.master,
    )
    if code != 0:
        raise BackendUnavailableError(
            f"mooncake: connecting to the master at {settings.master} failed (code {code}); "
            "check metadata_server, local_hostname and protocol"
        )
    return store


def _probe(address: str, what: str, timeout: float) -> None:
    """Raise :class:`BackendUnavailableError` unless ``address`` (``host:port`` or a URL)
    accepts a connection: Mooncake's ``setup`` would retry an unreachable master for
    90 s, holding the GIL."""
    parts = urlsplit(address if "//" in address else f"//{address}")
    if parts.hostname is None:
        return
    port = parts.port or _DEFAULT_PORTS.get(parts.scheme, 0)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as exc:
        raise BackendUnavailableError(
            f"mooncake: cannot reach the {what} at {address}: {exc}"
        ) from None
