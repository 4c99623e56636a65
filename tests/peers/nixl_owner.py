"""A second kvtier process for the ``nixl`` tier tests: it owns chunks peers read.

    python tests/peers/nixl_owner.py --index redis://127.0.0.1:P/0 --group G \
        --ttl 1 --capacity 67108864 BLOB_FILE...

Stores each blob file (named by its chunk key) in a ``nixl://G`` tier, prints
``ready <agent name>`` and then serves commands from stdin, one per line, answering
``ok`` to each: ``put FILE`` stores another blob file, ``delete KEY`` deletes a key.
At end of input it closes the tier and exits. Not a test module (no ``test_`` name).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from kvtier.backends.nixl.backend import NixlBackend
from kvtier.core.buffers import BufferPool
from kvtier.core.factory import build_backend


async def put(backend: NixlBackend, pool: BufferPool, path: str) -> None:
    with open(path, "rb") as f, pool.copy_of(f.read()) as buf:
        assert await backend.put_many([(os.path.basename(path), buf)]) == [True]


async def serve(args: argparse.Namespace) -> None:
    pool = BufferPool()
    backend = build_backend(
        f"nixl://{args.group}",
        capacity=args.capacity,
        options={"index": args.index, "ttl": args.ttl},
        pool=pool,
    )
    assert isinstance(backend, NixlBackend)
    async with backend:
        for path in args.blobs:
            await put(backend, pool, path)
        print("ready", backend.name, flush=True)
        loop = asyncio.get_running_loop()
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command, _, arg = line.strip().partition(" ")
            if command == "put":
                await put(backend, pool, arg)
            elif command == "delete":
                assert await backend.delete_many([arg]) == [True]
            else:
                raise SystemExit(f"unknown command {line!r}")
            print("ok", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description="own chunks of a nixl tier for a test")
    parser.add_argument("--index", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--capacity", type=int, default=64 << 20)
    parser.add_argument("blobs", nargs="*")
    asyncio.run(serve(parser.parse_args()))


if __name__ == "__main__":
    main()
