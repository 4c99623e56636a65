"""``vineyard://`` tier URLs: which vineyardd a URL names, and how it is reached.

Needs no vineyard: the plugin checks URLs with :func:`parse_url` before the backend
(and its client library) is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from kvtier.core.errors import ConfigError

FORMS = "vineyard:///path/to/vineyard.sock (IPC, same host) or vineyard://host:port (RPC)"
"""The two forms of the URL, quoted in errors."""


@dataclass(frozen=True)
class Target:
    """Where a tier's vineyardd is: its IPC socket, or its RPC endpoint."""

    socket: str | None = None
    """Absolute path of the IPC socket (``vineyardd --socket``)."""
    host: str | None = None
    port: int | None = None
    """The RPC endpoint (``vineyardd --rpc_socket_port``)."""

    @property
    def ipc(self) -> bool:
        return self.socket is not None

    def __str__(self) -> str:
        return self.socket if self.socket is not None else f"{self.host}:{self.port}"


def _bad(url: str, problem: str) -> ConfigError:
    return ConfigError(
        f"invalid vineyard tier URL {url!r}: {problem}; write it as {FORMS} "
        "and put everything else in the tier's 'options'"
    )


def parse_url(url: str) -> Target:
    """The vineyardd that ``vineyard:///socket`` or ``vineyard://host:port`` names;
    :class:`ConfigError` naming the problem and the URL's forms otherwise."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "vineyard":
        raise _bad(url, f"the scheme is {parts.scheme!r}, not 'vineyard'")
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise _bad(url, "it has a query, fragment or user")
    if not parts.netloc:
        path = unquote(parts.path)
        if not path.startswith("/") or path.endswith("/"):
            raise _bad(url, "the IPC socket path must be absolute (three slashes) and name a file")
        return Target(socket=path)
    if parts.path not in ("", "/"):
        raise _bad(url, "an RPC endpoint has no path (a socket path needs three slashes)")
    host, port_text = parts.hostname, parts.netloc.rpartition(":")[2]
    if not host or ":" not in parts.netloc:
        raise _bad(url, "an RPC endpoint needs host:port (vineyardd's --rpc_socket_port)")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, f"port {port_text!r} is not a number from 1 to 65535")
    return Target(host=host, port=int(port_text))
