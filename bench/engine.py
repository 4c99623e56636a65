"""End-to-end speed of ``KVTier`` against plain copies and reads of the same bytes, in one run.

    python -P bench/engine.py [--json out.json] [--dir /var/tmp] [--reps 5] [--tokens 2048]
                              [--lookup-tokens 65536]

A Llama-3-8B-shaped KV cache (32 layers, 8 KV heads of 128, fp16; 128 KiB per token,
chunks of 256 tokens) goes through the public API, with ``torch.set_num_threads(1)``
(the work is copy-bound; two torch threads on a loaded 2-core machine make copies
5-10x slower):

* ``store`` (the caller's view: chunks copied into pooled blobs and queued; the flush
  runs untimed after it) and ``store`` + ``flush`` into a ``cpu`` tier that is full and
  evicting (steady state), against copying the same token slices into preallocated
  chunk buffers with plain torch;
* ``retrieve`` of the prompt stored last from that ``cpu`` tier into a preallocated
  tensor, against copying the chunk buffers into the same tensor;
* ``lookup`` of a long prompt (``--lookup-tokens``, every chunk held by a ``cpu`` tier;
  a small KV shape, since no data moves), its tokens given as a torch tensor and as a
  list of ints (as vLLM holds them), in microseconds per chunk: the issue's target is
  3.5 us;
* ``retrieve`` from a ``file`` tier (``o_direct`` true, then false) by a ``KVTier``
  opened anew (as after a restart; opening is untimed), page cache dropped before each
  run (root; else the row says WARM), against reading the same chunk files with
  ``os.preadv`` (``O_DIRECT`` into page-aligned memory, or buffered) on one thread.

Contenders of a case run in turns (one warm-up round, then ``--reps`` rounds, the order
rotating each round). The table and the JSON give medians and min-max ranges; ratios
are kvtier / plain, computed per round (higher is better, also for lookup).
``bench/peers.py`` runs the same cases with LMCache 0.5.6 beside kvtier.
"""

from __future__ import annotations

import argparse
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import kvtier.core
from kvtier.core import KVLayout, KVTier
from kvtier.core.keys import Tokens

sys.path.insert(0, str(Path(__file__).parent))
from tiers import drop_page_cache, write_json

LAYOUT = KVLayout(num_layers=32, num_kv_heads=8, head_dim=128, dtype=torch.float16)
CHUNK = 256
LOOKUP_LAYOUT = KVLayout(num_layers=2, num_kv_heads=1, head_dim=64, dtype=torch.float16)
"""Lookups move no data: a small shape keeps a 64k-token prompt at 32 MiB."""
LOOKUP_CALLS = 10
"""Lookups per timed run (one takes about a millisecond)."""
TOKEN_FORMS: dict[str, Callable[[torch.Tensor], Tokens]] = {
    "a tensor": lambda tokens: tokens,
    "a list": lambda tokens: tokens.tolist(),
}
"""How a prompt's tokens reach lookup (vLLM holds them as a list of ints); the cost of
turning them into keys differs by form, for kvtier and for LMCache."""
TARGETS = {
    ("store + flush into cpu", "plain"): 0.8,
    ("store + flush into cpu", "peer"): 1.0,
    ("retrieve from cpu", "plain"): 0.9,
    ("cold retrieve from file, o_direct", "plain"): 0.9,
    ("cold retrieve from file, o_direct", "peer"): 1.0,
    ("redis get, 2 MiB values", "peer"): 0.8,
}
"""Issue 10's minimum kvtier / baseline ratios, by (case, baseline kind); "peer" is
LMCache (``bench/peers.py``)."""
LOOKUP_TARGET_US = 3.5
GB = 1e9
ALIGN = 4096


def nothing(rep: int) -> None:
    return None


@dataclass
class Timed:
    """One contender of a case: ``run(rep)`` is timed, ``before``/``after`` are not."""

    run: Callable[[int], object]
    before: Callable[[int], object] = nothing
    after: Callable[[int], object] = nothing


def interleave(reps: int, contenders: Mapping[str, Timed]) -> dict[str, list[float]]:
    """Seconds of each contender's ``run`` in ``reps`` rounds after one warm-up round;
    every round runs each contender once, starting with a different one each round."""
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for rep in range(reps + 1):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            timed = contenders[name]
            timed.before(rep)
            start = time.perf_counter()
            timed.run(rep)
            elapsed = time.perf_counter() - start
            timed.after(rep)
            if rep:
                seconds[name].append(elapsed)
    return seconds


def spread(values: list[float], digits: int = 3) -> dict[str, float]:
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
    }


@dataclass
class Contender:
    """Who runs (``kind``: "kvtier", "peer" or "plain"), what it does, and the run."""

    kind: str
    what: str
    timed: Timed


@dataclass
class Case:
    """One measured operation: each contender's per-round rate in ``unit``."""

    name: str
    unit: str  # "GB/s" (higher is better) or "us/chunk" (lower is better)
    rates: dict[str, list[float]]
    """contender's short name -> one value per round"""
    kinds: dict[str, str]
    """contender's short name -> "kvtier", "peer" or "plain" """
    whats: dict[str, str]
    """contender's short name -> what it does"""
    note: str = ""
    targets: dict[str, float] = field(default_factory=dict)
    """baseline kind -> minimum kvtier / baseline ratio"""

    @classmethod
    def measure(
        cls,
        name: str,
        reps: int,
        contenders: Mapping[str, Contender],
        *,
        nbytes: int = 0,
        chunks: int = 0,
        note: str = "",
    ) -> Case:
        """Time ``contenders`` (short name -> contender) in turns; a rate per round, in
        GB/s of ``nbytes`` or, with ``chunks``, in microseconds per chunk."""
        seconds = interleave(reps, {name: c.timed for name, c in contenders.items()})
        if chunks:
            rates = {n: [s * 1e6 / chunks for s in v] for n, v in seconds.items()}
            unit = "us/chunk"
        else:
            rates = {n: [nbytes / s / GB for s in v] for n, v in seconds.items()}
            unit = "GB/s"
        kinds = {n: c.kind for n, c in contenders.items()}
        whats = {n: c.what for n, c in contenders.items()}
        targets = {kind: t for (case, kind), t in TARGETS.items() if case == name}
        return cls(name, unit, rates, kinds, whats, note, targets)

    def ratios(self) -> list[tuple[str, str, dict[str, float], float | None]]:
        """(kvtier contender, baseline, kvtier / baseline per round as a spread, target)
        for every baseline; a speed ratio, so also > 1 when kvtier's lookup is cheaper."""
        out = []
        mine = [n for n, kind in self.kinds.items() if kind == "kvtier"]
        for base, kind in self.kinds.items():
            if kind == "kvtier":
                continue
            for name in mine:
                pairs = zip(self.rates[name], self.rates[base], strict=True)
                per_round = [b / k if self.unit == "us/chunk" else k / b for k, b in pairs]
                out.append((name, base, spread(per_round, 2), self.targets.get(kind)))
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "case": self.name,
            "unit": self.unit,
            "note": self.note,
            "contenders": [
                {
                    "name": n,
                    "kind": self.kinds[n],
                    "what": self.whats[n],
                    **spread(v),
                    "samples": [round(x, 3) for x in v],
                }
                for n, v in self.rates.items()
            ],
            "ratios": [
                {"kvtier": k, "baseline": b, **r, "target": t} for k, b, r, t in self.ratios()
            ],
        }


def table(cases: list[Case]) -> str:
    """Every contender's median [min-max], then kvtier's ratios to each baseline."""
    head = f"{'case / contender':<14} {'what':<52} {'median':>8} {'[min-max]':<15} unit"
    lines = [head, "-" * len(head)]
    for case in cases:
        lines.append(case.name + (f"  ({case.note})" if case.note else ""))
        for name, values in case.rates.items():
            s = spread(values, 2)
            value = f"{s['median']:8.2f} [{s['min']:.2f}-{s['max']:.2f}]"
            lines.append(f"  {name:<12} {case.whats[name]:<52} {value:<24} {case.unit}")
        for mine, base, r, target in case.ratios():
            verdict = ""
            if target is not None:
                verdict = f"  (target >= {target}x: {'ok' if r['median'] >= target else 'MISSED'})"
            ratio = f"{r['median']:.2f}x [{r['min']:.2f}-{r['max']:.2f}]"
            lines.append(f"    {mine} / {base}: {ratio}{verdict}")
        if case.unit == "us/chunk":
            for name, kind in case.kinds.items():
                if kind == "kvtier":
                    ok = statistics.median(case.rates[name]) <= LOOKUP_TARGET_US
                    lines.append(
                        f"    {name}: (target <= {LOOKUP_TARGET_US} us/chunk: "
                        f"{'ok' if ok else 'MISSED'})"
                    )
    return "\n".join(lines)


# -- the data and the plain baselines -----------------------------------------------------


def prompt(tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 100_000, (tokens,), generator=torch.Generator().manual_seed(seed))


def random_kv(layout: KVLayout, tokens: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(layout.chunk_shape(tokens), generator=gen).to(layout.dtype)


def chunk_buffers(layout: KVLayout, tokens: int) -> list[torch.Tensor]:
    """Preallocated, touched buffers, one per chunk, in kvtier's chunk layout."""
    return [
        torch.zeros(layout.chunk_shape(CHUNK), dtype=layout.dtype) for _ in range(tokens // CHUNK)
    ]


def copy_to_chunks(kv: torch.Tensor, bufs: list[torch.Tensor]) -> None:
    """The plain store: each chunk's token slice of ``kv`` into its buffer."""
    for i, buf in enumerate(bufs):
        buf.copy_(kv[:, :, i * CHUNK : (i + 1) * CHUNK])


def copy_from_chunks(bufs: list[torch.Tensor], out: torch.Tensor) -> None:
    """The plain retrieve: each chunk buffer into its token slice of ``out``."""
    for i, buf in enumerate(bufs):
        out[:, :, i * CHUNK : (i + 1) * CHUNK].copy_(buf)


def chunk_files(folder: str) -> list[str]:
    """The chunk files of a ``file`` tier's folder."""
    return sorted(str(p) for p in Path(folder).glob("??/*"))


class RawReader:
    """Reads whole files with ``os.preadv`` into one page-aligned, preallocated region
    (``O_DIRECT`` or buffered), on ``threads`` threads: the plain cold read."""

    def __init__(self, paths: list[str], *, direct: bool, threads: int = 1) -> None:
        self.paths = paths
        self.flags = os.O_RDONLY | (os.O_DIRECT if direct else 0)
        sizes = [os.stat(p).st_size for p in paths]
        self.nbytes = sum(sizes)
        self.slots = [-(-size // ALIGN) * ALIGN for size in sizes]
        self.offsets = [sum(self.slots[:i]) for i in range(len(self.slots))]
        self.region = mmap.mmap(-1, sum(self.slots))  # page aligned
        self.view = memoryview(self.region)
        torch.frombuffer(self.region, dtype=torch.uint8).fill_(1)  # touched once, reused
        self.pool = ThreadPoolExecutor(threads) if threads > 1 else None

    def _read(self, i: int) -> int:
        fd = os.open(self.paths[i], self.flags)
        try:
            slot = self.view[self.offsets[i] : self.offsets[i] + self.slots[i]]
            return os.preadv(fd, [slot], 0)
        finally:
            os.close(fd)

    def read_all(self, rep: int = 0) -> None:
        indices = range(len(self.paths))
        done = list(self.pool.map(self._read, indices) if self.pool else map(self._read, indices))
        assert sum(done) == self.nbytes

    def close(self) -> None:
        if self.pool:
            self.pool.shutdown()
        self.view.release()
        self.region.close()


class PageCache:
    """Drops the page cache; remembers whether every drop worked (root)."""

    cold = True

    def drop(self, rep: int = 0) -> None:
        self.cold = drop_page_cache() and self.cold


# -- kvtier -------------------------------------------------------------------------------


def kvtier_revision() -> str:
    """Where the imported kvtier comes from, and its git commit if it is a checkout."""
    source = Path(next(iter(kvtier.core.__path__))).resolve().parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(source), *args], capture_output=True, text=True)
        if done.returncode:
            raise OSError(done.stderr)
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except OSError:
        return str(source)
    return f"{source} @ {head}{' (modified)' if dirty else ''}"


def cpu_config(capacity: int) -> dict[str, Any]:
    return {"chunk_tokens": CHUNK, "tiers": [{"url": "cpu://", "capacity": capacity}]}


def file_config(folder: str, *, o_direct: bool) -> dict[str, Any]:
    tier = {"url": f"file://{folder}", "capacity": "8GiB", "options": {"o_direct": o_direct}}
    return {"chunk_tokens": CHUNK, "tiers": [tier]}


@contextmanager
def steady_cpu_tier(kv: torch.Tensor, tokens: int, prompts: int) -> Iterator[KVTier]:
    """A ``KVTier`` whose cpu tier holds ``prompts`` prompts of ``kv`` and has evicted
    (evicted blobs' memory is reused; fresh memory costs page faults here)."""
    nbytes = kv.numel() * kv.element_size()
    with KVTier.open(cpu_config(prompts * nbytes + (64 << 20)), model="bench", layout=LAYOUT) as kt:
        for warm in range(2 * prompts):
            kt.store(prompt(tokens, 1000 + warm), kv)
            kt.flush()
        yield kt


def kvtier_store(kt: KVTier, kv: torch.Tensor, seed: int, *, flush: bool) -> Timed:
    """``store`` of a new prompt each round (seeds from ``seed``), flushed in or after
    the timed part; checked untimed after."""
    tokens = kv.shape[2]

    def run(rep: int) -> None:
        assert kt.store(prompt(tokens, seed + rep), kv) == tokens
        if flush:
            kt.flush()

    def after(rep: int) -> None:
        kt.flush()
        got = kt.lookup(prompt(tokens, seed + rep))
        assert got == tokens, f"kvtier stored {got} of {tokens} tokens"

    return Timed(run, after=after)


def retrieve_all(kt: KVTier, tokens: torch.Tensor, out: torch.Tensor) -> None:
    n, _ = kt.retrieve(tokens, out=out)
    assert n == len(tokens), f"kvtier retrieved {n} of {len(tokens)} tokens"


def kvtier_retrieve(kt: KVTier, tokens: torch.Tensor, out: torch.Tensor) -> Timed:
    return Timed(lambda rep: retrieve_all(kt, tokens, out))


class ColdFile:
    """A prompt stored through a ``file`` tier (``o_direct`` or buffered) in ``folder``,
    and the contenders that read it back with the page cache dropped: a ``KVTier``
    opened anew before each run (as after a restart; opening is untimed), and plain
    ``preadv`` of the tier's files on each of ``threads`` thread counts."""

    def __init__(
        self,
        folder: str,
        kv: torch.Tensor,
        stored: torch.Tensor,
        cache: PageCache,
        *,
        direct: bool,
        threads: tuple[int, ...] = (1,),
    ) -> None:
        self.mode = "o_direct" if direct else "buffered"
        self.direct = direct
        self.stored = stored
        self.cache = cache
        tier_folder = os.path.join(folder, f"kvtier-{self.mode}")
        self.config = file_config(tier_folder, o_direct=direct)
        with KVTier.open(self.config, model="bench", layout=LAYOUT) as kt:
            kt.store(stored, kv)
        files = chunk_files(tier_folder)
        self.readers = {t: RawReader(files, direct=direct, threads=t) for t in threads}

    @property
    def name(self) -> str:
        return f"cold retrieve from file, {self.mode}"

    @property
    def note(self) -> str:
        return "page cache dropped" if self.cache.cold else "WARM: the page cache was not dropped"

    def kvtier(self, out: torch.Tensor) -> Contender:
        opened: list[KVTier] = []

        def before(rep: int) -> None:
            opened.append(KVTier.open(self.config, model="bench", layout=LAYOUT))
            self.cache.drop()

        def after(rep: int) -> None:
            opened.pop().close()

        what = f"KVTier.retrieve, file tier o_direct={self.direct}, new KVTier"
        run = Timed(lambda rep: retrieve_all(opened[-1], self.stored, out), before, after)
        return Contender("kvtier", what, run)

    def plain(self) -> dict[str, Contender]:
        raw = "O_DIRECT" if self.direct else "buffered"
        return {
            "plain" if len(self.readers) == 1 else f"plain x{t}": Contender(
                "plain",
                f"preadv ({raw}) of kvtier's files, {t} thread{'s' * (t > 1)}",
                Timed(reader.read_all, before=self.cache.drop),
            )
            for t, reader in self.readers.items()
        }

    def close(self) -> None:
        for reader in self.readers.values():
            reader.close()


@contextmanager
def lookup_tier(tokens: torch.Tensor) -> Iterator[KVTier]:
    """A ``KVTier`` whose cpu tier holds every chunk of ``tokens`` (small KV shape)."""
    kv = random_kv(LOOKUP_LAYOUT, len(tokens))
    config = cpu_config(2 * kv.numel() * kv.element_size() + (16 << 20))
    with KVTier.open(config, model="bench-lookup", layout=LOOKUP_LAYOUT) as kt:
        kt.store(tokens, kv)
        kt.flush()
        assert kt.lookup(tokens) == len(tokens)
        yield kt


def repeat(call: Callable[[], object], times: int = LOOKUP_CALLS) -> Timed:
    def run(rep: int) -> None:
        for _ in range(times):
            call()

    return Timed(run)


def lookup_check(kt: KVTier, tokens: Tokens) -> Callable[[], None]:
    def call() -> None:
        assert kt.lookup(tokens) == len(tokens)

    return call


def lookup_cases(
    kt: KVTier,
    long: torch.Tensor,
    reps: int,
    others: Mapping[str, Callable[[Tokens], Contender]] | None = None,
) -> list[Case]:
    """``KVTier.lookup`` of ``long`` (all cached in ``kt``), with the tokens in each of
    :data:`TOKEN_FORMS`, beside the contenders ``others`` make for the same tokens."""
    cases = []
    note = f"{len(long)} tokens, all cached, {LOOKUP_CALLS} calls a run"
    chunks = LOOKUP_CALLS * (len(long) // CHUNK)
    for form, convert in TOKEN_FORMS.items():
        tokens = convert(long)
        contenders = {
            "kvtier": Contender("kvtier", "KVTier.lookup", repeat(lookup_check(kt, tokens)))
        }
        contenders.update({name: make(tokens) for name, make in (others or {}).items()})
        name = f"lookup, tokens as {form}"
        cases.append(Case.measure(name, reps, contenders, chunks=chunks, note=note))
    return cases


# -- the run ------------------------------------------------------------------------------


def run(folder: str, tokens: int, reps: int, lookup_tokens: int) -> list[Case]:
    kv = random_kv(LAYOUT, tokens)
    out = torch.zeros_like(kv)
    bufs = chunk_buffers(LAYOUT, tokens)
    nbytes = kv.numel() * kv.element_size()
    plain_store = Contender(
        "plain",
        "copy of the token slices into chunk buffers",
        Timed(lambda rep: copy_to_chunks(kv, bufs)),
    )
    plain_retrieve = Contender(
        "plain",
        "copy of the chunk buffers into out",
        Timed(lambda rep: copy_from_chunks(bufs, out)),
    )
    memcpy = Contender("plain", "torch copy_ of the whole KV", Timed(lambda rep: out.copy_(kv)))
    cases = [Case.measure("memcpy of one tensor (scale)", reps, {"plain": memcpy}, nbytes=nbytes)]
    with steady_cpu_tier(kv, tokens, prompts=3) as kt:
        queued = Contender(
            "kvtier", "KVTier.store (flush untimed)", kvtier_store(kt, kv, 0, flush=False)
        )
        contenders = {"kvtier": queued, "plain": plain_store}
        cases.append(Case.measure("store (queued, caller's view)", reps, contenders, nbytes=nbytes))
        flushed = Contender("kvtier", "KVTier.store + flush", kvtier_store(kt, kv, 100, flush=True))
        contenders = {"kvtier": flushed, "plain": plain_store}
        cases.append(Case.measure("store + flush into cpu", reps, contenders, nbytes=nbytes))
        last = prompt(tokens, 100 + reps)  # the prompt stored last is in RAM
        got = Contender("kvtier", "KVTier.retrieve into out", kvtier_retrieve(kt, last, out))
        contenders = {"kvtier": got, "plain": plain_retrieve}
        cases.append(Case.measure("retrieve from cpu", reps, contenders, nbytes=nbytes))
        assert torch.equal(out, kv)

    long = prompt(lookup_tokens, 7)
    with lookup_tier(long) as kt:
        cases += lookup_cases(kt, long, reps)

    cache = PageCache()
    for direct in (True, False):
        cold = ColdFile(folder, kv, prompt(tokens, 0), cache, direct=direct)
        contenders = {"kvtier": cold.kvtier(out), **cold.plain()}
        cases.append(Case.measure(cold.name, reps, contenders, nbytes=nbytes, note=cold.note))
        cold.close()
        assert torch.equal(out, kv)
    return cases


def arguments(doc: str | None, *, reps: int, tokens: int) -> argparse.ArgumentParser:
    """The options of the engine-level benchmarks (this one and ``peers.py``)."""
    parser = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--dir", default="/var/tmp", help="a folder on the disk to test")
    parser.add_argument("--reps", type=int, default=reps, help="timed rounds per case")
    parser.add_argument("--tokens", type=int, default=tokens, help="prompt length (x 256)")
    parser.add_argument("--lookup-tokens", type=int, default=65536, help="lookup prompt length")
    return parser


def report(
    title: str, cases: list[Case], args: argparse.Namespace, revision: str, **meta: Any
) -> None:
    """Print ``title`` and the table; write the JSON if ``--json`` asked for it, with
    ``revision``, the :func:`kvtier_revision` taken when the run began."""
    mib = args.tokens * LAYOUT.bytes_per_token() / 2**20
    print(f"{title}; {args.tokens} tokens of Llama-3-8B-shaped KV ({mib:.0f} MiB); "
          f"medians [min-max] of {args.reps} rounds; torch threads 1")  # fmt: skip
    print(table(cases))
    if args.json:
        write_json(
            args.json,
            [case.as_dict() for case in cases],
            tokens=args.tokens,
            reps=args.reps,
            lookup_tokens=args.lookup_tokens,
            torch_threads=torch.get_num_threads(),
            kvtier=revision,
            **meta,
        )


def main(argv: list[str]) -> int:
    args = arguments(__doc__, reps=5, tokens=2048).parse_args(argv)
    torch.set_num_threads(1)
    revision = kvtier_revision()
    with tempfile.TemporaryDirectory(prefix="kvtier-bench-", dir=args.dir) as folder:
        cases = run(folder, args.tokens, args.reps, args.lookup_tokens)
    report("KVTier", cases, args, revision)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
