"""Small URL forms shared by several backends."""

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
