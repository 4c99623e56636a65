"""kvtier's built-in codecs plugin: ``raw``, ``int8``, ``int4``, ``fp8``, ``shuffle``, ``zstd``."""

from __future__ import annotations

from collections.abc import Iterable

from kvtier.core.codecs.fp8 import Fp8Codec
from kvtier.core.codecs.quant import Int4Codec, Int8Codec
from kvtier.core.codecs.raw import RawCodec
from kvtier.core.codecs.shuffle import ShuffleCodec
from kvtier.core.codecs.zstd import ZstdCodec, ZstdOptions
from kvtier.core.hookspecs import hookimpl
from kvtier.core.specs import CodecSpec


@hookimpl
def kvtier_codecs() -> Iterable[CodecSpec]:
    return [
        CodecSpec(name="raw", cls=RawCodec, description="the chunk's bytes, unchanged"),
        CodecSpec(
            name="int8",
            cls=Int8Codec,
            description="int8, asymmetric per token per head (LMDeploy); lossy",
        ),
        CodecSpec(
            name="int4",
            cls=Int4Codec,
            description="int4, asymmetric per token per head (LMDeploy); lossy",
        ),
        CodecSpec(
            name="fp8",
            cls=Fp8Codec,
            description="float8_e4m3fn with per-token-per-head fp32 scales; lossy",
        ),
        CodecSpec(
            name="shuffle",
            cls=ShuffleCodec,
            description="byte-shuffle by element size; put it before zstd",
        ),
        CodecSpec(
            name="zstd",
            cls=ZstdCodec,
            options=ZstdOptions,
            description="Zstandard compression (option: level)",
        ),
    ]
