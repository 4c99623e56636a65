"""A blob's JSON header: :class:`BlobHeader`, written by :func:`header_json` and
validated field by field by :func:`parse_header`. A layered blob's header also lists,
per layer, the sizes of its section after each stage (``"layers"``)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch

from kvtier.core.blob.framing import (
    FORMAT_VERSION,
    LAYERED_VERSION,
    MAX_CHUNK_BYTES,
    MAX_HEADER_BYTES,
    MAX_PADDED_HEADER,
    MAX_SECTIONS,
    MAX_STAGE_BYTES,
    MAX_STAGES,
    PREFIX,
    corrupt,
    padded_header_len,
    section_digest_bytes,
    trailer_bytes,
)
from kvtier.core.errors import ConfigError
from kvtier.core.layout import DTYPES, dtype_name

_HEADER_KEYS = frozenset({"key", "dtype", "shape", "stages", "sizes"})
_OPTIONAL_KEYS = frozenset({"segment", "layers"})
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
    layers: tuple[tuple[int, ...], ...] | None = None
    """A layered blob's per-layer section sizes after each stage (the last: the
    section's bytes in the payload, layer after layer); ``None`` for a whole-chunk blob."""

    @property
    def version(self) -> int:
        return FORMAT_VERSION if self.layers is None else LAYERED_VERSION

    @property
    def trailer_nbytes(self) -> int:
        """Bytes after the payload (a layered blob's section digests, then the checksum,
        or digest and MAC)."""
        return trailer_bytes(self.signed, 0 if self.layers is None else len(self.layers))

    @property
    def payload_offset(self) -> int:
        """Where the payload starts in the blob."""
        return self.nbytes - self.trailer_nbytes - self.payload_nbytes

    def section(self, layer: int) -> tuple[int, int]:
        """``(offset in the blob, bytes)`` of a layered blob's section of ``layer``."""
        assert self.layers is not None, "a whole-chunk blob has no sections"
        offset = self.payload_offset + sum(sizes[-1] for sizes in self.layers[:layer])
        return offset, self.layers[layer][-1]

    def digest_at(self, layer: int) -> tuple[int, int]:
        """``(offset in the blob, bytes)`` of the digest of ``layer``'s section."""
        width = section_digest_bytes(self.signed)
        return self.payload_offset + self.payload_nbytes + layer * width, width

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
    layers: list[list[int]] | None = None,
) -> bytes:
    """The header's JSON text; :class:`ConfigError` if it would exceed the limit.
    ``segment_start`` marks a segment chunk and records its canonical start;
    ``layers`` (a layered blob) lists each layer's section sizes after each stage."""
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
    if layers is not None:
        header["layers"] = layers
    text = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    if padded_header_len(len(text)) > MAX_PADDED_HEADER:
        raise ConfigError(
            f"blob header for key {key[:80]!r} is {len(text)} bytes; the limit is "
            f"{MAX_HEADER_BYTES} (is the key that long?)"
        )
    return text


def _is_count(value: Any) -> bool:
    return type(value) is int and value >= 0


def parse_header(
    text: bytes, payload_len: int, nbytes: int | None, signed: bool, version: int = FORMAT_VERSION
) -> BlobHeader:
    """The header ``text`` of a blob of format ``version`` and ``nbytes`` whose prefix
    declares ``payload_len``, every field checked; :class:`ChunkCorruptedError` where
    one is wrong. ``nbytes=None``: the size the header implies (a reader that has only
    the blob's head), which a reader of the whole blob compares with what it has."""
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
    layers = _layers(obj.get("layers"), version, shape, sizes)
    implied = PREFIX.size + len(text) + payload_len + trailer_bytes(signed, len(layers or ()))
    if nbytes is not None and nbytes != implied:
        raise corrupt(f"{nbytes} bytes, but prefix and header declare {implied}")
    return BlobHeader(
        key,
        torch_dtype,
        tuple(shape),
        tuple(parsed),
        tuple(sizes),
        payload_len,
        implied,
        signed,
        segment_start=None if segment is None else segment["start"],
        layers=layers,
    )


def _layers(
    layers: Any, version: int, shape: list[int], sizes: list[int]
) -> tuple[tuple[int, ...], ...] | None:
    """The checked ``"layers"`` field: present exactly in a layered blob, one list of
    stage sizes per layer of ``shape``, adding up to ``sizes``."""
    if version != LAYERED_VERSION:
        if layers is not None:
            raise corrupt(f"a format {version} blob has no layers field")
        return None
    if (
        not isinstance(layers, list)
        or not 1 <= len(layers) <= MAX_SECTIONS
        or len(layers) != shape[0]
        or not all(
            isinstance(sec, list) and len(sec) == len(sizes) and all(map(_is_count, sec))
            for sec in layers
        )
    ):
        raise corrupt(
            f"layers must be {shape[0]} lists of {len(sizes)} sizes (1..{MAX_SECTIONS} "
            f"layers), got {layers!r:.120}"
        )
    if [sum(column) for column in zip(*layers, strict=True)] != sizes:
        raise corrupt(f"the layers' sizes do not add up to sizes {sizes}")
    return tuple(tuple(sec) for sec in layers)
