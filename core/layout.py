"""The shape of a model's KV cache and the fingerprint that isolates its chunks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvtier.core.errors import ConfigError, quote

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float8_e4m3fn": torch.float8_e4m3fn,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
"""Dtypes kvtier stores, by the name written in blob headers and configs."""


def dtype_name(dtype: torch.dtype) -> str:
    """The canonical name of a supported dtype (``torch.float16`` -> ``"float16"``)."""
    name = str(dtype).removeprefix("torch.")
    if DTYPES.get(name) is not dtype:
        raise ConfigError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
    return name


def dtype_from_name(name: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; raises :class:`ConfigError` for unknown names."""
    try:
        return DTYPES[name.removeprefix("torch.")]
    except KeyError:
        raise ConfigError(f"unsupported dtype {name!r}; use one of {', '.join(DTYPES)}") from None


@dataclass(frozen=True)
class KVLayout:
    """Shape of one model's KV cache as kvtier stores it.

    A chunk of ``t`` tokens is a tensor ``[num_layers, 2, t, num_kv_heads, head_dim]``
    (index 0 of the second axis holds keys, 1 holds values).
    """

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype = torch.float16

    def __post_init__(self) -> None:
        for field in ("num_layers", "num_kv_heads", "head_dim"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"KVLayout.{field} must be a positive int, got {quote(value)}")
        dtype_name(self.dtype)

    def chunk_shape(self, tokens: int) -> tuple[int, int, int, int, int]:
        """Shape of a chunk holding ``tokens`` tokens."""
        return (self.num_layers, 2, tokens, self.num_kv_heads, self.head_dim)

    def bytes_per_token(self) -> int:
        """Bytes one token's keys and values take in every layer, unencoded."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * itemsize

    def check(self, kv: torch.Tensor, tokens: int) -> None:
        """Raise :class:`ConfigError` unless ``kv`` is a chunk tensor for ``tokens`` tokens."""
        expected = self.chunk_shape(tokens)
        if tuple(kv.shape) != expected or kv.dtype != self.dtype:
            raise ConfigError(
                f"KV tensor has shape {tuple(kv.shape)} and dtype {kv.dtype}; this layout "
                f"expects {expected} ([num_layers, 2, tokens, kv_heads, head_dim]) "
                f"and {self.dtype}"
            )


@dataclass(frozen=True)
class ModelFingerprint:
    """What must match for two processes to share KV chunks.

    Chunks are namespaced by all of these fields: two models, two dtypes, two tensor
    parallel shardings, two weights revisions or two tenants never read each other's KV.
    """

    model: str
    layout: KVLayout
    tp_rank: int = 0
    tp_size: int = 1
    revision: str | None = None
    """The weights revision (a commit hash, a checkpoint id): a model redeployed with new
    weights under the same id never reuses the old weights' KV. ``None`` leaves the
    namespace as it was without one."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model id must be a non-empty string, e.g. 'meta-llama/Llama-3-8B'")
        if self.revision == "":
            raise ConfigError("revision must be a non-empty string or None")
        if not 0 <= self.tp_rank < self.tp_size:
            raise ConfigError(
                f"tp_rank must be in [0, tp_size); got tp_rank={self.tp_rank}, "
                f"tp_size={self.tp_size}"
            )

    def canonical(self) -> str:
        """A stable text form; its hash is the namespace of the model's chunks."""
        lay = self.layout
        return (
            f"model={self.model};dtype={dtype_name(lay.dtype)};layers={lay.num_layers};"
            f"kv_heads={lay.num_kv_heads};head_dim={lay.head_dim};"
            f"tp={self.tp_rank}/{self.tp_size}"
            + ("" if self.revision is None else f";revision={self.revision}")
        )
