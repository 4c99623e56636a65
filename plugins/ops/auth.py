"""Bearer tokens of ``kvtier serve``: where they come from, when one is required, and
the constant-time check. A token is never logged or shown."""

from __future__ import annotations

import hmac
import ipaddress
import os
from pathlib import Path

from kvtier.core.errors import ConfigError

TOKEN_ENV = "KVTIER_TOKEN"
MIN_TOKEN_CHARS = 16


def load_token(token_file: Path | None) -> str | None:
    """The token from ``token_file`` (its first line), else ``$KVTIER_TOKEN``, else
    ``None``. :class:`ConfigError` for an unreadable file or a short token."""
    if token_file is not None:
        try:
            text = token_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read --token-file {str(token_file)!r}: {exc}") from None
        token = text.strip().splitlines()[0].strip() if text.strip() else ""
        where = f"--token-file {str(token_file)!r}"
    elif os.environ.get(TOKEN_ENV):
        token, where = os.environ[TOKEN_ENV].strip(), TOKEN_ENV
    else:
        return None
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(
            f"the token in {where} is too short: use at least {MIN_TOKEN_CHARS} characters "
            "(e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    return token


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the service on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name that may resolve anywhere


def check_bind(host: str, token: str | None) -> None:
    """:class:`ConfigError` for a bind beyond loopback without a token."""
    if token is None and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host!r} without a token: anyone who reaches it could "
            f"purge the cache. Give --token-file FILE or set {TOKEN_ENV}, or bind 127.0.0.1"
        )


def token_matches(header: str | None, token: str) -> bool:
    """Whether an ``Authorization`` header carries ``token`` (compared in constant time)."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(given.strip().encode(), token.encode())
