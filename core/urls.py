"""URLs: forms shared by several backends, and how to show any URL without its secrets."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from kvtier.core.errors import ConfigError

_NAME_RE = re.compile(r"[A-Za-z0-9_-]{0,64}")


def name_from_url(url: str, scheme: str, *, what: str, hint: str = "") -> str:
    """The ``<name>`` of ``<scheme>://<name>`` (``""`` for ``<scheme>://``): up to 64
    letters, digits, ``-`` and ``_``, and nothing else in the URL. :class:`ConfigError`
    naming the form otherwise; ``hint`` ends that message."""
    parts = urlsplit(url)
    if (
        parts.scheme != scheme
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
        or not _NAME_RE.fullmatch(parts.netloc)
    ):
        raise ConfigError(
            f"invalid {scheme} tier URL {url!r}: write '{scheme}://' or '{scheme}://<{what}>' "
            f"(a {what} of up to 64 letters, digits, '-' and '_'{hint})"
        )
    return parts.netloc


_SECRET_NAME = re.compile(r"pass|pwd|secret|token|key|credential|auth|sig|session", re.IGNORECASE)
MASK = "***"


def redact(url: str) -> str:
    """``url`` for messages, logs and stats: the password of its userinfo and the values
    of query parameters named like credentials (``password``, ``secret_key``,
    ``token``, ...) replaced by ``***``.

    Made for URLs as people write them, which may hold unescaped ``#``, ``/``, ``?``,
    ``@`` or ``:`` in a password: the userinfo runs to the last ``@``, so no part of a
    password survives. It errs on the side of hiding. Safe on any string; control
    characters come out escaped (``\\x00``), so that a URL cannot forge log lines.
    """
    url = _printable(url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        rest = f"{user}{colon and ':' + MASK}@{rest}"
    head, question, query = rest.partition("?")
    if question:
        params = []
        for param in query.split("&"):
            name, equals, _ = param.partition("=")
            params.append(f"{name}={MASK}" if equals and _SECRET_NAME.search(name) else param)
        rest = f"{head}?{'&'.join(params)}"
    return f"{scheme}://{rest}"


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _secrets(url: str) -> list[str]:
    """The secret parts of ``url`` that :func:`redact` hides: its userinfo's password
    and the values of query parameters named like credentials."""
    _, sep, rest = url.partition("://")
    if not sep:
        return []
    found = []
    if "@" in rest:
        userinfo, _, rest = rest.rpartition("@")
        found.append(userinfo.partition(":")[2])
    for param in rest.partition("?")[2].split("&"):
        name, _, value = param.partition("=")
        if _SECRET_NAME.search(name):
            found.append(value)
    return [secret for secret in found if secret]


MIN_SCRUBBED = 4
"""Shorter secrets are hidden where they stand in the URL, not wherever they occur (a
one-letter password would otherwise blank out every instance of that letter)."""


def scrub(message: str, url: str) -> str:
    """``message`` (about ``url``, which it may quote whole or in part) with the URL's
    secrets replaced by ``***``: the whole URL by its :func:`redact` form, its userinfo
    by the redacted userinfo, and any other occurrence of a secret of
    :data:`MIN_SCRUBBED` characters or more."""
    message = message.replace(url, redact(url))
    _, _, rest = url.partition("://")
    userinfo = rest.rpartition("@")[0]
    if ":" in userinfo:
        message = message.replace(userinfo, f"{userinfo.partition(':')[0]}:{MASK}")
    for secret in _secrets(url):
        if len(secret) >= MIN_SCRUBBED:
            message = message.replace(secret, MASK)
    return message
