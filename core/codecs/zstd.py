"""The ``zstd`` codec: Zstandard compression of the payload."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import zstandard
from pydantic import BaseModel, ConfigDict, Field

from kvtier.core.buffers import BytesLike
from kvtier.core.codec import ByteCodec, Params
from kvtier.core.codecs._views import ThreadScratch
from kvtier.core.errors import ChunkCorruptedError


class ZstdOptions(BaseModel):
    """Options of the ``zstd`` codec."""

    model_config = ConfigDict(extra="forbid")

    level: int = Field(
        default=3,
        ge=-7,
        le=zstandard.MAX_COMPRESSION_LEVEL,
        strict=True,
        description="compression level: 1-22, or -7..-1 for zstd's fast modes",
    )


class ZstdCodec(ByteCodec):
    """One zstd frame with its content size; decoding never exceeds the recorded size.

    Decoding reads the frame into per-thread scratch memory: the result is valid
    until the same thread calls this codec again (the pipeline consumes it at once).
    """

    name = "zstd"

    def __init__(self, options: ZstdOptions | None = None) -> None:
        options = options if options is not None else ZstdOptions()
        super().__init__(options)
        self.level = options.level
        self._local = threading.local()
        self._scratch = ThreadScratch()

    def _compressor(self) -> zstandard.ZstdCompressor:
        cctx: zstandard.ZstdCompressor | None = getattr(self._local, "cctx", None)
        if cctx is None:
            cctx = self._local.cctx = zstandard.ZstdCompressor(level=self.level)
        return cctx

    def _decompressor(self) -> zstandard.ZstdDecompressor:
        dctx: zstandard.ZstdDecompressor | None = getattr(self._local, "dctx", None)
        if dctx is None:
            dctx = self._local.dctx = zstandard.ZstdDecompressor()
        return dctx

    def encode(self, data: memoryview, itemsize: int) -> tuple[BytesLike, Params]:
        return self._compressor().compress(data), {"level": self.level}

    def decode(self, data: memoryview, params: Mapping[str, Any], nbytes: int) -> BytesLike:
        declared = zstandard.frame_content_size(data)
        if declared != nbytes:
            raise ChunkCorruptedError(
                f"zstd: frame declares {declared} bytes of content (-1: unknown), "
                f"the header records {nbytes}"
            )
        out = self._scratch.get(nbytes)
        with self._decompressor().stream_reader(data, read_across_frames=False) as reader:
            filled = 0
            while filled < nbytes:
                got = reader.readinto(out[filled:])
                if not got:
                    break
                filled += got
            if filled != nbytes or reader.read(1):
                raise ChunkCorruptedError(f"zstd: frame does not hold exactly {nbytes} bytes")
        return out
