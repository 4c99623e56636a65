"""A second kvtier process with a ``vineyard://`` tier, for the vineyard tier tests.

    python tests/peers/vineyard_peer.py URL [--prefix P] [--capacity BYTES]

Opens the tier, prints ``ready`` and serves commands from stdin, one per line, each
answered by one line starting with ``ok``:

    put KEY FILE      store FILE's bytes under KEY          -> ok True|False
    get KEY FILE      write KEY's bytes to FILE             -> ok hit|miss
    hold KEY          read KEY and keep the buffer          -> ok hit|miss
    check KEY FILE    whether the held buffer equals FILE   -> ok same|differ
    release KEY       release the held buffer               -> ok
    delete KEY                                              -> ok True|False
    stats                                                   -> ok <details as JSON>

At end of input it releases what it holds, closes the tier and exits. Not a test
module (no ``test_`` name).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from kvtier.core.backend import Backend
from kvtier.core.buffers import Buffer, BufferPool
from kvtier.core.factory import build_backend


async def answer(backend: Backend, pool: BufferPool, held: dict[str, Buffer], line: str) -> str:
    command, *args = line.split()
    if command == "put":
        with pool.copy_of(Path(args[1]).read_bytes()) as buf:
            return str((await backend.put_many([(args[0], buf)]))[0])
    if command in ("get", "hold"):
        [got] = await backend.get_many(args[:1])
        if got is None:
            return "miss"
        if command == "hold":
            held[args[0]] = got
        else:
            with got:
                Path(args[1]).write_bytes(got.view)
        return "hit"
    if command == "check":
        same = bytes(held[args[0]].view) == Path(args[1]).read_bytes()
        return "same" if same else "differ"
    if command == "release":
        held.pop(args[0]).release()
        return ""
    if command == "delete":
        return str((await backend.delete_many(args[:1]))[0])
    if command == "stats":
        return json.dumps((await backend.stats()).details)
    raise SystemExit(f"unknown command {line!r}")


async def serve(args: argparse.Namespace) -> None:
    pool = BufferPool()
    options = {"key_prefix": args.prefix}
    backend = build_backend(args.url, capacity=args.capacity, options=options, pool=pool)
    held: dict[str, Buffer] = {}
    async with backend:
        print("ready", flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            print("ok", await answer(backend, pool, held, line.strip()), flush=True)
        for buf in held.values():
            buf.release()


def main() -> None:
    parser = argparse.ArgumentParser(description="a vineyard tier in a second process")
    parser.add_argument("url")
    parser.add_argument("--prefix", default="kvtier/")
    parser.add_argument("--capacity", type=int, default=64 << 20)
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
