"""A blob's JSON header: :class:`BlobHeader`, written by :func:`header_json` and
validated field by field by :func:`parse_header`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.core.blob.framing import (
    MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    MAX_PADDED_HEADER,
    MAX_STAGE_BYTES,
    MAX_STAGES,
    corrupt,
    padded_header_len,
    trailer_bytes,
)
from kvtier.core.errors import ConfigError
from kvtier.core.layout import DTYPES, dtype_name

_HEADER_KEYS = frozenset({"key", "dtype", "shape", "stages", "sizes"})
_OPTIONAL_KEYS = frozenset({"segment"})
_STAGE_KEYS = frozenset({"name", "params"})


@dataclass(frozen=True)
class BlobHeader:
    """A validated blob header; ``nbytes`` is the whole blob's size."""

    key: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    stages: tuple[tuple[str, dict[str, Any]], ...]
    sizes: tuple[int, ...]
    payload_nbytes: int
    nbytes: int
    signed: bool = False
    """The blob carries a MAC (:mod:`kvtier.core.integrity`)."""
    segment_start: int | None = None
    """Canonical position of the first token of a segment chunk; ``None`` for a prefix
    chunk (whose keys sit at their absolute positions)."""

    @property
    def payload_offset(self) -> int:
        """Where the payload starts in the blob."""
        return self.nbytes - trailer_bytes(self.signed) - self.payload_nbytes

    @property
    def pipeline(self) -> str:
        """The pipeline that wrote the blob, as a config names it (``int8+zstd``)."""
        return "+".join(name for name, _ in self.stages)


def header_json(
    key: str,
    dtype: torch.dtype,
    shape: tuple[int, ...],
    stages: list[tuple[str, dict[str, Any]]],
    sizes: list[int],
    segment_start: int | None = None,
) -> bytes:
    """The header's JSON text; :class:`ConfigError` if it would exceed the limit.
    ``segment_start`` marks a segment chunk and records its canonical start."""
    header: dict[str, Any] = {
        "key": key,
        "dtype": dtype_name(dtype),
        "shape": list(shape),
        "stages": [{"name": name, "params": params} for name, params in stages],
        "sizes": sizes,
    }
    if segment_start is not None:
        if not _is_count(segment_start):
            raise ConfigError(f"segment_start must be a non-negative int, got {segment_start!r}")
        header["segment"] = {"start": segment_start}
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if padded_header_len(len(text)) > MAX_PADDED_HEADER:
        raise ConfigError(
            f"blob header for key {key[:80]!r} is {len(text)} bytes; the limit is "
            f"{MAX_HEADER_BYTES} (is the key that long?)"
        )
    return text


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def parse_header(text: bytes, payload_len: int, nbytes: int, signed: bool) -> BlobHeader:
    """The header ``text`` of a blob of ``nbytes`` whose prefix declares ``payload_len``,
    every field checked; :class:`ChunkCorruptedError` where one is wrong."""
    try:
        obj = json.loads(text.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise corrupt(f"header is not UTF-8 JSON ({exc})") from None
    if not isinstance(obj, dict) or not _HEADER_KEYS <= set(obj) <= _HEADER_KEYS | _OPTIONAL_KEYS:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise corrupt(
            f"header must be an object with keys {sorted(_HEADER_KEYS)} (and optionally "
            f"{sorted(_OPTIONAL_KEYS)}), got {keys}"
        )
    key, dtype, shape, stages, sizes = (
        obj[k] for k in ("key", "dtype", "shape", "stages", "sizes")
    )
    if not isinstance(key, str):
        raise corrupt(f"key must be a string, got {key!r:.80}")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise corrupt(f"unsupported dtype {dtype!r:.80}")
    torch_dtype = DTYPES[dtype]
    if not isinstance(shape, list) or len(shape) != 5 or not all(map(_is_count, shape)):
        raise corrupt(f"shape must be 5 non-negative integers, got {shape!r:.120}")
    if math.prod(shape) * torch_dtype.itemsize > MAX_CHUNK_BYTES:
        raise corrupt(f"shape {shape} holds more than {MAX_CHUNK_BYTES} bytes")
    if not isinstance(stages, list) or not 1 <= len(stages) <= MAX_STAGES:
        raise corrupt(f"stages must be a list of 1..{MAX_STAGES} stages, got {stages!r:.120}")
    parsed = []
    for stage in stages:
        if (
            not isinstance(stage, dict)
            or set(stage) != _STAGE_KEYS
            or not isinstance(stage["name"], str)
            or not isinstance(stage["params"], dict)
        ):
            raise corrupt(f"a stage must be {{name: str, params: {{...}}}}, got {stage!r:.120}")
        parsed.append((stage["name"], stage["params"]))
    if not isinstance(sizes, list) or len(sizes) != len(stages) or not all(map(_is_count, sizes)):
        raise corrupt(f"sizes must be one non-negative integer per stage, got {sizes!r:.120}")
    if max(sizes) > MAX_STAGE_BYTES:
        raise corrupt(f"a stage size exceeds {MAX_STAGE_BYTES} bytes: {sizes}")
    if sizes[-1] != payload_len:
        raise corrupt(f"last stage size {sizes[-1]} != payload length {payload_len}")
    segment = obj.get("segment")
    if segment is not None and (
        not isinstance(segment, dict)
        or set(segment) != {"start"}
        or not _is_count(segment["start"])
    ):
        raise corrupt(f"segment must be {{start: non-negative int}}, got {segment!r:.120}")
    return BlobHeader(
        key,
        torch_dtype,
        tuple(shape),
        tuple(parsed),
        tuple(sizes),
        payload_len,
        nbytes,
        signed,
        segment_start=None if segment is None else segment["start"],
    )
