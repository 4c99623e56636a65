"""Validation shared by the codecs' decoders: wrong sizes or parameters mean corruption."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kvtier.core.codec import Params
from kvtier.core.errors import ChunkCorruptedError


def check_payload(codec: str, payload: memoryview, expected: int) -> None:
    """Raise :class:`ChunkCorruptedError` unless ``payload`` is ``expected`` bytes long."""
    if payload.nbytes != expected:
        raise ChunkCorruptedError(
            f"{codec}: payload is {payload.nbytes} bytes, the chunk needs {expected}"
        )


def check_params(codec: str, params: Mapping[str, Any], expected: Params) -> None:
    """Raise :class:`ChunkCorruptedError` unless ``params`` are exactly ``expected``."""
    if dict(params) != expected:
        raise ChunkCorruptedError(f"{codec}: unsupported parameters {dict(params)!r}")
