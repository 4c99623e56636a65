"""Keyed integrity: blobs signed with a secret, so that a store's writers cannot forge them.

A checksum proves a blob is intact, not who wrote it: anyone who can write to a shared
redis or s3 tier can plant a valid blob under any key. With ``integrity`` configured,
every blob that leaves the process carries a MAC (keyed BLAKE2b-256) over its framing,
its header and a 128-bit checksum of everything before it; a blob whose MAC fails, or
that carries none, is a miss and is removed.

Keys: a file or an environment variable (named in the config, never the secret itself)
holds one key or several, one per line, as hex or base64 (16 bytes or more each). The
first signs; all verify, so keys rotate by putting the new one first. The MAC of a
chunk is computed with a key derived for its tenant (:func:`tenant_key`), so a
deployment given only its tenant's derived key (``derived: true``) can neither forge
nor verify another tenant's chunks. See docs/security.md for the threat model.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, model_validator

from kvtier.core.errors import ConfigError
from kvtier.core.keys import tenant_tag

MAC_BYTES = 32
MIN_KEY_BYTES = 16
_PERSON = b"kvtier-mac-v1"


def tenant_key(master: bytes, tenant_tag: str) -> bytes:
    """The key that signs the chunks of the tenant ``tenant_tag`` (the ``t...`` part of
    a namespace, ``""`` for chunks of no tenant), derived from ``master``."""
    return hashlib.blake2b(
        tenant_tag.encode(), key=master, digest_size=MAC_BYTES, person=_PERSON
    ).digest()


def tenant_of(key: str) -> str:
    """The tenant tag of a chunk key (``""`` when its namespace names no tenant)."""
    namespace = key.partition(".")[0]
    last = namespace.rpartition("-")[2]
    return last if len(last) == 13 and last.startswith("t") else ""


@dataclass(frozen=True)
class MacKeys:
    """Accepted keys, the first of which signs. ``derived``: they are one tenant's
    derived keys (used as they are, for that tenant's chunks only), not master keys."""

    keys: tuple[bytes, ...]
    derived: bool = False
    tenant_tag: str | None = None
    """With ``derived``: the tenant whose chunks the keys sign."""
    strong: bool = False
    """Sign a BLAKE2b digest of the blob instead of its xxh3-128 (see docs/security.md)."""
    required: bool = True
    """Refuse unsigned blobs (``False`` only while a store's old blobs are replaced)."""

    def _for(self, tenant_tag: str) -> list[bytes]:
        if self.derived:
            return list(self.keys) if tenant_tag == self.tenant_tag else []
        return [tenant_key(key, tenant_tag) for key in self.keys]

    def sign(self, key: str, message: bytes) -> bytes:
        """The MAC of ``message`` in the blob of chunk ``key``; :class:`ConfigError` when
        these keys may not sign that tenant's chunks."""
        keys = self._for(tenant_of(key))
        if not keys:
            raise ConfigError(
                f"the integrity keys are {self.tenant_tag!r}'s: they cannot sign another "
                "tenant's chunks"
            )
        return hashlib.blake2b(message, key=keys[0], digest_size=MAC_BYTES).digest()

    def check(self, key: str, message: bytes, mac: bytes) -> bool:
        """Whether ``mac`` signs ``message`` in the blob of chunk ``key`` (any key)."""
        return any(
            hmac.compare_digest(
                hashlib.blake2b(message, key=k, digest_size=MAC_BYTES).digest(), mac
            )
            for k in self._for(tenant_of(key))
        )


def _decode_key(text: str, where: str, line: int) -> bytes:
    for decode in (bytes.fromhex, base64.b64decode):
        try:
            key = decode(text)
        except (ValueError, binascii.Error):
            continue
        if len(key) >= MIN_KEY_BYTES:
            return key
    raise ConfigError(
        f"{where}: key {line} is not {MIN_KEY_BYTES} bytes or more of hex or base64 "
        "(make one with: python -c 'import secrets; print(secrets.token_hex(32))')"
    )


def parse_keys(text: str, where: str) -> tuple[bytes, ...]:
    """Keys from ``text``: one per line (or comma-separated), hex or base64; the error
    names ``where`` and the key's position, never the key."""
    items = [part.strip() for line in text.splitlines() for part in line.split(",")]
    keys = tuple(_decode_key(item, where, n) for n, item in enumerate(filter(None, items), 1))
    if not keys:
        raise ConfigError(f"{where} holds no key")
    return keys


def load_keys(settings: IntegrityConfig, tenant: str | None, environ: Mapping[str, str]) -> MacKeys:
    """The keys ``settings`` name (in a file or an environment variable), for a process
    of ``tenant``."""
    keys_file, keys_env = settings.keys_file, settings.keys_env
    if keys_file is not None:
        where = f"integrity keys_file {keys_file!r}"
        try:
            text = Path(keys_file).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read it ({type(exc).__name__})") from None
    else:
        where = f"integrity keys_env {keys_env!r}"
        text = environ.get(str(keys_env), "")
        if not text:
            raise ConfigError(f"{where}: the environment variable is not set")
    if settings.derived and tenant is None:
        raise ConfigError(
            "integrity: derived keys are one tenant's; set the config's tenant to that tenant"
        )
    return MacKeys(
        parse_keys(text, where),
        derived=settings.derived,
        tenant_tag=None if tenant is None else tenant_tag(tenant),
        strong=settings.digest == "blake2b",
        required=settings.require_signed,
    )


class IntegrityConfig(BaseModel):
    """The ``integrity:`` section: where the MAC keys are (never the keys themselves)."""

    model_config = ConfigDict(extra="forbid")

    keys_file: str | None = None
    """A file holding the keys, one per line (hex or base64, 16 bytes or more)."""
    keys_env: str | None = None
    """The name of an environment variable holding the keys (comma-separated)."""
    derived: bool = False
    """The keys are this tenant's derived keys (``kvtier integrity derive``), not master
    keys: they sign and verify the config's tenant's chunks only."""
    digest: Literal["xxh3", "blake2b"] = "xxh3"
    """What the MAC covers of the payload: its xxh3-128 (fast) or BLAKE2b-128 digest
    (cryptographic, slower; see docs/security.md)."""
    require_signed: bool = True
    """Unsigned blobs are a miss and removed; ``false`` accepts them while a store's
    old blobs are replaced."""

    @model_validator(mode="after")
    def _one_source(self) -> IntegrityConfig:
        if (self.keys_file is None) == (self.keys_env is None):
            raise ValueError("name the keys with keys_file or keys_env (exactly one)")
        return self
