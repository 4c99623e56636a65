"""Chunk keys: prefix-chained hashes of token chunks inside a model namespace.

A prompt is cut into chunks of ``chunk_tokens`` tokens. The key of chunk ``i`` hashes
the key of chunk ``i-1`` (its parent), the chunk's tokens and optional extra keys, so
equal keys mean equal prefixes. Two algorithms:

* ``xxh3_128`` (default): xxh3 over the parent digest and the tokens as little-endian
  int64, hashed straight from the array.
* ``sha256_cbor``: exactly vLLM's ``sha256_cbor`` block hash,
  ``sha256(cbor2.dumps((parent, tuple(tokens), extra_keys), canonical=True))`` with the
  root parent ``sha256_cbor(seed)``; with ``chunk_tokens`` equal to vLLM's block size
  and ``seed`` equal to vLLM's ``PYTHONHASHSEED`` the digests equal vLLM's (and llm-d's)
  prefix-cache block hashes.

The seed is fixed and configurable; it is never random per process, so processes and
restarts agree on keys. The namespace (model fingerprint and tenant) is part of every
key's string form, so two models or tenants never share a chunk.

Position-independent segments (:mod:`kvtier.core.segments`) are a second key domain:
their chunks chain from a segment root over the segment's own tokens only, in a
namespace that also fingerprints the model's rotary encoding and ends in ``-seg``
(before the tenant tag), which no prefix namespace can (those end in hex digits).
"""

from __future__ import annotations

import hashlib
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeAlias

import cbor2
import numpy as np
import torch
import xxhash

from kvtier.core.errors import ConfigError
from kvtier.core.layout import ModelFingerprint

HashAlgorithm: TypeAlias = Literal["xxh3_128", "sha256_cbor"]
Tokens: TypeAlias = "Sequence[int] | np.ndarray[Any, Any] | torch.Tensor"
ExtraKeys: TypeAlias = "tuple[Any, ...] | None"

DEFAULT_SEED = "kvtier"
MAX_KEY_LENGTH = 160
_SLUG_LEN = 40
_KEY_RE = re.compile(r"(?P<ns>[A-Za-z0-9][A-Za-z0-9_-]{0,79})\.(?P<digest>[0-9a-f]{32,64})\Z")


@dataclass(frozen=True, slots=True)
class ChunkKey:
    """A chunk's identity: ``namespace`` (model + tenant) and ``digest`` (prefix hash).

    ``str(key)`` is ``"<namespace>.<hex digest>"``: only ``[A-Za-z0-9_.-]``, at most
    160 characters, never starting with a dot, so it is safe as a file name, an S3
    key and a Redis key.
    """

    namespace: str
    digest: bytes

    def __str__(self) -> str:
        return f"{self.namespace}.{self.digest.hex()}"

    @classmethod
    def parse(cls, text: str) -> ChunkKey:
        """Parse a key's string form; :class:`ConfigError` if it is not one."""
        match = _KEY_RE.match(text) if len(text) <= MAX_KEY_LENGTH else None
        if match is None:
            raise ConfigError(
                f"invalid chunk key {text[:80]!r}: expected '<namespace>.<hex digest>' "
                "with namespace of [A-Za-z0-9_-] (<= 80 chars) and a 32-64 digit hex digest"
            )
        return cls(match["ns"], bytes.fromhex(match["digest"]))


def validate_key(text: str) -> str:
    """Return ``text`` if it is a valid key string, else raise :class:`ConfigError`.

    Backends call this on every key they are given before using it as a path or name.
    """
    if type(text) is not str or len(text) > MAX_KEY_LENGTH or _KEY_RE.match(text) is None:
        ChunkKey.parse(text if isinstance(text, str) else repr(text))  # raises, explained
    return text


def is_valid_key(text: str) -> bool:
    """Whether ``text`` is a valid key string (e.g. a name found in a listing)."""
    try:
        validate_key(text)
    except ConfigError:
        return False
    return True


def _tag(text: str, digits: int) -> str:
    return xxhash.xxh3_64_hexdigest(text.encode())[:digits]


def model_slug(model: str) -> str:
    """The readable part of a namespace: the model id with unsafe characters as ``-``."""
    slug = re.sub(r"[^A-Za-z0-9_]+", "-", model).strip("-_")[:_SLUG_LEN].strip("-_")
    return slug or "model"


def tenant_tag(tenant: str) -> str:
    """The part of a namespace that names a tenant (``t`` + 12 hex digits of its hash)."""
    return "t" + _tag("tenant:" + tenant, 12)


def namespace_for(fingerprint: ModelFingerprint, tenant: str | None = None) -> str:
    """Namespace of a model's chunks: ``<model slug>-<fingerprint hash>[-<tenant tag>]``.

    The fingerprint hash covers every field of the fingerprint and the tenant, so a
    different dtype, layer count, head layout, TP rank or size, or tenant gives a
    different namespace.
    """
    if tenant == "":
        raise ConfigError("tenant must be a non-empty string or None")
    canonical = fingerprint.canonical() + (f";tenant={tenant}" if tenant is not None else "")
    ns = f"{model_slug(fingerprint.model)}-{_tag(canonical, 16)}"
    return ns if tenant is None else f"{ns}-{tenant_tag(tenant)}"


def segment_namespace_for(
    fingerprint: ModelFingerprint, positional: str, tenant: str | None = None
) -> str:
    """Namespace of a model's position-independent segments:
    ``<model slug>-<hash>-seg[-<tenant tag>]``, the hash covering the fingerprint, the
    positional encoding's canonical text (``positional``, e.g. the RoPE parameters) and
    the tenant. It never equals a prefix namespace (:func:`namespace_for`)."""
    if tenant == "":
        raise ConfigError("tenant must be a non-empty string or None")
    canonical = f"{fingerprint.canonical()};segments;{positional}" + (
        f";tenant={tenant}" if tenant is not None else ""
    )
    ns = f"{model_slug(fingerprint.model)}-{_tag(canonical, 16)}-seg"
    return ns if tenant is None else f"{ns}-{tenant_tag(tenant)}"


def sha256_cbor(obj: Any) -> bytes:
    """vLLM's ``sha256_cbor``: SHA-256 of the canonical CBOR encoding of ``obj``."""
    return hashlib.sha256(cbor2.dumps(obj, canonical=True)).digest()


def _as_int64(tokens: Tokens) -> np.ndarray[Any, np.dtype[np.int64]]:
    """``tokens`` as contiguous little-endian int64; :class:`ConfigError` for anything
    that is not a 1-D sequence of integer token ids (floats are never rounded)."""
    if isinstance(tokens, torch.Tensor):
        tokens = tokens.detach().cpu().numpy()
    if isinstance(tokens, (list, tuple)):  # engines keep lists: 2x faster than numpy
        try:
            return np.frombuffer(struct.pack(f"<{len(tokens)}q", *tokens), dtype="<i8")
        except struct.error:
            pass  # not flat ints (struct never rounds a float): numpy below says why
    try:
        given = np.asarray(tokens)
        if given.size and given.dtype.kind not in "iu":
            raise ConfigError(f"tokens must be integer token ids, got dtype {given.dtype}")
        arr = np.ascontiguousarray(given, dtype="<i8")
    except (TypeError, ValueError, OverflowError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"tokens must be a 1-D sequence of int token ids: {exc}") from None
    if arr.ndim != 1:
        raise ConfigError(f"tokens must be one-dimensional, got shape {arr.shape}")
    return arr


class ChunkHasher:
    """Splits token sequences into chunks and computes their chained keys.

    ``segments=True`` starts the chain from the segment root instead of the prefix
    root, so a segment's chunks never share a digest with a prefix's."""

    def __init__(
        self,
        namespace: str,
        *,
        chunk_tokens: int = 256,
        algorithm: HashAlgorithm = "xxh3_128",
        seed: str = DEFAULT_SEED,
        segments: bool = False,
    ) -> None:
        if chunk_tokens <= 0:
            raise ConfigError(f"chunk_tokens must be positive, got {chunk_tokens}")
        if algorithm not in ("xxh3_128", "sha256_cbor"):
            raise ConfigError(
                f"unknown hash algorithm {algorithm!r}; use 'xxh3_128' or 'sha256_cbor'"
            )
        self.namespace = namespace
        self.chunk_tokens = chunk_tokens
        self.algorithm = algorithm
        self.seed = seed
        if algorithm == "sha256_cbor":
            self.root = sha256_cbor(("kvtier-segment", seed) if segments else seed)
        else:
            label = b"kvtier-segment\0" if segments else b"kvtier-root\0"
            self.root = xxhash.xxh3_128_digest(label + seed.encode())

    def chunk_bounds(self, num_tokens: int, *, partial: bool = False) -> list[tuple[int, int]]:
        """``(start, end)`` of each chunk; the trailing partial chunk only if ``partial``."""
        step = self.chunk_tokens
        end = num_tokens if partial else num_tokens - num_tokens % step
        return [(start, min(start + step, end)) for start in range(0, end, step)]

    def digests(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        partial: bool = False,
    ) -> list[bytes]:
        """Chained digests of the chunks of ``tokens`` in order.

        ``extra_keys[i]`` (CBOR-encodable, e.g. a LoRA name or ``cache_salt``) is mixed
        into chunk ``i``'s hash; chunks past the end of ``extra_keys`` get none. Raises
        :class:`ConfigError` for tokens that are not integer ids or extra keys CBOR
        cannot encode.
        """
        arr = _as_int64(tokens)
        parent = self.root
        digests = []
        for i, (start, end) in enumerate(self.chunk_bounds(len(arr), partial=partial)):
            extra = extra_keys[i] if i < len(extra_keys) else None
            try:
                parent = self._digest(parent, arr[start:end], extra)
            except cbor2.CBOREncodeError as exc:
                raise ConfigError(f"extra_keys[{i}] cannot be hashed (CBOR): {exc}") from None
            digests.append(parent)
        return digests

    def keys(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        partial: bool = False,
    ) -> list[ChunkKey]:
        """Keys of the chunks of ``tokens`` in order (see :meth:`digests`)."""
        digests = self.digests(tokens, extra_keys=extra_keys, partial=partial)
        return [ChunkKey(self.namespace, digest) for digest in digests]

    def key_strings(
        self,
        tokens: Tokens,
        *,
        extra_keys: Sequence[ExtraKeys] = (),
        partial: bool = False,
    ) -> list[str]:
        """``str()`` of each of :meth:`keys`, made without the key objects (lookups)."""
        prefix = f"{self.namespace}."
        digests = self.digests(tokens, extra_keys=extra_keys, partial=partial)
        return [prefix + digest.hex() for digest in digests]

    def _digest(
        self, parent: bytes, tokens: np.ndarray[Any, np.dtype[np.int64]], extra: ExtraKeys
    ) -> bytes:
        if self.algorithm == "sha256_cbor":
            return sha256_cbor((parent, tuple(tokens.tolist()), extra))
        # The length keeps a token run from passing for extra keys.
        parts: list[bytes | memoryview] = [parent, len(tokens).to_bytes(8, "little"), tokens.data]
        if extra is not None:
            parts.append(cbor2.dumps(extra, canonical=True))
        return xxhash.xxh3_128_digest(b"".join(parts))
