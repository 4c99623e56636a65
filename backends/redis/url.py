"""Redis tier URLs: what server a URL names.

Needs no redis-py: the plugin checks URLs with :func:`parse_url` before the backend
(and its client library) is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from kvtier.core.errors import ConfigError
from kvtier.core.urls import redact

FORMS = {
    "redis": "redis://[user[:password]@]host[:port][/db]",
    "rediss": "rediss://[user[:password]@]host[:port][/db]",
    "unix": "unix://[user[:password]@]/path/to/valkey.sock",
    "redis+cluster": "redis+cluster://[user[:password]@]host:port[,host:port...]",
}
"""The form of each scheme's URL, quoted in errors."""
SCHEMES = tuple(FORMS)
DEFAULT_PORT = 6379


@dataclass(frozen=True)
class Target:
    """Where a tier's server is, parsed from its URL."""

    scheme: str
    nodes: tuple[tuple[str, int], ...] = ()
    """``(host, port)`` of the server, or the cluster's seed nodes."""
    path: str | None = None
    """Unix socket path."""
    db: int | None = None
    username: str | None = None
    password: str | None = None

    @property
    def cluster(self) -> bool:
        return self.scheme == "redis+cluster"


def _bad(url: str, scheme: str, problem: str) -> ConfigError:
    form = FORMS.get(scheme, " or ".join(FORMS.values()))
    return ConfigError(
        f"invalid redis tier URL {redact(url)!r}: {problem}; write it as {form} "
        "and put everything else in the tier's 'options'"
    )


def _host_port(url: str, scheme: str, text: str, default_port: int | None) -> tuple[str, int]:
    if text.startswith("["):  # [IPv6 address]:port
        host, _, rest = text[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise _bad(url, scheme, f"{text!r} names no host")
    if not port_text:
        if default_port is None:
            raise _bad(url, scheme, f"cluster node {text!r} needs a port")
        return host, default_port
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise _bad(url, scheme, f"port {port_text!r} is not a number from 1 to 65535")
    return host, int(port_text)


def _credentials(parts: SplitResult) -> tuple[str | None, str | None]:
    userinfo, at, _ = parts.netloc.rpartition("@")
    if not at:
        return None, None
    user, colon, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) if colon else None


def parse_url(url: str) -> Target:
    """The server a ``redis``/``rediss``/``unix``/``redis+cluster`` URL names;
    :class:`ConfigError` naming the problem and the URL's form otherwise."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in FORMS:
        raise _bad(url, scheme, f"unknown scheme {scheme!r}")
    if parts.query or parts.fragment:
        raise _bad(url, scheme, "it has a query or fragment")
    username, password = _credentials(parts)
    location = parts.netloc.rpartition("@")[2]
    if scheme == "unix":
        if location or not parts.path.startswith("/"):
            raise _bad(url, scheme, "the socket path must be absolute (three slashes)")
        return Target(scheme, path=unquote(parts.path), username=username, password=password)
    if not location:
        raise _bad(url, scheme, "it names no host")
    db_text = parts.path.strip("/")
    if db_text and not db_text.isdigit():
        raise _bad(url, scheme, f"the path {parts.path!r} is not a database number")
    db = int(db_text) if db_text else None
    if scheme == "redis+cluster":
        if db:
            raise _bad(url, scheme, "a cluster has only database 0")
        nodes = tuple(_host_port(url, scheme, n, None) for n in location.split(","))
    else:
        if "," in location:
            raise _bad(url, scheme, "several hosts are a cluster: use redis+cluster://")
        nodes = (_host_port(url, scheme, location, DEFAULT_PORT),)
    return Target(scheme, nodes=nodes, db=db, username=username, password=password)
