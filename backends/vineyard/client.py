"""The vineyard client: importing it, connecting to vineyardd, translating its errors.

vineyard 0.24.2 imports ``pkg_resources`` (setuptools before 82, which the extra pins)
and warns that it is deprecated; that warning is silenced here, once. Its Python client
(a C++ client behind pybind11) is thread safe, serialises requests on one connection,
and holds the GIL during most round trips (about 50 us each on a Unix socket).
"""

from __future__ import annotations

import socket
import threading
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from kvtier.backends.vineyard.url import Target
from kvtier.core.errors import BackendError, BackendUnavailableError

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
    import vineyard
    from vineyard import ObjectID, ObjectMeta, RemoteBlobBuilder
    from vineyard.core.client import Client

__all__ = ["Client", "Connection", "ObjectID", "ObjectMeta", "RemoteBlobBuilder"]

T = TypeVar("T")

UNREACHABLE: tuple[type[BaseException], ...] = (
    vineyard.ConnectionErrorException,
    vineyard.ConnectionFailedException,
    vineyard.IOErrorException,
    vineyard.VineyardServerNotReadyException,
    ConnectionError,
    TimeoutError,
)
"""Errors meaning vineyardd cannot be reached (stopped, restarted, socket gone)."""
MISSING: tuple[type[BaseException], ...] = (
    vineyard.ObjectNotExistsException,
    vineyard.MetaTreeSubtreeNotExistsException,
)
"""Errors meaning an object or name is not there: a miss, never a failure."""
FULL = vineyard.NotEnoughMemoryException
"""vineyardd's shared memory (``--size``) cannot hold another blob."""
VINEYARD_ERRORS: tuple[type[BaseException], ...] = (vineyard._C.VineyardException,)
"""Every error vineyard's client raises (they derive from ``RuntimeError``)."""


def version() -> str:
    return str(vineyard.__version__)


def reachable(target: Target, timeout: float) -> bool:
    """Whether vineyardd accepts a connection at ``target`` right now.

    vineyard's own connect retries a refused socket ten times, a second apart; this
    answers at once, so an outage is reported without that wait.
    """
    if target.socket is not None:
        family: int = socket.AF_UNIX
        address: Any = target.socket
    else:
        family, address = socket.AF_INET, (target.host, target.port)
    try:
        if family == socket.AF_INET:
            probe = socket.create_connection(address, timeout=timeout)
        else:
            probe = socket.socket(family, socket.SOCK_STREAM)
            probe.settimeout(timeout)
            probe.connect(address)
        probe.close()
        return True
    except OSError:
        return False


def connect(target: Target, timeout: float, compression: bool) -> Client:
    """A connected client (blocking); :class:`BackendUnavailableError` if vineyardd does
    not answer."""
    if not reachable(target, timeout):
        raise BackendUnavailableError(f"vineyard {target}: vineyardd does not accept connections")
    try:
        if target.socket is not None:
            client = vineyard.connect(target.socket)
        else:
            client = vineyard.connect(target.host, target.port)
            client.compression = compression
    except UNREACHABLE as exc:
        raise BackendUnavailableError(f"vineyard {target}: cannot connect: {exc}") from exc
    except VINEYARD_ERRORS as exc:
        raise BackendError(f"vineyard {target}: cannot connect: {exc}") from exc
    return client


class Connection:
    """One client to one vineyardd, reconnected after an outage.

    :meth:`call` runs a blocking function of the client and translates vineyard's
    errors; when vineyardd went away it drops the client, and the next call connects
    again (failing at once while vineyardd is down).
    """

    def __init__(self, target: Target, timeout: float, compression: bool) -> None:
        self.target = target
        self.timeout = timeout
        self.compression = compression
        self._client: Client | None = None
        self._lock = threading.Lock()
        self.generation = 0
        """Counts connections made: objects of an older generation are in a vineyardd
        that has restarted (its objects are gone)."""

    def client(self) -> Client:
        """The connected client, connecting first if needed (blocking)."""
        with self._lock:
            if self._client is None or not self._client.connected:
                self._client = connect(self.target, self.timeout, self.compression)
                self.generation += 1
            return self._client

    def call(self, op: str, fn: Callable[[Client], T]) -> T:
        """``fn(client)``; vineyard errors become :class:`BackendUnavailableError` (vineyardd
        unreachable) or :class:`BackendError` (anything else it refused)."""
        client = self.client()
        try:
            return fn(client)
        except UNREACHABLE as exc:
            self.drop(client)
            raise BackendUnavailableError(f"vineyard {self.target}: {op}: {exc}") from exc
        except VINEYARD_ERRORS as exc:
            raise BackendError(f"vineyard {self.target}: {op} failed: {exc}") from exc

    def drop(self, client: Client) -> None:
        """Forget ``client`` (vineyardd went away); the next call reconnects."""
        with self._lock:
            if self._client is client:
                self._client = None

    def close(self) -> None:
        """Forget the client. It is not disconnected: vineyard's Python client keeps one
        connection per socket and process, shared by every user of it in the process
        (disconnecting it would cut them off), and views of its shared memory need its
        mapping."""
        with self._lock:
            self._client = None
